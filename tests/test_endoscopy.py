"""The Kvasir-layout endoscopy DataModule: split files, RGB loading, JPEG masks, whole-image evaluation, pooled F1,
the synthetic_kvasir writer against the real layout, and the real Kvasir-SEG copy."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.errors import UserError
from core.evaluation import Evaluator, pooled_f1, summarize
from core.inference import predict_whole_image
from datamodules.endoscopy import IMAGENET_MEAN, IMAGENET_STD, KVASIR_SEG_SPEC, KvasirDataModule
from datamodules.synthetic_kvasir import write_kvasir_layout
from tests.conftest import require_real_kvasir

TINY_KVASIR = dict(n_train=8, n_val=2, n_test=3, shape=(40, 52), seed=0)


@pytest.fixture(scope="module")
def kvasir_root(tmp_path_factory) -> Path:
    return write_kvasir_layout(tmp_path_factory.mktemp("kvasir"), **TINY_KVASIR)


def kvasir(root, **options) -> KvasirDataModule:
    defaults = dict(patch_size=(32, 48), labeled_batch_size=2, unlabeled_batch_size=2, max_steps=3, seed=0, num_workers=0)
    return KvasirDataModule(KVASIR_SEG_SPEC, root, **{**defaults, **options})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ---- the synthetic layout ------------------------------------------------------------------------------------------
def test_synthetic_layout_files_and_lists(kvasir_root):
    train, val, test = (lines(kvasir_root / f"{s}.txt") for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (8, 2, 3)
    ids = train + val + test
    assert len(set(ids)) == len(ids) and all(len(i) == 25 and i.isalnum() and i.islower() for i in ids)
    assert (kvasir_root / "train.txt").read_bytes().endswith(b"\n") and b"\r" not in (kvasir_root / "train.txt").read_bytes()
    assert sorted(p.stem for p in (kvasir_root / "images").iterdir()) == sorted(ids)
    assert sorted(p.name for p in (kvasir_root / "masks").iterdir()) == sorted(f"{i}.jpg" for i in ids)
    for image_id in ids[:3]:
        with Image.open(kvasir_root / "images" / f"{image_id}.jpg") as image, Image.open(kvasir_root / "masks" / f"{image_id}.jpg") as mask:
            assert image.format == mask.format == "JPEG" and image.mode == mask.mode == "RGB"  # as Kvasir-SEG
            assert image.size == mask.size and image.size != (48, 32)
            grey = np.asarray(mask.convert("L"))
            assert 0 < (grey >= 128).mean() < 0.5  # a polyp, not the whole frame
            assert len(np.unique(grey)) > 2  # lossy: values near 0 and 255, hence the threshold


def test_synthetic_writer_is_deterministic(tmp_path):
    a = write_kvasir_layout(tmp_path / "a", **TINY_KVASIR)
    b = write_kvasir_layout(tmp_path / "b", **TINY_KVASIR)
    assert lines(a / "train.txt") == lines(b / "train.txt")
    first = lines(a / "train.txt")[0]
    assert (a / "images" / f"{first}.jpg").read_bytes() == (b / "images" / f"{first}.jpg").read_bytes()


@pytest.mark.real_data
def test_synthetic_layout_matches_the_real_copy(kvasir_root):
    real = require_real_kvasir()
    for name in ("train.txt", "val.txt", "test.txt"):
        real_ids, ours = lines(real / name), lines(kvasir_root / name)
        assert {len(i) for i in real_ids} == {len(i) for i in ours} == {25}
        assert (real / name).read_bytes().endswith(b"\n") and b"\r" not in (real / name).read_bytes()
    real_id, our_id = lines(real / "train.txt")[0], lines(kvasir_root / "train.txt")[0]
    for folder in ("images", "masks"):
        with Image.open(real / folder / f"{real_id}.jpg") as r, Image.open(kvasir_root / folder / f"{our_id}.jpg") as o:
            assert (r.format, r.mode) == (o.format, o.mode)


# ---- the DataModule ------------------------------------------------------------------------------------------------
def test_labeled_set_is_the_first_ids_of_train_txt(kvasir_root):
    dm = kvasir(kvasir_root, labeled=3)
    train = lines(kvasir_root / "train.txt")
    assert dm.split.labeled == dm.split.labeled_units == train[:3] and dm.split.unlabeled == train[3:]
    assert dm.split.val == lines(kvasir_root / "val.txt") and dm.split.test == lines(kvasir_root / "test.txt")
    assert dm.split.unit == "image" and kvasir(kvasir_root, ratio=0.5).split.labeled_count == 4


def test_training_batches_are_normalised_rgb_with_binary_labels(kvasir_root):
    dm = kvasir(kvasir_root, labeled=3)
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    image, label = batch["labeled"]["image"], batch["labeled"]["label"]
    assert image.shape == (2, 3, 32, 48) and image.dtype == torch.float32
    assert label.shape == (2, 32, 48) and set(label.unique().tolist()) <= {0, 1}
    assert batch["unlabeled"]["image"].shape == (2, 3, 32, 48) and set(batch["unlabeled"]) == {"image"}
    assert image.min() < -1.0  # ImageNet-normalised, not [0, 1]


def test_cases_keep_their_size_and_match_the_files(kvasir_root):
    dm = kvasir(kvasir_root, labeled=3)
    case = dm.cases("test")[0]
    path = kvasir_root / "images" / f"{case['case']}.jpg"
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    expected = (rgb.transpose(2, 0, 1) - np.reshape(IMAGENET_MEAN, (3, 1, 1))) / np.reshape(IMAGENET_STD, (3, 1, 1))
    np.testing.assert_allclose(case["image"], expected, rtol=1e-5, atol=1e-5)
    with Image.open(kvasir_root / "masks" / f"{case['case']}.jpg") as mask:
        np.testing.assert_array_equal(case["label"], (np.asarray(mask.convert("L")) >= 128).astype(np.uint8))
    assert case["spacing"] is None


def test_png_masks_of_kvasir_instrument(tmp_path):
    root = write_kvasir_layout(tmp_path, **{**TINY_KVASIR, "mask_format": "png"})
    case = kvasir(root, labeled=2).cases("val")[0]
    assert set(np.unique(case["label"]).tolist()) == {0, 1}


def test_missing_mask_and_list_are_user_errors(tmp_path, kvasir_root):
    copy = Path(shutil.copytree(kvasir_root, tmp_path / "copy"))
    victim = lines(copy / "test.txt")[0]
    (copy / "masks" / f"{victim}.jpg").unlink()
    with pytest.raises(UserError, match="named in test.txt are missing") as error:
        kvasir(copy, ratio=0.5)
    assert victim in error.value.message
    (copy / "val.txt").unlink()
    with pytest.raises(UserError, match="missing val list file"):
        kvasir(copy, ratio=0.5)


def test_corrupt_image_is_a_user_error(tmp_path, kvasir_root):
    copy = Path(shutil.copytree(kvasir_root, tmp_path / "copy"))
    dm = kvasir(copy, ratio=0.5)
    victim = copy / "images" / f"{dm.split.test[0]}.jpg"
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot read image") as error:
        dm.load_case(dm.split.test[0])
    assert str(victim) in error.value.message


# ---- whole-image evaluation and pooled F1 ---------------------------------------------------------------------------
def test_whole_image_prediction_resizes_in_and_back():
    seen = []

    def predictor(batch):
        seen.append(tuple(batch.shape))
        logits = torch.zeros(batch.shape[0], 2, *batch.shape[2:])
        logits[:, 1, :, batch.shape[3] // 2 :] = 1.0  # right half foreground at the training size
        return logits

    prediction = predict_whole_image(predictor, np.zeros((3, 30, 50), np.float32), (16, 24))
    assert seen == [(1, 3, 16, 24)] and prediction.shape == (30, 50) and prediction.dtype == np.uint8
    assert prediction[:, :24].max() == 0 and prediction[:, 26:].min() == 1  # the half-way edge scaled back


def test_pooled_f1_by_hand():
    # image a: TP 3, FP 1, FN 0; image b: TP 0, FP 0, FN 4  -> pooled 2*3 / (2*3 + 1 + 4) = 6/11,
    # while the per-image mean Dice is (6/7 + 0) / 2.
    per_case = pd.DataFrame([
        {"case": "a", "class": "polyp", "dice": 6 / 7, "jaccard": 0.75, "hd95": 1.0, "asd": 0.5, "_intersection": 3, "_union": 4},
        {"case": "b", "class": "polyp", "dice": 0.0, "jaccard": 0.0, "hd95": 9.0, "asd": 9.0, "_intersection": 0, "_union": 4},
    ])
    assert pooled_f1(per_case) == pytest.approx(6 / 11)
    summary = summarize(per_case)
    assert summary["pooled_f1"] == pytest.approx(6 / 11) and summary["dice"] == pytest.approx(3 / 7)


def test_evaluator_records_counts_for_the_pooled_f1(kvasir_root):
    dm = kvasir(kvasir_root, labeled=3)
    config = {"data": {"patch_size": [32, 48]}, "eval": {"lcc": False, "use_spacing": False, "empty_policy": "penalty", "window_batch": 4, "stride": None}}
    evaluator = Evaluator.from_config(KVASIR_SEG_SPEC, config)
    everything = lambda batch: torch.stack([torch.zeros(batch.shape[0], *batch.shape[2:]), torch.ones(batch.shape[0], *batch.shape[2:])], 1)  # noqa: E731
    per_case = evaluator.evaluate(everything, dm.cases("test"), progress=False)
    labels = [dm.cases("test")[i]["label"] for i in range(3)]
    assert per_case["_intersection"].tolist() == [int(l.sum()) for l in labels]
    assert per_case["_union"].tolist() == [int(l.size) for l in labels]


# ---- real data -----------------------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_kvasir_counts_and_loading():
    root = require_real_kvasir()
    dm = kvasir(root, ratio=0.5)
    assert dm.split.total_units == 800 and len(dm.split.val) == 100 and len(dm.split.test) == 100
    assert dm.split.labeled_count == 400 and len(dm.split.unlabeled) == 400
    assert dm.split.labeled[0] == lines(root / "train.txt")[0]
    case = dm.cases("test")[0]
    assert case["image"].shape[0] == 3 and case["image"].shape[1:] == case["label"].shape
    assert 0 < case["label"].mean() < 1
