"""Nuclei: AJI against hand-computed values, the MoNuSeg and DSB 2018 layouts, the verifier and smoke fits."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmark.cli import main
from core.evaluation import Evaluator, summarize
from core.metrics import aggregated_jaccard_index
from datamodules import get_dataset
from datamodules.nuclei import NUCLEI_SPEC
from datamodules.synthetic_nuclei import write_dsb_layout, write_monuseg_layout
from datamodules.verify import format_report, verify
from tests.conftest import run_smoke


@pytest.fixture(scope="module")
def monuseg_root(tmp_path_factory) -> Path:
    # A root with a space in its name, TIFF tiles as in the original release.
    return write_monuseg_layout(tmp_path_factory.mktemp("nuclei") / "MoNuSeg 2018", n_train=4, n_val=1, n_test=2,
                                shape=(72, 80), image_suffix=".tif")


@pytest.fixture(scope="module")
def dsb_root(tmp_path_factory) -> Path:
    return write_dsb_layout(tmp_path_factory.mktemp("dsb"), n_images=6, shape=(48, 56))


def datamodule(name: str, root: Path, **options):
    entry = get_dataset(name)
    defaults = dict(patch_size=(32, 32), labeled_batch_size=2, unlabeled_batch_size=2, max_steps=2, seed=0,
                    num_workers=0, labeled=2)
    return entry.datamodule(entry.spec, root, **{**defaults, **options})


# ---- AJI ---------------------------------------------------------------------------------------------------------
def test_aji_hand_computed():
    gt = np.zeros((4, 6), int)
    gt[0, 0:4] = 1          # A: 4 pixels
    gt[3, 4:6] = 2          # B: 2 pixels, no prediction touches it
    pred = np.zeros((4, 6), int)
    pred[0, 0:4] = 7        # P1 covers A ...
    pred[1, 0:2] = 7        # ... plus 2 more pixels: |P1| = 6
    pred[2, 5] = 3          # P2: 1 pixel, paired with nothing
    # A pairs with P1: C = 4, U = |A u P1| = 6; B has no overlap: U += 2; P2 unpaired: U += 1 -> 4 / 9.
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(4 / 9)


def test_aji_one_prediction_serving_two_nuclei():
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[5, 5, 5, 5]])
    # Both A and B pair with P (|A n P| = 2, |A u P| = 4 each): (2 + 2) / (4 + 4).
    assert aggregated_jaccard_index(pred, gt) == 0.5


def test_aji_perfect_and_empty():
    gt = np.array([[0, 1, 1, 0, 2]])
    assert aggregated_jaccard_index(gt * 3, gt) == 1.0  # instance numbers need not match
    empty = np.zeros_like(gt)
    assert aggregated_jaccard_index(empty, empty) == 1.0
    assert aggregated_jaccard_index(empty, empty, "literature") == 0.0
    assert aggregated_jaccard_index(empty, gt) == 0.0 and aggregated_jaccard_index(gt, empty) == 0.0


def test_evaluator_adds_an_aji_column_from_instances_or_components():
    config = {"data": {"patch_size": [4, 4]}, "eval": {"stride": None, "lcc": False, "use_spacing": False,
                                                       "empty_policy": "penalty", "window_batch": 1}}
    evaluator = Evaluator.from_config(NUCLEI_SPEC, config)
    label = np.array([[1, 1, 1, 1]])
    prediction = np.array([[1, 1, 1, 1]])
    # Without instances the touching nuclei are one component: AJI 1. With the true instances (two nuclei,
    # one predicted blob): (2 + 2) / (4 + 4).
    assert evaluator.score(prediction, label, None)[0]["aji"] == 1.0
    assert evaluator.score(prediction, label, None, np.array([[1, 1, 2, 2]]))[0]["aji"] == 0.5
    per_case = pd.DataFrame([{"case": "a", "class": "nucleus", "dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "aji": 0.5}])
    assert summarize(per_case)["aji"] == 0.5


# ---- layouts ------------------------------------------------------------------------------------------------------
def test_monuseg_split_batches_and_cases(monuseg_root):
    dm = datamodule("monuseg", monuseg_root)
    stems = sorted(p.stem for p in (monuseg_root / "Train_Folder" / "img").iterdir())
    assert dm.split.labeled == stems[:2] and dm.split.unlabeled == stems[2:]
    assert dm.split.val == [p.stem for p in (monuseg_root / "Val_Folder" / "img").iterdir()]
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert batch["labeled"]["image"].shape == (2, 3, 32, 32) and batch["labeled"]["image"].max() <= 1.0
    assert set(batch["labeled"]["label"].unique().tolist()) <= {0, 1}
    case = dm.cases("test")[0]
    assert case["image"].shape == (3, 72, 80) and case["label"].shape == (72, 80)
    mask = np.asarray(Image.open(monuseg_root / "Test_Folder" / "labelcol" / f"{case['case']}.png"))
    np.testing.assert_array_equal(case["label"], mask // 255)


def test_dsb_split_merges_the_nucleus_masks(dsb_root):
    dm = datamodule("dsb2018", dsb_root, val_holdout=1)
    ids = sorted(p.name for p in (dsb_root / "stage1_train").iterdir())
    assert dm.split.labeled + dm.split.unlabeled + dm.split.val == ids[:4] and dm.split.test == ids[4:]
    assert dm.split.val == [ids[3]]
    case = dm.cases("test")[0]
    masks = [np.asarray(Image.open(p)) > 0 for p in sorted((dsb_root / "stage1_train" / case["case"] / "masks").iterdir())]
    np.testing.assert_array_equal(case["label"], np.any(masks, axis=0))
    assert case["instances"].max() == len(masks)
    # The stage1_train folder itself is accepted as the root.
    assert datamodule("dsb2018", dsb_root / "stage1_train").split.test == ids[4:]


# ---- verifier ----------------------------------------------------------------------------------------------------
def test_fixtures_verify_clean(monuseg_root, dsb_root):
    for name, root in (("monuseg", monuseg_root), ("dsb2018", dsb_root)):
        result = verify(name, root)
        assert result.ok, format_report(result)


def test_broken_monuseg(tmp_path, monuseg_root, capsys):
    copy = Path(shutil.copytree(monuseg_root, tmp_path / "MoNuSeg 2018"))
    stems = sorted(p.stem for p in (copy / "Train_Folder" / "img").iterdir())
    grey = copy / "Train_Folder" / "labelcol" / f"{stems[0]}.png"
    mask = np.asarray(Image.open(grey)).copy()
    mask[0, 0] = 128
    Image.fromarray(mask).save(grey)
    (copy / "Train_Folder" / "labelcol" / f"{stems[1]}.png").unlink()
    truncated = copy / "Test_Folder" / "img" / next((copy / "Test_Folder" / "img").iterdir()).name
    truncated.write_bytes(truncated.read_bytes()[:200])
    small = copy / "Val_Folder" / "labelcol" / next((copy / "Val_Folder" / "labelcol").iterdir()).name
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    assert main(["data", "verify", "monuseg", str(copy)]) == 2
    out = capsys.readouterr().out
    assert "1 file(s) named in img are missing" in out and f"{stems[1]}.png" in out
    assert "deep checks skipped until the layout problems are fixed" in out
    assert main(["data", "verify", "monuseg", str(copy), "--layout-only"]) == 2
    capsys.readouterr()
    (copy / "Train_Folder" / "img" / next(p for p in (copy / "Train_Folder" / "img").iterdir() if p.stem == stems[1]).name).unlink()
    assert main(["data", "verify", "monuseg", str(copy)]) == 2
    out = capsys.readouterr().out
    assert "mask has values [0, 128, 255]; binary masks are 0 / 255" in out and str(grey) in out
    assert "cannot read image file" in out and str(truncated) in out
    assert "image (72, 80) and mask (10, 10) differ in size" in out
    assert "FAILED: 3 problem(s)" in out


def test_dsb_without_masks(tmp_path, dsb_root):
    copy = Path(shutil.copytree(dsb_root, tmp_path / "dsb"))
    victim = sorted((copy / "stage1_train").iterdir())[0]
    shutil.rmtree(victim / "masks")
    result = verify("dsb2018", copy, deep=False)
    assert "1 image(s) have no masks/*.png" in result.checks.problems[0].what


# ---- smoke fits --------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", ["supervised", "mean_teacher"])
def test_smoke_fit_synthetic_monuseg(tmp_path, method):
    assert run_smoke(tmp_path, "--method", method, "--dataset", "synthetic_monuseg", "--labeled", "3") == 0
    table = pd.read_csv(tmp_path / "lb" / "synthetic_monuseg.csv")
    assert (table["status"] == "ok").all() and table["aji"].between(0, 1).all() and "dice_nucleus" in table.columns


@pytest.mark.usefixtures("one_torch_thread")
def test_smoke_fit_dsb(tmp_path, dsb_root):
    assert run_smoke(tmp_path, "--method", "supervised", "--dataset", "dsb2018", "--data-root", str(dsb_root), "--labeled", "2") == 0
    assert (pd.read_csv(tmp_path / "lb" / "dsb2018.csv")["status"] == "ok").all()
