"""Converters on tiny generated raw downloads: the output has the canonical layout (it verifies clean), the published
preprocessing (checked by hand on the arrays) and the source geometry in its h5 attributes."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from benchmark.cli import main
from datamodules.convert import ACDC_TEST_PATIENTS, ACDC_VAL_PATIENTS, LA_OUTPUT_SIZE, ua_mt_crop
from datamodules.synthetic_brats import write_brats_layout
from datamodules.verify import format_report, verify


def write_image(path: Path, array_zyx: np.ndarray, spacing_xyz) -> None:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def h5(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


# ---- LA -----------------------------------------------------------------------------------------------------------
def write_la_raw(root: Path, count: int, shape_xyz=(150, 140, 12)) -> list[str]:
    rng = np.random.default_rng(1)
    ids = [f"CASE{i:02d}XXXXXXXXXXXXXX" for i in range(count)]
    for case in ids:
        x, y, z = np.indices(shape_xyz)
        blob = ((x - 70) / 30) ** 2 + ((y - 65) / 25) ** 2 + ((z - 6) / 5) ** 2 < 1
        image = np.clip(rng.normal(60, 15, shape_xyz) + 100 * blob, 0, 255).astype(np.uint8)
        folder = root / "2018LA_Seg_Training Set" / case
        write_image(folder / "lgemri.nrrd", image.transpose(2, 1, 0), (0.625,) * 3)
        write_image(folder / "laendo.nrrd", (blob * 255).astype(np.uint8).transpose(2, 1, 0), (0.625,) * 3)
    return ids


def test_ua_mt_crop_margins_and_widening():
    label = np.zeros((300, 300, 4), np.uint8)
    label[100:151, 120:131] = 1  # x extent max - min = 50, y extent 10: both narrower than 112
    box_x, box_y = ua_mt_crop(label, np.random.default_rng(0))
    # widen = (112 - 50) // 2 = 31 and (112 - 10) // 2 = 51 on each side, plus a margin of 10..19.
    assert 100 - 31 - 19 <= box_x.start <= 100 - 31 - 10 and 150 + 31 + 10 <= box_x.stop <= 150 + 31 + 19
    assert 120 - 51 - 19 <= box_y.start <= 120 - 51 - 10 and 130 + 51 + 10 <= box_y.stop <= 130 + 51 + 19
    assert box_x.stop - box_x.start >= LA_OUTPUT_SIZE[0] and box_y.stop - box_y.start >= LA_OUTPUT_SIZE[1]


def test_la_conversion(tmp_path):
    ids = write_la_raw(tmp_path / "raw", 5)
    assert main(["data", "convert", "la", str(tmp_path / "raw"), str(tmp_path / "LA")]) == 0
    result = verify("la", tmp_path / "LA")
    assert result.ok, format_report(result)
    assert (tmp_path / "LA" / "train.list").read_text().split() == ids[:4]
    arrays, attrs = h5(tmp_path / "LA" / "2018LA_Seg_Training Set" / ids[0] / "mri_norm2.h5")
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "raw" / "2018LA_Seg_Training Set" / ids[0] / "lgemri.nrrd")))
    raw = raw.transpose(2, 1, 0).astype(np.float64)
    x0, x1, y0, y1, z0, z1 = attrs["crop"]
    assert (z0, z1) == (0, 12)  # z is not cropped
    expected = ((raw - raw.mean()) / raw.std())[x0:x1, y0:y1]  # z-scored over the whole volume, then cropped
    np.testing.assert_allclose(arrays["image"], expected, rtol=1e-5, atol=1e-5)
    assert arrays["image"].dtype == np.float32 and arrays["label"].dtype == np.uint8
    assert set(np.unique(arrays["label"])) == {0, 1} and tuple(attrs["spacing"]) == (0.625,) * 3


def test_converter_refuses_a_non_empty_output(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    (tmp_path / "raw").mkdir()
    assert main(["data", "convert", "la", str(tmp_path / "raw"), str(tmp_path / "out")]) == 2
    assert "the output folder is not empty" in capsys.readouterr().err


# ---- ACDC ---------------------------------------------------------------------------------------------------------
def write_acdc_raw(root: Path, patients: list[int]) -> None:
    rng = np.random.default_rng(2)
    for number in patients:
        folder = root / "database" / "training" / f"patient{number:03d}"
        folder.mkdir(parents=True)
        ed, es = (1, 12) if number != 90 else (4, 11)  # patient090: the first labelled frame is frame04
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
        for frame in (ed, es):
            z, y, x = np.indices((5, 30, 26))
            label = np.zeros((5, 30, 26), np.uint8)
            label[((y - 15) ** 2 + (x - 13) ** 2) < 64] = 2
            label[((y - 15) ** 2 + (x - 13) ** 2) < 25] = 3
            label[((y - 15) ** 2 + (x - 3) ** 2) < 9] = 1
            image = (rng.normal(100, 10, label.shape) + 50 * label + 3 * z).astype(np.int16)
            write_image(folder / f"patient{number:03d}_frame{frame:02d}.nii.gz", image, (1.5, 1.5, 10.0))
            write_image(folder / f"patient{number:03d}_frame{frame:02d}_gt.nii.gz", label, (1.5, 1.5, 10.0))


def test_acdc_conversion(tmp_path):
    patients = [1, 2, 3, 4, 90]
    write_acdc_raw(tmp_path / "raw", patients)
    assert main(["data", "convert", "acdc", str(tmp_path / "raw"), str(tmp_path / "ACDC")]) == 0
    out = tmp_path / "ACDC"
    result = verify("acdc", out)
    assert result.ok, format_report(result)
    assert 1 in ACDC_TEST_PATIENTS and 2 in ACDC_VAL_PATIENTS
    assert (out / "test.list").read_text().split() == ["patient001_frame01", "patient001_frame02"]
    assert (out / "val.list").read_text().split() == ["patient002_frame01", "patient002_frame02"]
    assert sorted((out / "train.list").read_text().split()) == [f"patient{p:03d}_frame0{f}" for p in (3, 4, 90) for f in (1, 2)]
    slices = (out / "train_slices.list").read_text().split()
    assert len(slices) == 3 * 2 * 5 and min(int(s.rsplit("_", 1)[1]) for s in slices) == 1  # numbered from 1
    arrays, attrs = h5(out / "data" / "patient090_frame01.h5")
    assert attrs["source_frame"] == 4 and tuple(attrs["spacing"]) == (10.0, 1.5, 1.5)  # (z, y, x) like the array
    assert arrays["image"].min() == 0.0 and arrays["image"].max() == 1.0 and arrays["image"].shape == (5, 30, 26)
    slice_arrays, _ = h5(out / "data" / "slices" / "patient090_frame02_slice_3.h5")
    volume, _ = h5(out / "data" / "patient090_frame02.h5")
    np.testing.assert_array_equal(slice_arrays["image"], volume["image"][2])


# ---- BraTS --------------------------------------------------------------------------------------------------------
def test_brats_conversion_equals_the_raw_loader(tmp_path):
    raw = write_brats_layout(tmp_path / "raw", form="nifti", n_train=2, n_val=1, n_test=1, shape=(24, 28, 26))
    assert main(["data", "convert", "brats", str(raw), str(tmp_path / "BraTS2019")]) == 0
    result = verify("brats", tmp_path / "BraTS2019")
    assert result.ok, format_report(result)
    reference = write_brats_layout(tmp_path / "h5", form="h5", n_train=2, n_val=1, n_test=1, shape=(24, 28, 26))
    case = (raw / "test.txt").read_text().split()[0]
    converted, attrs = h5(tmp_path / "BraTS2019" / "data" / f"{case}.h5")
    expected, _ = h5(reference / "data" / f"{case}.h5")
    np.testing.assert_array_equal(converted["image"], expected["image"])
    np.testing.assert_array_equal(converted["label"], expected["label"])
    assert tuple(attrs["spacing"]) == (1.0, 1.0, 1.0) and len(attrs["crop"]) == 6


@pytest.mark.parametrize("kind", ["la", "acdc", "brats"])
def test_empty_source_is_a_user_error(tmp_path, kind, capsys):
    (tmp_path / "raw").mkdir()
    assert main(["data", "convert", kind, str(tmp_path / "raw"), str(tmp_path / "out")]) == 2
    assert "found" in capsys.readouterr().err
