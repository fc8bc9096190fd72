"""CaDIS: task remappings, the split by video, the ignore index in loss and metrics, pooled mIoU, verifier, smoke fits."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from benchmark.cli import main
from core.evaluation import Evaluator, summarize
from datamodules import get_dataset
from datamodules.cadis import CADIS_SPECS, remap_table
from datamodules.synthetic_cadis import write_cadis_layout
from datamodules.verify import format_report, verify
from tests.conftest import run_smoke
from methods.losses import SupervisedSegmentationLoss


@pytest.fixture(scope="module")
def cadis_root(tmp_path_factory) -> Path:
    return write_cadis_layout(tmp_path_factory.mktemp("cadis") / "segmentation", frames_per_video=2, shape=(40, 64))


def datamodule(name: str, root: Path, **options):
    entry = get_dataset(name)
    defaults = dict(patch_size=(32, 32), labeled_batch_size=2, unlabeled_batch_size=2, max_steps=2, seed=0, num_workers=0)
    return entry.datamodule(entry.spec, root, **{**defaults, **options})


# ---- remapping (RViMLab utils/defaults.py, docs/datasets.md#cadis) ---------------------------------------------------
def test_task_one_keeps_anatomy_and_merges_every_instrument():
    table = remap_table(1)
    assert table[:7].tolist() == list(range(7)) and set(table[7:36].tolist()) == {7}
    assert CADIS_SPECS[1].num_classes == 8 and CADIS_SPECS[1].ignore_index is None


def test_task_two_merges_tools_with_their_handles_and_ignores_rare_classes():
    table = remap_table(2)
    expected = {7: 7, 8: 7, 10: 7, 27: 7, 20: 7, 32: 7, 9: 8, 22: 8, 11: 9, 33: 9, 12: 10, 28: 10, 13: 11, 21: 11,
                14: 12, 24: 12, 15: 13, 18: 13, 16: 14, 23: 14, 17: 15, 19: 16,
                25: 255, 26: 255, 29: 255, 30: 255, 31: 255, 34: 255, 35: 255}
    assert {k: int(table[k]) for k in expected} == expected and table[:7].tolist() == list(range(7))
    assert CADIS_SPECS[2].num_classes == 17 and CADIS_SPECS[2].ignore_index == 255


def test_task_three_keeps_25_classes_and_ignores_the_rest():
    table = remap_table(3)
    assert table[:25].tolist() == list(range(25)) and set(table[25:36].tolist()) == {255}
    assert CADIS_SPECS[3].num_classes == 25 and CADIS_SPECS[3].class_names[24] == "Lens Injector Handle"


# ---- split ----------------------------------------------------------------------------------------------------------
def test_split_by_video_and_labeled_frames_in_video_order(cadis_root):
    dm = datamodule("cadis_task2", cadis_root, labeled=3)
    video = lambda frame: int(frame.split("_")[0][5:])  # noqa: E731
    assert {video(f) for f in dm.split.val} == {5, 7, 16} and {video(f) for f in dm.split.test} == {2, 12, 22}
    train_videos = [video(f) for f in dm.split.labeled + dm.split.unlabeled]
    assert train_videos == sorted(train_videos) and set(train_videos) == {1, 3, 4, 6, 8, 9, 10, 11, 13, 14, 15, 17, 18, 19, 20, 21, 23, 24, 25}
    assert dm.split.labeled == ["Video1_frame000090", "Video1_frame000095", "Video3_frame000090"]
    assert dm.split.unit == "frame" and dm.split.total_units == 38
    assert dm.split.notes == ["3 labeled frames from 2 video(s) [1, 3]; video 3 is partly labeled"]
    case = dm.cases("val")[0]
    original = np.asarray(Image.open(cadis_root / "Video05" / "Labels" / f"{case['case']}.png"))
    np.testing.assert_array_equal(case["label"], remap_table(2)[original])
    assert case["image"].shape == (3, 40, 64)


# ---- ignore index -----------------------------------------------------------------------------------------------
def test_supervised_loss_ignores_the_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 1, 4, requires_grad=True)
    labels = torch.tensor([[[0, 2, 255, 1]]])
    loss = SupervisedSegmentationLoss(ignore_index=255)(logits, labels)
    loss.backward()
    assert torch.all(logits.grad[..., 2] == 0)  # the ignored pixel gets no gradient
    # Reference: the same loss on the three valid pixels alone (the plain path, without an ignore index).
    valid = logits.detach()[..., [0, 1, 3]]
    reference = SupervisedSegmentationLoss()(valid, torch.tensor([[[0, 2, 1]]]))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_metrics_ignore_pixels_and_pool_the_miou():
    spec = CADIS_SPECS[2]
    config = {"data": {"patch_size": [4, 4]}, "eval": {"stride": None, "lcc": False, "use_spacing": False,
                                                       "empty_policy": "penalty", "window_batch": 1}}
    evaluator = Evaluator.from_config(spec, config)
    label = np.array([[0, 0, 255, 1]])
    prediction = np.array([[0, 1, 0, 1]])  # the 0 predicted at the ignored pixel is not a false positive
    rows = {row["class"]: row for row in evaluator.score(prediction, label, None)}
    assert rows["Pupil"]["dice"] == pytest.approx(2 / 3) and rows["Pupil"]["_intersection"] == 1 and rows["Pupil"]["_union"] == 2
    assert rows["Surgical Tape"]["jaccard"] == pytest.approx(1 / 2)
    assert rows["Hand"]["dice"] == 1.0 and rows["Hand"]["_union"] == 0  # absent from both: not in the pooled mIoU
    assert "hd95" not in rows["Pupil"]
    # Pooled over two frames: Pupil I/U = (1 + 3) / (2 + 3) = 0.8, Tape (1 + 0) / (2 + 2) = 0.25 -> mIoU 0.525.
    per_case = pd.DataFrame([
        {"case": "a", "class": "Pupil", "dice": 0.0, "jaccard": 0.0, "_intersection": 1, "_union": 2},
        {"case": "a", "class": "Tape", "dice": 0.0, "jaccard": 0.0, "_intersection": 1, "_union": 2},
        {"case": "b", "class": "Pupil", "dice": 0.0, "jaccard": 0.0, "_intersection": 3, "_union": 3},
        {"case": "b", "class": "Tape", "dice": 0.0, "jaccard": 0.0, "_intersection": 0, "_union": 2},
        {"case": "b", "class": "Hand", "dice": 1.0, "jaccard": 1.0, "_intersection": 0, "_union": 0},
    ])
    summary = summarize(per_case)
    assert summary["miou"] == pytest.approx(0.525) and "_union" not in summary


# ---- verifier ---------------------------------------------------------------------------------------------------
def test_fixture_verifies_clean_for_every_task(cadis_root):
    for name in ("cadis", "cadis_task2", "cadis_task3"):
        result = verify(name, cadis_root)
        assert result.ok, format_report(result)


def test_broken_copy(tmp_path, cadis_root, capsys):
    copy = Path(shutil.copytree(cadis_root, tmp_path / "segmentation"))
    bad = copy / "Video01" / "Labels" / "Video1_frame000090.png"
    label = np.asarray(Image.open(bad)).copy()
    label[0, 0] = 40
    Image.fromarray(label).save(bad)
    assert main(["data", "verify", "cadis", str(copy)]) == 2
    out = capsys.readouterr().out
    assert "label has values [40] beyond the 36 CaDIS classes 0..35" in out and str(bad) in out
    (copy / "Video03" / "Labels" / "Video3_frame000095.png").unlink()
    shutil.rmtree(copy / "Video22")
    assert main(["data", "verify", "cadis", str(copy)]) == 2
    out = capsys.readouterr().out
    assert "CaDIS video folder 'Video22/Images' is missing" in out
    assert "1 file(s) named in Images are missing" in out and "Video3_frame000095.png" in out


# ---- smoke fits --------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", ["supervised", "mean_teacher"])
def test_smoke_fit_task_two(tmp_path, cadis_root, method):
    assert run_smoke(tmp_path, "--method", method, "--dataset", "cadis_task2", "--data-root", str(cadis_root),
                     "--labeled", "4") == 0
    table = pd.read_csv(tmp_path / "lb" / "cadis_task2.csv")
    assert (table["status"] == "ok").all() and table["miou"].between(0, 1).all() and "dice_Pupil" in table.columns


def test_methods_that_read_labels_themselves_refuse_ignored_pixels(tmp_path, cadis_root, capsys):
    assert run_smoke(tmp_path, "--method", "mc_net_plus", "--dataset", "cadis_task2", "--data-root", str(cadis_root),
                     "--labeled", "4") == 2
    assert "MCNetPlus does not handle the ignored label 255 of cadis_task2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything is written
