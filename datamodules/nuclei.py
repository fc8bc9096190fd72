"""Cell nuclei in H&E / fluorescence images: MoNuSeg (as distributed for segmentation) and the 2018 Data Science
Bowl (docs/datasets.md#cell-nuclei). Binary nucleus-vs-background, RGB input; 2D random patches from large tiles for
training, a 2D sliding window over the whole image for evaluation; Dice and IoU (Jaccard), plus AJI as an extra column.

MoNuSeg (``monuseg``)::

    root/Train_Folder/img/<stem>.png|.tif     RGB tiles (1000 x 1000)
    root/Train_Folder/labelcol/<stem>.png     binary mask, 0 / 255, same stem
    root/Val_Folder/...   root/Test_Folder/...  (same two folders)

Labeled units are training tiles in sorted name order (MoNuSeg has no SSL convention: the first N sorted tiles are
labeled, the rest unlabeled); Val_Folder validates and Test_Folder tests. AJI's instances are the connected
components of the binary masks (touching nuclei merge; the XML polygons are not part of this form).

DSB 2018 stage 1 (``dsb2018``)::

    root/stage1_train/<image_id>/images/<image_id>.png   RGBA (alpha dropped)
    root/stage1_train/<image_id>/masks/<mask_id>.png     one binary PNG per nucleus, merged into one mask

(``root`` may also be the ``stage1_train`` folder itself.) The split is Duo-SegNet's with sorted names instead of
``os.listdir`` order (which depends on the file system): the first 80 % of the images train, the last 20 % test;
``data.val_holdout`` training images (last of the training part) validate. The per-nucleus masks give AJI its true
instances.

Intensities are scaled to [0, 1] (x / 255); no stain normalisation.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.spec import DatasetSpec
from datamodules.base import ListedData, SemiSupervisedDataModule, check_files_exist, report_foreign_files
from datamodules.checks import report
from datamodules.listing import (
    DSB_FOLDER, DSB_TRAIN_FRACTION, MONUSEG_SPLITS, NUCLEI_IMAGE_SUFFIXES, check_val_holdout, dsb_image_ids, dsb_images_folder,
    monuseg_tiles,
)
from datamodules.images import SIXTEEN_BIT_MAX, SIXTEEN_BIT_MODES, pixel_array
from datamodules.transforms import random_crop, random_rot_flip

IMAGE_SUFFIXES = NUCLEI_IMAGE_SUFFIXES

NUCLEI_SPEC = DatasetSpec(
    name="monuseg",
    spatial_dims=2,
    in_channels=3,
    class_names=("background", "nucleus"),
    patch_size=(256, 256),
    eval_mode="sliding_window",
    eval_stride=(128, 128),
    labeled_unit="image",
    extra_metrics=("aji",),
)
DSB_SPEC = replace(NUCLEI_SPEC, name="dsb2018")


def read_image(path: Path, mode: str, rescale: bool = True) -> np.ndarray:
    """An image file as an array (``mode`` "RGB" or "L"; 16-bit files rescaled to 8 bits unless ``rescale`` is false,
    datamodules/images.py); unreadable files are a UserError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if mode == "RGB" and image.mode not in ("RGB", "RGBA", "L", "P", "LA", "I", "F", *SIXTEEN_BIT_MODES):
                raise OSError(f"unexpected image mode {image.mode}")
            return pixel_array(image, mode, rescale)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image file ({error})", where=str(path),
                        fix="the file is corrupt, truncated or not an image: copy it again") from error


def read_binary_mask(path: Path) -> np.ndarray:
    """A 0/255 (or 0/1) mask as uint8 {0, 1}; other values are a UserError (a JPEG or a label map, not a mask)."""
    mask = read_image(path, "L", rescale=False)
    values = set(np.unique(mask).tolist())
    if not values <= {0, 255} and not values <= {0, 1} and not values <= {0, SIXTEEN_BIT_MAX}:
        raise UserError(
            f"mask has values {sorted(values)[:8]}{' ...' if len(values) > 8 else ''}; binary masks are 0 / 255",
            where=str(path), fix="masks must be lossless binary PNGs (0 background, 255 nucleus)")
    return (mask > 0).astype(np.uint8)


def nuclei_train_transform(rng: np.random.Generator, image, label, size):
    """rot90/flip, then a random patch of ``size`` (padded with zeros when the image is smaller)."""
    image, label = random_rot_flip(rng, image, label)
    return random_crop(rng, image, label, size)


class NucleiDataModule(SemiSupervisedDataModule):
    """What both nuclei layouts share: RGB items (H, W, 3) in [0, 1], binary labels, patches, channel-first cases."""

    def image_and_mask(self, item: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(RGB image uint8, binary mask uint8, instance map or None) of one image."""
        raise NotImplementedError

    def load_item(self, item, with_label):
        image, mask, _ = self.image_and_mask(item)
        return image.astype(np.float32) / 255.0, mask if with_label else None

    def train_transform(self, rng: np.random.Generator, image, label):
        return nuclei_train_transform(rng, image, label, self.patch_size)

    def load_case(self, case_id):
        image, mask, instances = self.image_and_mask(case_id)
        image = np.moveaxis(image.astype(np.float32) / 255.0, -1, 0)
        return {"case": case_id, "image": image, "label": mask, "instances": instances, "spacing": None}


class MoNuSegDataModule(NucleiDataModule):
    def __init__(self, *args, **kwargs):
        self._images: dict[tuple[str, str], Path] = {}
        self._split_of: dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def read_split(self):
        stems = {}
        for split, folder in MONUSEG_SPLITS.items():
            images = self.root / folder / "img"
            if not images.is_dir():
                report(UserError(f"MoNuSeg folder '{folder}/img' is missing", where=str(self.root),
                                 fix="DATA_ROOT holds Train_Folder/, Val_Folder/ and Test_Folder/, each with img/ and labelcol/"))
                stems[split] = []
                continue
            files = monuseg_tiles(images)
            report_foreign_files(images, IMAGE_SUFFIXES, "tiles")
            if not files:
                report(UserError(f"no images in '{folder}/img'", where=str(images), fix="copy the tiles (.png or .tif) into it"))
            stems[split] = [p.stem for p in files]
            self._images.update({(split, p.stem): p for p in files})
            check_files_exist([self.mask_path(split, stem) for stem in stems[split]], images)
        self._split_of = {stem: split for split, names in stems.items() for stem in names}
        units = [(stem, [stem]) for stem in stems["train"]]
        return ListedData(units, stems["val"], stems["test"], listed_units=len(units))

    def mask_path(self, split: str, stem: str) -> Path:
        return self.root / MONUSEG_SPLITS[split] / "labelcol" / f"{stem}.png"

    def describe(self, kind, name):
        split = self._split_of.get(name, "train")
        return str(self._images.get((split, name), self.root / MONUSEG_SPLITS[split] / "img" / name))

    def image_and_mask(self, item):
        split = self._split_of[item]
        image = read_image(self._images[(split, item)], "RGB")
        mask = read_binary_mask(self.mask_path(split, item))
        if mask.shape != image.shape[:2]:
            raise UserError(f"image {image.shape[:2]} and mask {mask.shape} differ in size", where=self.describe("item", item),
                            fix="the mask in labelcol/ must be the same tile's")
        return image, mask, None


class DSB2018DataModule(NucleiDataModule):
    def images_folder(self) -> Path:
        return dsb_images_folder(self.root)

    def read_split(self):
        folder = self.images_folder()
        ids = dsb_image_ids(folder)
        if len(ids) < 2:
            report(UserError(f"found {len(ids)} DSB image folders (<id>/images/<id>.png with <id>/masks/)", where=str(folder),
                             fix=f"DATA_ROOT is the folder holding {DSB_FOLDER}/ (or {DSB_FOLDER}/ itself)"))
            return ListedData([], [], [], 0)
        check_files_exist([self.image_path(i) for i in ids], folder)
        without_masks = [i for i in ids if not any((folder / i / "masks").glob("*.png"))]
        if without_masks:
            report(UserError(f"{len(without_masks)} image(s) have no masks/*.png (e.g. {without_masks[0]})", where=str(folder),
                             fix="use stage1_train (the labelled part of DSB 2018); stage1_test has no masks"))
        cut = int(len(ids) * DSB_TRAIN_FRACTION)
        train, test = ids[:cut], ids[cut:]
        keep = check_val_holdout(self.val_holdout, len(train), "images")
        return ListedData([(i, [i]) for i in train[:keep]], train[keep:], test, listed_units=len(train))

    def image_path(self, image_id: str) -> Path:
        return self.images_folder() / image_id / "images" / f"{image_id}.png"

    def describe(self, kind, name):
        return str(self.images_folder() / name)

    def image_and_mask(self, item):
        image = read_image(self.image_path(item), "RGB")
        instances = np.zeros(image.shape[:2], np.int32)
        for number, path in enumerate(sorted((self.images_folder() / item / "masks").glob("*.png")), start=1):
            nucleus = read_binary_mask(path)
            if nucleus.shape != instances.shape:
                raise UserError(f"mask {nucleus.shape} and image {instances.shape} differ in size", where=str(path),
                                fix="each mask must be the size of its image")
            instances[nucleus > 0] = number
        return image, (instances > 0).astype(np.uint8), instances
