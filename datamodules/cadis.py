"""CaDIS (cataract surgery frames of the CATARACTS videos), docs/datasets.md#cadis.

Layout (the ``--data_path`` of RViMLab's code)::

    root/Video01/Images/Video1_frame000090.png    RGB 960 x 540
    root/Video01/Labels/Video1_frame000090.png    single channel, original classes 0..35
    ... Video25/        (folders zero-padded, file prefixes not)

Split by video (RViMLab, following CaDIS v2): train = videos 1, 3, 4, 6, 8-11, 13-15, 17-21, 23-25 (3550 frames),
val = 5, 7, 16 (534), test = 2, 12, 22 (586). Labels are remapped on loading to the task's classes:

- ``cadis`` task I, 8 classes: anatomy 0-6 unchanged, 7 = every instrument (7..35);
- ``cadis_task2`` task II, 17 classes: anatomy, then instruments merged with their handles; rare classes
  {25, 26, 29, 30, 31, 34, 35} -> 255 (ignored by the loss and the metrics);
- ``cadis_task3`` task III, 25 classes: 0..24 unchanged, 25..35 -> 255.

Class 0 is the pupil, not background, so every class is scored (Dice and Jaccard per frame, and the
dataset-level mIoU from pooled pixel counts, the CaDIS metric). No surface distances (the literature reports none).

**Labeled ratio, counted in frames.** The training frames are ordered by video (ascending number), then by frame
name; labeled = the first N frames, so labeled frames come from as few videos as possible and whole videos are
labeled before a video is split (near-duplicate neighbouring frames then rarely straddle the labeled/unlabeled
cut). RATIO r means round(r * 3550) frames; LABELED=N counts frames; the run's split.json notes how many videos
the labeled frames come from and whether one is partly labeled. The 221 "blacklisted" frames of RViMLab's
data.csv are not removed (the csv is not part of the download).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.spec import DatasetSpec
from datamodules.base import ListedData, SemiSupervisedDataModule, check_files_exist
from datamodules.listing import CADIS_TEST_VIDEOS, CADIS_TRAIN_VIDEOS, CADIS_VAL_VIDEOS, cadis_video_folder, png_stems
from datamodules.checks import report
from datamodules.nuclei import read_image
from datamodules.transforms import random_crop

TRAIN_VIDEOS, VAL_VIDEOS, TEST_VIDEOS = CADIS_TRAIN_VIDEOS, CADIS_VAL_VIDEOS, CADIS_TEST_VIDEOS
IGNORE = 255
ORIGINAL_CLASSES = 36

ORIGINAL_NAMES = (
    "Pupil", "Surgical Tape", "Hand", "Eye Retractors", "Iris", "Skin", "Cornea", "Hydrodissection Cannula",
    "Viscoelastic Cannula", "Capsulorhexis Cystotome", "Rycroft Cannula", "Bonn Forceps", "Primary Knife",
    "Phacoemulsifier Handpiece", "Lens Injector", "I/A Handpiece", "Secondary Knife", "Micromanipulator",
    "I/A Handpiece Handle", "Capsulorhexis Forceps", "Rycroft Cannula Handle", "Phaco Handpiece Handle",
    "Cap. Cystotome Handle", "Secondary Knife Handle", "Lens Injector Handle", "Suture Needle", "Needle Holder",
    "Charleux Cannula", "Primary Knife Handle", "Vitrectomy Handpiece", "Mendez Ring", "Marker",
    "Hydrodissection Cannula Handle", "Troutman Forceps", "Cotton", "Iris Hooks",
)
ANATOMY = ORIGINAL_NAMES[:7]

# task -> (class names, {new class: original classes}); originals not listed map to 255.
TASKS: dict[int, tuple[tuple[str, ...], dict[int, tuple[int, ...]]]] = {
    1: (ANATOMY + ("Instrument",), {**{c: (c,) for c in range(7)}, 7: tuple(range(7, 36))}),
    2: (
        ANATOMY + ("Cannula", "Cap. Cystotome", "Tissue Forceps", "Primary Knife", "Ph. Handpiece", "Lens Injector",
                   "I/A Handpiece", "Secondary Knife", "Micromanipulator", "Cap. Forceps"),
        {**{c: (c,) for c in range(7)}, 7: (7, 8, 10, 27, 20, 32), 8: (9, 22), 9: (11, 33), 10: (12, 28),
         11: (13, 21), 12: (14, 24), 13: (15, 18), 14: (16, 23), 15: (17,), 16: (19,)},
    ),
    3: (ORIGINAL_NAMES[:25], {c: (c,) for c in range(25)}),
}


def remap_table(task: int) -> np.ndarray:
    """A 256-entry lookup table: original class -> task class (255 = ignored); values above 35 stay invalid."""
    table = np.full(256, IGNORE, np.uint8)
    for new, originals in TASKS[task][1].items():
        table[list(originals)] = new
    return table


def cadis_spec(task: int) -> DatasetSpec:
    names = TASKS[task][0]
    return DatasetSpec(
        name="cadis" if task == 1 else f"cadis_task{task}",
        spatial_dims=2,
        in_channels=3,
        class_names=names,
        # The suite's crop; frames are 540 x 960, evaluated whole with a sliding window (stride 256).
        patch_size=(512, 512),
        eval_mode="sliding_window",
        eval_stride=(256, 256),
        labeled_counts={1.0: 3550},
        labeled_unit="frame",
        dice_include_background=True,
        ignore_index=None if task == 1 else IGNORE,
        eval_regions=tuple((name, (c,)) for c, name in enumerate(names)),  # class 0 (pupil) is a class too
        extra_metrics=("miou",),
        surface_metrics=False,
    )


CADIS_SPECS = {task: cadis_spec(task) for task in TASKS}
FRAME = re.compile(r"^Video(\d+)_frame\d+$")


video_folder = cadis_video_folder


def cadis_train_transform(rng: np.random.Generator, image, label, size):
    """Horizontal flip with p = 0.5, then a random crop (padded with zeros if the frame is smaller)."""
    if rng.random() < 0.5:
        image, label = image[:, ::-1], None if label is None else label[:, ::-1]
    return random_crop(rng, image, label, size)


class CaDISDataModule(SemiSupervisedDataModule):
    @property
    def task(self) -> int:
        return next(task for task, spec in CADIS_SPECS.items() if spec.class_names == self.spec.class_names)

    def read_split(self):
        frames: dict[str, list[str]] = {}
        for split, videos in (("train", TRAIN_VIDEOS), ("val", VAL_VIDEOS), ("test", TEST_VIDEOS)):
            frames[split] = []
            for number in videos:
                images = self.root / video_folder(number) / "Images"
                if not images.is_dir():
                    report(UserError(f"CaDIS video folder '{video_folder(number)}/Images' is missing", where=str(self.root),
                                     fix="DATA_ROOT is the 'segmentation' folder holding Video01 .. Video25"))
                    continue
                names = png_stems(images)
                wrong = [n for n in names if not FRAME.match(n) or int(FRAME.match(n).group(1)) != number]
                if wrong:
                    report(UserError(f"{len(wrong)} frame name(s) in {video_folder(number)} do not start with Video{number}_frame"
                                     f" (e.g. {wrong[0]})", where=str(images), fix="restore the original file names"))
                check_files_exist([self.label_path(n) for n in names], images)
                frames[split] += names
        units = [(name, [name]) for name in frames["train"]]
        return ListedData(units, frames["val"], frames["test"], listed_units=len(units))

    def split_notes(self, split):
        videos = sorted({int(FRAME.match(frame).group(1)) for frame in split.labeled})
        partial = [v for v in videos if any(int(FRAME.match(f).group(1)) == v for f in split.unlabeled)]
        return [f"{len(split.labeled)} labeled frames from {len(videos)} video(s) {videos}"
                + (f"; video {partial[0]} is partly labeled" if partial else "")]

    def image_path(self, frame: str) -> Path:
        return self.root / video_folder(int(FRAME.match(frame).group(1))) / "Images" / f"{frame}.png"

    def label_path(self, frame: str) -> Path:
        return self.root / video_folder(int(FRAME.match(frame).group(1))) / "Labels" / f"{frame}.png"

    def describe(self, kind, name):
        return str(self.label_path(name))

    def read_frame(self, frame: str, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        image = read_image(self.image_path(frame), "RGB")
        if not with_label:
            return image, None
        original = read_image(self.label_path(frame), "L")
        if original.max() >= ORIGINAL_CLASSES:
            raise UserError(f"label has values {sorted({int(v) for v in np.unique(original)} - set(range(ORIGINAL_CLASSES)))[:5]} "
                            f"beyond the {ORIGINAL_CLASSES} CaDIS classes 0..35", where=str(self.label_path(frame)),
                            fix="labels are the original single-channel PNGs (not colour visualisations)")
        if original.shape != image.shape[:2]:
            raise UserError(f"image {image.shape[:2]} and label {original.shape} differ in size", where=str(self.label_path(frame)),
                            fix="restore the frame's original label")
        return image, remap_table(self.task)[original]

    def load_item(self, item, with_label):
        image, label = self.read_frame(item, with_label)
        return image.astype(np.float32) / 255.0, label

    def train_transform(self, rng: np.random.Generator, image, label):
        return cadis_train_transform(rng, image, label, self.patch_size)

    def load_case(self, case_id):
        image, label = self.read_frame(case_id)
        return {"case": case_id, "image": np.moveaxis(image.astype(np.float32) / 255.0, -1, 0), "label": label, "spacing": None}
