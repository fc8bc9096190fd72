"""Endoscopy and surgical-tool images: 2-D RGB frames with binary masks (polyp or tool), evaluated whole image by
image. One family, one protocol (MMS, Lou et al. TMI 2023; docs/datasets.md#endoscopy-and-surgical-tools), three
on-disk layouts.

**Kvasir layout** (``kvasir_seg``, ``kvasir_instrument``; docs/datasets.md#kvasir-seg)::

    root/images/<id>.jpg          RGB frames of any size (Kvasir-SEG: 332x487 to 1920x1072)
    root/masks/<id>.jpg|.png      binary masks; JPEG masks are lossy, so foreground = grey value >= 128
    root/train.txt  val.txt  test.txt   one id per line, no extension (Kvasir-SEG: 800 / 100 / 100)

Kvasir-instrument ships PNG masks (0/255) and only ``train.txt`` (472 ids) and ``test.txt`` (118). Without a
``val.txt`` the **last ids of train.txt validate** (``data.val_fraction`` 0.1: the last 47 of the 472; or
``data.val_holdout=N``, the last N); a ``val.txt`` put next to them is used instead.

**EndoVis 2017 robotic instruments** (``endovis17``), the challenge's training download::

    root/train/instrument_dataset_{1..8}/left_frames/frame000.png ... frame224.png     RGB 1920x1080
    root/train/instrument_dataset_N/ground_truth/<Instrument>_labels/frame000.png      one folder per instrument
    root/test/instrument_dataset_{9,10}/left_frames/...  + ground_truth/<folder>/...  (only for data.test_set=released)

The masks of the robotic instruments (every ``ground_truth`` sub-folder but ``Other_labels``) are merged into one
binary tool mask (value > 0: shaft, wrist and claspers alike), as ternaus's ``prepare_data.py`` does: "Other" marks
non-robotic tools (a laparoscopic instrument, an ultrasound probe), labelled by the challenge so that methods learn
not to take them for robotic instruments; they count as background. (An early version of that script meant to skip
them but tested the folder list's repr, which never matched, so it merged them.) ``data.crop_black_borders`` (default true) cuts the black
borders off, ``[28:1052, 320:1600]`` of a 1080x1920 frame -> 1280x1024 (ternaus; the challenge's own advice), images
and masks alike; false for frames that are already cropped. The standard 4-fold cross-validation on the 8 training
sequences (ternaus ``prepare_train_val.py``): ``data.fold`` k in 0..3 tests on sequences FOLDS[k]
(0: 1, 3; 1: 2, 5; 2: 4, 8; 3: 6, 7); of the six others the **highest-numbered sequence validates** (whole, so
no near-duplicate neighbour of a validation frame trains: frames are 0.5 s apart) and five train.
``data.test_set=released`` tests instead on the released test sequences 9 and 10 (surgeries never seen in
training; the released test frames of sequences 1-8 come from the training videos and are not used): sequences
1-7 train, 8 validates, ``data.fold`` is ignored. The labeled unit is a frame; the labeled frames are **spread
evenly** over the training frames in sequence-then-frame order (frame i of N labeled is at position
floor((i + 0.5) T / N) of the T training frames), so every training sequence contributes about N/5 labeled
frames, evenly spaced in time; the rest is unlabeled.

**Image/mask folders as packaged by MMS** (``art_net``, ``robotool``; docs/datasets.md#endoscopy-and-surgical-tools)::

    root/train/image/<stem>.png|.jpg    root/train/mask/<stem>.png   binary masks (0/255), same stems
    root/test/image/...                 root/test/mask/...

Names are taken in natural order (frame2 before frame10), not MMS's unsorted ``os.listdir``; the last
``data.val_fraction`` (0.1) of the training names validate (``data.val_holdout=N``: the last N), the first N of the
rest are labeled.

Protocol, every layout (MMS, docs/datasets.md#endoscopy-protocol):

* labeled unit = one image (Kvasir, MMS folders) or frame (EndoVis); except for EndoVis the labeled set is the first
  N ids in list / name order (MMS's unsorted split is thereby fixed), the rest unlabeled;
* model selection on the validation set, reported numbers on the test set (MMS selects on its test folder);
* every image is ImageNet-normalised, for training and for evaluation alike (MMS forgets it at test time; the
  method's flag ``faithful_test_unnormalised`` reproduces that), and resized to the training size (MMS: 512x288)
  with one bilinear antialiased resize (``core/resize.py``); no other augmentation in the data pipeline
  (MMS's labeled "weak" view); methods add their own (MMS: the strong view of the unlabeled image);
* evaluation (``eval_mode="whole_image"``): the image is resized to the training size, the logits resized back
  to the original size, metrics per image; plus the pooled-pixel F1 of the endoscopy papers (``pooled_f1``).
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import UserError
from core.resize import resize_bilinear
from core.spec import DatasetSpec
from datamodules.base import ListedData, SemiSupervisedDataModule, Split, check_files_exist, read_list, report_foreign_files
from datamodules.checks import active_checks, report
from datamodules.images import pixel_array
from datamodules.listing import (  # noqa: F401 (the ENDOVIS_ constants: this family's, for its importers)
    DEFAULT_VAL_FRACTION, ENDOVIS_FOLDS, ENDOVIS_RELEASED_TEST_SEQUENCES, ENDOVIS_TEST_SETS, ENDOVIS_TRAIN_SEQUENCES,
    FOLDER_IMAGE, FOLDER_MASK, FOLDER_SUFFIXES, endovis_sequence_folder, endovis_sequence_roles, png_stems,
    validation_holdout_count,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_FOLDER, MASK_FOLDER = "images", "masks"
MASK_SUFFIXES = (".jpg", ".png")
# JPEG masks carry compression noise around 0 and 255; the midpoint separates them.
MASK_THRESHOLD = 128
# When a set has no validation list, this share of the training ids (the last ones) validates.

KVASIR_SEG_SPEC = DatasetSpec(
    name="kvasir_seg",
    spatial_dims=2,
    in_channels=3,
    class_names=("background", "polyp"),
    # MMS trains at transforms.Resize((512, 288)): height 512, width 288 as torchvision reads it (docs/methods.md#mms).
    patch_size=(512, 288),
    eval_mode="whole_image",
    labeled_unit="image",
    dice_include_background=True,
    image_normalization=(IMAGENET_MEAN, IMAGENET_STD),
    extra_metrics=("pooled_f1",),
)
# The tool sets follow the same protocol; only the foreground and (EndoVis) the unit differ.
KVASIR_INSTRUMENT_SPEC = replace(
    KVASIR_SEG_SPEC, name="kvasir_instrument", class_names=("background", "tool"), labeled_counts={1.0: 472}
)
ENDOVIS17_SPEC = replace(KVASIR_SEG_SPEC, name="endovis17", class_names=("background", "tool"), labeled_unit="frame")
ART_NET_SPEC = replace(KVASIR_SEG_SPEC, name="art_net", class_names=("background", "tool"))
ROBOTOOL_SPEC = replace(KVASIR_SEG_SPEC, name="robotool", class_names=("background", "tool"))


def read_grey(path: Path, what: str) -> np.ndarray:
    """(H, W) grey values of a mask or label file (RGB converted as PIL 'L'; a 16-bit file keeps its values);
    unreadable = a UserError naming it."""
    try:
        with Image.open(path) as image:
            return pixel_array(image, "L", rescale=False)
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot read {what} ({error})", where=str(path), fix="the file is corrupt or truncated: copy it again") from error


def read_rgb(path: Path) -> np.ndarray:
    """(3, H, W) float32 in [0, 1]; an unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as image:  # 16-bit frames rescaled to 8 bits (datamodules/images.py)
            return pixel_array(image, "RGB").astype(np.float32).transpose(2, 0, 1) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot read image ({error})", where=str(path), fix="the file is corrupt or truncated: copy it again") from error


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 in {0, 1}: grey value >= 128 (RGB JPEG masks are converted to grey first, as PIL 'L').

    A lossless mask holding only 0 and 1 is a 0/1 mask: thresholding it at 128 would silently make it empty.
    """
    grey = read_grey(path, "mask")
    if path.suffix.lower() not in (".jpg", ".jpeg") and grey.max(initial=0) == 1:
        return grey.copy()
    return (grey >= MASK_THRESHOLD).astype(np.uint8)


def normalize(image: np.ndarray, normalization) -> np.ndarray:
    mean, std = (np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in normalization)
    return (image - mean) / std


def natural_key(name: str) -> list:
    """Sort key comparing digit runs as numbers: frame2 before frame10 (names need not be zero-padded)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def resize_mask_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour keeps the mask binary (MMS resizes its PIL masks the same way)."""
    rows = np.minimum((np.arange(size[0]) + 0.5) * label.shape[0] / size[0], label.shape[0] - 1)
    cols = np.minimum((np.arange(size[1]) + 0.5) * label.shape[1] / size[1], label.shape[1] - 1)
    return label[rows.astype(int)[:, None], cols.astype(int)[None, :]]


class EndoscopyDataModule(SemiSupervisedDataModule):
    """What every endoscopy layout shares: RGB frames with binary masks, ImageNet normalisation, one resize to the
    training size, whole-image cases, and the validation hold-out of sets that ship no validation split.

    A layout implements ``read_split`` and ``read_image_and_mask`` (or ``image_path`` and ``mask_path``).
    """

    def image_path(self, item: str) -> Path:
        raise NotImplementedError

    def mask_path(self, item: str) -> Path:
        raise NotImplementedError

    def read_image_and_mask(self, item: str, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(3, H, W) float32 RGB in [0, 1] and the (H, W) uint8 {0, 1} mask (None without a label)."""
        image = read_rgb(self.image_path(item))
        if not with_label:
            return image, None
        mask = read_mask(self.mask_path(item))
        if mask.shape != image.shape[1:]:
            raise UserError(f"image {image.shape[1:]} and mask {mask.shape} differ in size", where=str(self.mask_path(item)),
                            fix="the mask must be the same frame's, at its size")
        return image, mask

    def describe(self, kind, name):
        return str(self.image_path(name))

    def load_item(self, item: str, with_label: bool):
        """Training items are channel-last (H, W, 3), as image files store them (the base's convention)."""
        image, mask = self.read_image_and_mask(item, with_label)
        return normalize(image, self.spec.image_normalization).transpose(1, 2, 0), mask

    def train_transform(self, rng: np.random.Generator, image, label):
        image = resize_bilinear(image.transpose(2, 0, 1), self.patch_size).numpy().transpose(1, 2, 0)
        return image, None if label is None else resize_mask_nearest(label, self.patch_size)

    def load_case(self, case_id: str):
        image, mask = self.read_image_and_mask(case_id)
        return {"case": case_id, "image": normalize(image, self.spec.image_normalization), "label": mask, "spacing": None}

    def hold_out_validation(self, ids: list[str], source: Path) -> tuple[list[str], list[str]]:
        """(training ids, validation ids) for a set without a validation split: the last ids of ``ids`` validate,
        ``data.val_holdout`` of them when it is > 0, else round(``data.val_fraction`` x len(ids)), at least one."""
        fraction = self.options.get("val_fraction", DEFAULT_VAL_FRACTION)
        count = validation_holdout_count(len(ids), self.val_holdout, fraction, self.spec.labeled_unit, source)
        return ids[:-count], ids[-count:]


class KvasirDataModule(EndoscopyDataModule):
    """The Kvasir layout (images/ + masks/ + split files). ``val.txt`` is required unless
    ``validation_list_optional`` (Kvasir-instrument): then, without it, the last training ids validate."""

    validation_list_optional = False

    def read_split(self) -> ListedData:
        stages = ("train", "val", "test")
        lists = {stage: self.root / f"{stage}.txt" for stage in stages}
        holding_out = self.validation_list_optional and not lists["val"].exists()
        ids = {stage: [] if stage == "val" and holding_out else read_list(path, stage) for stage, path in lists.items()}
        self._masks: dict[str, Path] = {}
        for stage, path in lists.items():
            check_files_exist([self.image_path(i) for i in ids[stage]], path)
            self._masks.update(self.find_masks(ids[stage], path))
        listed_units = len(ids["train"])
        if holding_out and ids["train"]:
            ids["train"], ids["val"] = self.hold_out_validation(ids["train"], lists["train"])
        return ListedData([(i, [i]) for i in ids["train"]], ids["val"], ids["test"], listed_units=listed_units)

    def image_path(self, image_id: str) -> Path:
        return self.root / IMAGE_FOLDER / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self._masks[image_id]

    def find_masks(self, ids: list[str], list_file: Path) -> dict[str, Path]:
        """Each id's mask, <id>.jpg (Kvasir-SEG) or <id>.png (Kvasir-instrument)."""
        found, missing = {}, []
        for image_id in ids:
            candidates = [self.root / MASK_FOLDER / f"{image_id}{suffix}" for suffix in MASK_SUFFIXES]
            existing = [c for c in candidates if c.is_file()]
            if existing:
                found[image_id] = existing[0]
            else:
                missing.append(candidates[0].with_suffix(".jpg|.png"))
        if missing:
            check_files_exist(missing, list_file)  # records the suite's missing-files message
        return found


class KvasirInstrumentDataModule(KvasirDataModule):
    validation_list_optional = True
    data_options = {"val_fraction": DEFAULT_VAL_FRACTION}


# ---- EndoVis 2017 --------------------------------------------------------------------------------------------------
ENDOVIS_FULL_FRAME = (1080, 1920)
# ternaus prepare_data.py: h_start 28, w_start 320, 1024 x 1280 (the challenge: "crop from the pixel (320, 28)").
ENDOVIS_BLACK_BORDER_CROP = (slice(28, 28 + 1024), slice(320, 320 + 1280))
ENDOVIS_FRAMES_PER_SEQUENCE = 225
# Label folders of other, non-robotic tools ("Other_labels"): background in the binary task (ternaus).
ENDOVIS_NON_ROBOTIC = "Other"


class EndoVis17DataModule(EndoscopyDataModule):
    """EndoVis 2017 in its download layout: sequences of frames, per-instrument label folders merged, 4 folds."""

    data_options = {"fold": 0, "crop_black_borders": True, "test_set": "fold"}

    def __init__(self, *args, **kwargs):
        self._label_folders: dict[str, list[Path]] = {}  # "<split>/instrument_dataset_N" -> its ground_truth folders
        self._frames: dict[str, list[str]] = {}  # "<split>/instrument_dataset_N" -> its frame names
        super().__init__(*args, **kwargs)

    # -- which sequences do what
    def sequence_roles(self) -> dict[str, list[tuple[str, int]]]:
        """{"train" | "val" | "test": [(download split folder, sequence number), ...]} from the data options."""
        return endovis_sequence_roles(self.options["fold"], self.options["test_set"])

    def read_split(self):
        roles = self.sequence_roles()
        absent = sorted({split for sequences in roles.values() for split, _ in sequences if not (self.root / split).is_dir()})
        if absent:  # one problem, not one per sequence: DATA_ROOT is most likely the wrong folder
            report(UserError(f"EndoVis 2017 folder {' and '.join(f'{a}/' for a in absent)} is missing", where=str(self.root),
                             fix="DATA_ROOT is the folder holding train/instrument_dataset_1 .. 8 (and test/ for the released "
                                 "test set)"))
            return ListedData([], [], [], 0)
        frames = {role: [f for split, number in sequences for f in self.sequence_frames(split, number)]
                  for role, sequences in roles.items()}
        self.check_frame_sizes()
        units = [(frame, [frame]) for frame in frames["train"]]
        return ListedData(units, frames["val"], frames["test"], listed_units=len(units))

    def check_frame_sizes(self) -> None:
        """With the crop on, every sequence's first frame must have the download's 1080x1920 size: one problem
        before training, instead of one per frame once training reads them (the header alone is read)."""
        checks = active_checks()  # the verifier and the pre-training check collect notes; a bare read has none
        short = sorted(s for s, names in self._frames.items() if s.startswith("train/") and len(names) != ENDOVIS_FRAMES_PER_SEQUENCE)
        if short and checks is not None:
            checks.note(f"{len(short)} training sequence(s) do not have the published {ENDOVIS_FRAMES_PER_SEQUENCE} frames "
                        f"(e.g. {short[0]}: {len(self._frames[short[0]])}): a subset or a different copy, so results are "
                        "not comparable with published tables")
        if not self.options["crop_black_borders"]:
            return
        wrong = {}
        for sequence, names in self._frames.items():
            path = self.root / sequence / "left_frames" / f"{names[0]}.png"
            try:
                with Image.open(path) as image:
                    size = (image.height, image.width)
            except (OSError, UnidentifiedImageError):
                continue  # reported with its path when the frame is read
            if size != ENDOVIS_FULL_FRAME:
                wrong[sequence] = size
        if wrong:
            sequence, size = next(iter(wrong.items()))
            report(UserError(
                f"{len(wrong)} sequence(s) have frames of another size than the download's {ENDOVIS_FULL_FRAME[0]}x"
                f"{ENDOVIS_FULL_FRAME[1]} (e.g. {sequence}: {size[0]}x{size[1]}), so the black-border crop "
                "[28:1052, 320:1600] does not apply", where=str(self.root / sequence / "left_frames"),
                fix="set data.crop_black_borders=false for frames that are already cropped (or restore the original frames)"))

    def sequence_frames(self, split: str, number: int) -> list[str]:
        """The frame ids of one sequence ("<split>/instrument_dataset_N/frameXXX"), checking its label folders."""
        sequence = f"{split}/{endovis_sequence_folder(number)}"
        folder = self.root / sequence
        frames, ground_truth = folder / "left_frames", folder / "ground_truth"
        fix = ("DATA_ROOT holds train/instrument_dataset_1 .. 8 (and test/instrument_dataset_9, 10 for "
               "data.test_set=released), each with left_frames/ and ground_truth/<Instrument>_labels/")
        missing = [f.name for f in (frames, ground_truth) if not f.is_dir()]
        if missing:
            report(UserError(f"EndoVis 2017 sequence folder '{sequence}' lacks {' and '.join(missing)}/", where=str(folder), fix=fix))
            return []
        names = png_stems(frames)
        report_foreign_files(frames, (".png",), "frames")
        if not names:
            report(UserError(f"no frames (*.png) in '{sequence}/left_frames'", where=str(frames), fix=fix))
            return []
        label_folders = sorted(p for p in ground_truth.iterdir() if p.is_dir())
        if not label_folders:
            report(UserError(f"no label folders in '{sequence}/ground_truth'", where=str(ground_truth), fix=fix))
        for labels in label_folders:
            # Every instrument folder labels every frame (a missing one would silently drop that tool from the mask).
            check_files_exist([labels / f"{name}.png" for name in names], labels)
            orphans = sorted({p.stem for p in labels.glob("*.png")} - set(names))
            if orphans:
                report(UserError(f"{len(orphans)} label file(s) in '{labels.name}' have no frame in left_frames/ "
                                 f"(e.g. {orphans[0]}.png)", where=str(labels),
                                 fix="restore the missing frames, or remove labels that belong to another sequence"))
        self._label_folders[sequence] = label_folders
        self._frames[sequence] = names
        return [f"{sequence}/{name}" for name in names]

    # -- reading
    def image_path(self, frame: str) -> Path:
        sequence, name = frame.rsplit("/", 1)
        return self.root / sequence / "left_frames" / f"{name}.png"

    def read_image_and_mask(self, frame: str, with_label: bool = True):
        image = read_rgb(self.image_path(frame))
        crop = self.options["crop_black_borders"]
        if crop and image.shape[1:] != ENDOVIS_FULL_FRAME:
            raise UserError(
                f"the frame is {image.shape[1]}x{image.shape[2]}; the black-border crop [28:1052, 320:1600] needs the "
                f"{ENDOVIS_FULL_FRAME[0]}x{ENDOVIS_FULL_FRAME[1]} frames of the download", where=str(self.image_path(frame)),
                fix="set data.crop_black_borders=false for frames that are already cropped (or restore the original frame)")
        mask = None
        if with_label:
            sequence, name = frame.rsplit("/", 1)
            mask = np.zeros(image.shape[1:], np.uint8)
            for labels in self._label_folders[sequence]:
                if ENDOVIS_NON_ROBOTIC in labels.name:
                    continue
                path = labels / f"{name}.png"
                instrument = read_grey(path, "label")
                if instrument.shape != mask.shape:
                    raise UserError(f"frame {mask.shape} and label {instrument.shape} differ in size", where=str(path),
                                    fix="the label must be this frame's, at the frame's size")
                mask |= instrument > 0  # parts (shaft, wrist, claspers) and instruments all become "tool"
        if crop:
            image = image[(slice(None), *ENDOVIS_BLACK_BORDER_CROP)]
            mask = None if mask is None else mask[ENDOVIS_BLACK_BORDER_CROP]
        return image, mask

    # -- labeled frames, notes and the leaderboard
    def select_labeled(self, units, count):
        """``count`` frames spread evenly over the training frames in sequence-then-frame order (see module doc)."""
        positions = {int((i + 0.5) * len(units) / count) for i in range(count)}
        return ([u for p, u in enumerate(units) if p in positions], [u for p, u in enumerate(units) if p not in positions])

    def split_notes(self, split: Split) -> list[str]:
        sequence_of = lambda frame: int(frame.split("/")[1].rsplit("_", 1)[1])  # noqa: E731
        roles = self.sequence_roles()
        per_sequence = {n: sum(sequence_of(f) == n for f in split.labeled) for _, n in roles["train"]}
        test = ("released test sequences" if self.options["test_set"] == "released" else f"fold {self.options['fold']}: test sequences")
        return [
            f"{test} {[n for _, n in roles['test']]}, validation sequence {roles['val'][0][1]}, training sequences "
            f"{[n for _, n in roles['train']]}"
            + (" (data.fold is ignored with the released test set)" if self.options["test_set"] == "released" else ""),
            f"{len(split.labeled)} labeled frames spread evenly over the {split.total_units} training frames; per sequence "
            + ", ".join(f"{n}: {k}" for n, k in per_sequence.items()),
            "frames cropped to [28:1052, 320:1600]" if self.options["crop_black_borders"] else "frames not cropped",
        ]

    def leaderboard_fields(self) -> dict[str, Any]:
        return {"fold": "released" if self.options["test_set"] == "released" else self.options["fold"]}


# ---- image/mask folders as MMS packs ART-Net and RoboTool ------------------------------------------------------------
FOLDER_SPLITS = ("train", "test")


class ImageMaskFoldersDataModule(EndoscopyDataModule):
    """``{train,test}/{image,mask}/`` with the same stems (MMS's data/<name>/ folders)."""

    data_options = {"val_fraction": DEFAULT_VAL_FRACTION}

    def __init__(self, *args, **kwargs):
        self._files: dict[str, tuple[Path, Path]] = {}  # "<split>/<stem>" -> (image, mask)
        super().__init__(*args, **kwargs)

    def read_split(self):
        stems = {split: self.paired_stems(split) for split in FOLDER_SPLITS}
        train = [f"train/{stem}" for stem in stems["train"]]
        listed_units = len(train)
        val: list[str] = []
        if train:
            train, val = self.hold_out_validation(train, self.root / "train" / FOLDER_IMAGE)
        return ListedData([(i, [i]) for i in train], val, [f"test/{stem}" for stem in stems["test"]], listed_units)

    def paired_stems(self, split: str) -> list[str]:
        """The stems with both an image and a mask, in natural order; every unpaired or ambiguous file a problem."""
        folders = {kind: self.root / split / kind for kind in (FOLDER_IMAGE, FOLDER_MASK)}
        fix = "DATA_ROOT holds train/ and test/, each with image/ and mask/ holding files of the same names (MMS's layout)"
        missing = [f"{split}/{kind}" for kind, folder in folders.items() if not folder.is_dir()]
        if missing:
            report(UserError(f"folder {' and '.join(missing)} is missing", where=str(self.root), fix=fix))
            return []
        files = {}
        for kind, folder in folders.items():
            by_stem: dict[str, list[Path]] = {}
            report_foreign_files(folder, FOLDER_SUFFIXES, f"{split}/{kind} files")
            for path in folder.iterdir():
                if path.is_file() and path.suffix.lower() in FOLDER_SUFFIXES:
                    by_stem.setdefault(path.stem, []).append(path)
            ambiguous = sorted(stem for stem, paths in by_stem.items() if len(paths) > 1)
            if ambiguous:
                report(UserError(f"{len(ambiguous)} name(s) in {split}/{kind} exist with several extensions "
                                 f"(e.g. {', '.join(p.name for p in sorted(by_stem[ambiguous[0]]))})", where=str(folder),
                                 fix="keep one file per name"))
            files[kind] = {stem: sorted(paths)[0] for stem, paths in by_stem.items()}
        images, masks = files[FOLDER_IMAGE], files[FOLDER_MASK]
        if not images:
            report(UserError(f"no images in {split}/{FOLDER_IMAGE}", where=str(folders[FOLDER_IMAGE]), fix=fix))
        for kind, unpaired, other in ((FOLDER_IMAGE, sorted(set(images) - set(masks)), FOLDER_MASK),
                                      (FOLDER_MASK, sorted(set(masks) - set(images)), FOLDER_IMAGE)):
            if unpaired:
                shown = ", ".join(files[kind][stem].name for stem in unpaired[:5]) + (" ..." if len(unpaired) > 5 else "")
                report(UserError(f"{len(unpaired)} file(s) in {split}/{kind} have no {other} of the same name: {shown}",
                                 where=str(folders[kind]), fix=f"add the missing {other} file(s) or remove these"))
        paired = sorted(set(images) & set(masks), key=natural_key)
        self._files.update({f"{split}/{stem}": (images[stem], masks[stem]) for stem in paired})
        return paired

    def image_path(self, item: str) -> Path:
        return self._files[item][0]

    def mask_path(self, item: str) -> Path:
        return self._files[item][1]
