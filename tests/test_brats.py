"""BraTS 2019: SSL4MIS preprocessing against hand-computed values, both on-disk forms, regions, verifier, smoke fits."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from benchmark.cli import main
from core.evaluation import Evaluator
from datamodules import get_dataset
from datamodules.base import resolve_labeled_count
from datamodules.brats import BRATS_REGIONS_SPEC, BRATS_SPEC, brain_box, clip_and_zscore, preprocess_case
from datamodules.synthetic_brats import RAW_FOLDER, write_brats_layout
from datamodules.verify import format_report, verify
from tests.conftest import run_smoke

TINY_BRATS = dict(n_train=4, n_val=1, n_test=1, shape=(28, 32, 30), seed=0)


@pytest.fixture(scope="module")
def brats_h5(tmp_path_factory) -> Path:
    return write_brats_layout(tmp_path_factory.mktemp("brats_h5"), form="h5", **TINY_BRATS)


@pytest.fixture(scope="module")
def brats_nifti(tmp_path_factory) -> Path:
    return write_brats_layout(tmp_path_factory.mktemp("brats_nifti"), form="nifti", **TINY_BRATS)


def datamodule(name: str, root: Path, **options):
    entry = get_dataset(name)
    defaults = dict(patch_size=(16, 16, 16), labeled_batch_size=2, unlabeled_batch_size=2, max_steps=2, seed=0,
                    num_workers=0, labeled=2)
    return entry.datamodule(entry.spec, root, **{**defaults, **options})


# ---- preprocessing (SSL4MIS brats_proprecessing.py) -------------------------------------------------------------
def test_brain_box_excludes_the_upper_end_like_the_reference_slicing():
    volume = np.zeros((6, 7, 8))
    volume[1, 2, 3] = volume[4, 5, 6] = 1
    assert brain_box([volume]) == (slice(1, 4), slice(2, 5), slice(3, 6))


def test_clip_at_the_999th_permille_then_zscore_over_the_positive_voxels():
    # 0 and 1..1000: the first value whose CDF reaches 0.999 is 999 (1000 of 1001 values are <= 999, 1000/1001 >= 0.999,
    # while 998 has 999/1001 = 0.998 < 0.999), so 1000 is clipped to 999.
    volume = np.arange(0, 1001, dtype=np.int16)
    out = clip_and_zscore(volume)
    positive = np.minimum(np.arange(1, 1001), 999).astype(np.float64)
    mean, std = positive.mean(), positive.std()
    assert mean == pytest.approx((500500 - 1000 + 999) / 1000)  # sum(1..1000) = 500500
    np.testing.assert_allclose(out[[0, 1, 999, 1000]], [(0 - mean) / std, (1 - mean) / std, (999 - mean) / std, (999 - mean) / std], rtol=1e-6)
    assert out.dtype == np.float32


def test_region_labels_map_enhancing_4_to_3():
    seg = np.zeros((3, 3, 5), np.uint8)
    seg[1, 1, :] = [0, 1, 2, 4, 0]
    volumes = {m: np.arange(1, seg.size + 1, dtype=np.int16).reshape(seg.shape) for m in ("t1", "t1ce", "t2", "flair")}
    image, label = preprocess_case(volumes, seg, ("t1", "t1ce", "t2", "flair"), regions=True)
    assert image.shape == (2, 2, 4, 4)  # (Z, Y, X, channels) after the exclusive crop
    assert label[1, 1].tolist() == [0, 1, 2, 3]
    _, whole = preprocess_case(volumes, seg, ("flair",), regions=False)
    assert whole[1, 1].tolist() == [0, 1, 1, 1] and whole.dtype == np.uint8


def test_published_labeled_counts():
    assert resolve_labeled_count(BRATS_SPEC, 250, 0.1, None) == 25
    assert resolve_labeled_count(BRATS_SPEC, 250, 0.2, None) == 50


# ---- both forms -------------------------------------------------------------------------------------------------
def test_the_two_forms_give_the_same_arrays(brats_h5, brats_nifti):
    from_h5, from_nifti = datamodule("brats", brats_h5), datamodule("brats", brats_nifti)
    assert from_h5.form == "h5" and from_nifti.form == "nifti"
    assert from_h5.split.labeled == (brats_h5 / "train.txt").read_text().split()[:2]
    case_h5, case_nifti = from_h5.cases("test")[0], from_nifti.cases("test")[0]
    np.testing.assert_array_equal(case_h5["image"], case_nifti["image"])
    np.testing.assert_array_equal(case_h5["label"], case_nifti["label"])
    assert case_h5["spacing"] == (1.0, 1.0, 1.0)


def test_raw_layout_has_the_release_folders(brats_nifti):
    case = (brats_nifti / "test.txt").read_text().split()[0]
    folders = list((brats_nifti / RAW_FOLDER).glob(f"*/{case}"))
    assert len(folders) == 1 and folders[0].parent.name in ("HGG", "LGG")
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == sorted(f"{case}_{k}.nii.gz" for k in ("flair", "seg", "t1", "t1ce", "t2"))
    seg = np.asanyarray(nib.load(folders[0] / f"{case}_seg.nii.gz").dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and seg.shape == tuple(reversed(TINY_BRATS["shape"]))


def test_multimodal_regions_batches_and_cases(brats_nifti):
    dm = datamodule("brats_regions", brats_nifti)
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert batch["labeled"]["image"].shape == (2, 4, 16, 16, 16)
    assert batch["unlabeled"]["image"].shape == (2, 4, 16, 16, 16)
    case = dm.cases("test")[0]
    assert case["image"].shape[0] == 4 and case["image"].shape[1:] == case["label"].shape
    assert set(np.unique(case["label"])) <= {0, 1, 2, 3}


def test_regions_are_scored_as_unions_of_classes():
    config = {"data": {"patch_size": [4, 4, 4]}, "eval": {"stride": None, "lcc": False, "use_spacing": False,
                                                           "empty_policy": "penalty", "window_batch": 1}}
    evaluator = Evaluator.from_config(BRATS_REGIONS_SPEC, config)
    label = np.array([[[0, 1, 2, 3]]])
    prediction = np.array([[[0, 1, 2, 2]]])
    rows = {row["class"]: row["dice"] for row in evaluator.score(prediction, label, None)}
    # WT: pred {1,2,3} = 3 voxels, gt 3 voxels, overlap 3 -> 1. TC {1,3}: pred 1 voxel, gt 2, overlap 1 -> 2/3.
    # ET {3}: pred empty, gt 1 voxel -> 0.
    assert rows == {"WT": 1.0, "TC": pytest.approx(2 / 3), "ET": 0.0}
    assert evaluator.dice_per_class(prediction, label) == [1.0, pytest.approx(2 / 3), 0.0]


# ---- verifier -----------------------------------------------------------------------------------------------------
def test_both_forms_verify_clean(brats_h5, brats_nifti):
    for name, root in (("brats", brats_h5), ("brats", brats_nifti), ("brats_regions", brats_nifti)):
        result = verify(name, root)
        assert result.ok, format_report(result)


def test_regions_refuse_the_h5_form(brats_h5):
    result = verify("brats_regions", brats_h5, deep=False)
    assert "needs the raw NIfTI form" in result.checks.problems[0].what


def test_broken_raw_cases(tmp_path, brats_nifti, capsys):
    copy = Path(shutil.copytree(brats_nifti, tmp_path / "BraTS"))
    train = (copy / "train.txt").read_text().split()
    folder = lambda case: next(copy.rglob(f"{case}_seg.nii.gz")).parent  # noqa: E731
    bad_seg = folder(train[0]) / f"{train[0]}_seg.nii.gz"
    image = nib.load(bad_seg)
    data = np.asanyarray(image.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, image.affine), bad_seg)
    truncated = folder(train[1]) / f"{train[1]}_flair.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (folder(train[2]) / f"{train[2]}_t1ce.nii.gz").unlink()
    assert main(["data", "verify", "brats_regions", str(copy)]) == 2
    out = capsys.readouterr().out
    assert "1 file(s) named in train.txt are missing" in out and f"{train[2]}_t1ce.nii.gz" in out
    assert main(["data", "verify", "brats", str(copy)]) == 2  # flair only: the missing t1ce does not matter
    out = capsys.readouterr().out
    assert "seg has values [3]; BraTS labels are 0, 1, 2 and 4" in out and str(bad_seg) in out
    assert "cannot read NIfTI file" in out and str(truncated) in out
    assert "missing" not in out


# ---- smoke fits --------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", ["supervised", "mean_teacher"])
def test_smoke_fit_synthetic_brats(tmp_path, method):
    assert run_smoke(tmp_path, "--method", method, "--dataset", "synthetic_brats", "--labeled", "4") == 0
    table = pd.read_csv(tmp_path / "lb" / "synthetic_brats.csv")
    assert table["checkpoint"].tolist() == ["last", "best"] and (table["status"] == "ok").all()
    assert "dice_WT" in table.columns


@pytest.mark.usefixtures("one_torch_thread")
def test_smoke_fit_regions_on_raw_nifti(tmp_path, brats_nifti):
    assert run_smoke(tmp_path, "--method", "mean_teacher", "--dataset", "brats_regions", "--data-root", str(brats_nifti),
                   "--labeled", "2") == 0
    table = pd.read_csv(tmp_path / "lb" / "brats_regions.csv")
    assert (table["status"] == "ok").all() and {"dice_WT", "dice_TC", "dice_ET"} <= set(table.columns)
