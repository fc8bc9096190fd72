"""Endoscopy images in the Kvasir layout: 2-D RGB frames with binary masks, evaluated whole image by image.

Layout (datasets.md 6, ../shared/datasets/README.md)::

    root/images/<id>.jpg          RGB frames of any size (Kvasir-SEG: 332x487 to 1920x1072)
    root/masks/<id>.jpg|.png      binary masks; JPEG masks are lossy, so foreground = grey value >= 128
    root/train.txt  val.txt  test.txt   one id per line, no extension (Kvasir-SEG: 800 / 100 / 100)

Kvasir-instrument ships its images and masks the same way (masks as PNG, train.txt / test.txt only; give it a
val.txt, e.g. the last ids of train.txt). Protocol (MMS, Lou et al. TMI 2023; datasets.md 6.1):

* labeled unit = one image; the labeled set is the first N ids of train.txt (the file's order, not a directory
  listing: MMS's unsorted ``os.listdir`` split is thereby fixed), the rest of train.txt is unlabeled;
* model selection on val.txt, reported numbers on test.txt (MMS selects on its test folder);
* every image is ImageNet-normalised, for training and for evaluation alike (MMS forgets it at test time; the
  method's flag ``faithful_test_unnormalised`` reproduces that), and resized to the training size with one
  bilinear antialiased resize (``transforms.resize_bilinear``); no other augmentation in the data pipeline
  (MMS's labeled "weak" view); methods add their own (MMS: the strong view of the unlabeled image);
* evaluation (``eval_mode="whole_image"``): the image is resized to the training size, the logits resized back
  to the original size, metrics per image; plus the pooled-pixel F1 of the endoscopy papers (``pooled_f1``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmark.errors import UserError
from datamodules.base import ListedData, SemiSupervisedDataModule, check_files_exist, read_list
from datamodules.spec import DatasetSpec
from datamodules.transforms import resize_bilinear

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_FOLDER, MASK_FOLDER = "images", "masks"
MASK_SUFFIXES = (".jpg", ".png")
# JPEG masks carry compression noise around 0 and 255; the midpoint separates them.
MASK_THRESHOLD = 128

KVASIR_SEG_SPEC = DatasetSpec(
    name="kvasir_seg",
    spatial_dims=2,
    in_channels=3,
    class_names=("background", "polyp"),
    # MMS trains at transforms.Resize((512, 288)): height 512, width 288 as torchvision reads it (methods.md 2.4).
    patch_size=(512, 288),
    eval_mode="whole_image",
    labeled_unit="image",
    dice_include_background=True,
    image_normalization=(IMAGENET_MEAN, IMAGENET_STD),
    extra_metrics=("pooled_f1",),
)


def read_rgb(path: Path) -> np.ndarray:
    """(3, H, W) float32 in [0, 1]; an unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot read image ({error})", where=str(path), fix="the file is corrupt or truncated: copy it again") from error


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 in {0, 1}: grey value >= 128 (RGB JPEG masks are converted to grey first, as PIL 'L')."""
    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot read mask ({error})", where=str(path), fix="the file is corrupt or truncated: copy it again") from error
    return (grey >= MASK_THRESHOLD).astype(np.uint8)


def normalize(image: np.ndarray, normalization) -> np.ndarray:
    mean, std = (np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in normalization)
    return (image - mean) / std


class KvasirDataModule(SemiSupervisedDataModule):
    """The Kvasir layout (images/ + masks/ + split files); binary masks; RGB input."""

    def read_split(self) -> ListedData:
        lists = {stage: self.root / f"{stage}.txt" for stage in ("train", "val", "test")}
        ids = {stage: read_list(path, stage) for stage, path in lists.items()}
        self._masks: dict[str, Path] = {}
        for stage, path in lists.items():
            check_files_exist([self.image_path(i) for i in ids[stage]], path)
            self._masks.update(self.find_masks(ids[stage], path))
        return ListedData([(i, [i]) for i in ids["train"]], ids["val"], ids["test"], listed_units=len(ids["train"]))

    def image_path(self, image_id: str) -> Path:
        return self.root / IMAGE_FOLDER / f"{image_id}.jpg"

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
            check_files_exist(missing, list_file)  # raises the suite's missing-files message
        return found

    def load_item(self, item: str, with_label: bool):
        """Training items are channel-last (H, W, 3), as image files store them (the base's convention)."""
        image = normalize(read_rgb(self.image_path(item)), self.spec.image_normalization)
        return image.transpose(1, 2, 0), read_mask(self._masks[item]) if with_label else None

    def train_transform(self, rng: np.random.Generator, image, label):
        image = resize_bilinear(image.transpose(2, 0, 1), self.patch_size).numpy().transpose(1, 2, 0)
        if label is not None:  # nearest neighbour keeps the mask binary (MMS resizes PIL masks the same way)
            rows = np.minimum((np.arange(self.patch_size[0]) + 0.5) * label.shape[0] / self.patch_size[0], label.shape[0] - 1)
            cols = np.minimum((np.arange(self.patch_size[1]) + 0.5) * label.shape[1] / self.patch_size[1], label.shape[1] - 1)
            label = label[rows.astype(int)[:, None], cols.astype(int)[None, :]]
        return image, label

    def load_case(self, case_id: str):
        image = normalize(read_rgb(self.image_path(case_id)), self.spec.image_normalization)
        return {"case": case_id, "image": image, "label": read_mask(self._masks[case_id]), "spacing": None}
