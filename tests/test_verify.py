"""The dataset verifier: clean on the real ACDC copy and on generated fixtures; broken copies give the expected
messages, through the DataModule's own checks before training and through ``python -m benchmark data verify``."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from benchmark.cli import main
from core.errors import UserError
from datamodules.verify import format_report, verify
from tests.conftest import require_real_acdc
from tests.test_datamodules import acdc


def cli(*args: str) -> int:
    return main(["data", "verify", *args])


@pytest.fixture
def acdc_copy(tmp_path, acdc_root) -> Path:
    return Path(shutil.copytree(acdc_root, tmp_path / "ACDC"))


def first_line(path: Path) -> str:
    return path.read_text().split()[0]


def rewrite_h5(path: Path, **arrays) -> None:
    with h5py.File(path, "r") as f:
        current = {key: f[key][()] for key in f}
    with h5py.File(path, "w") as f:
        for key, value in {**current, **arrays}.items():
            f.create_dataset(key, data=value, compression="gzip")


# ---- clean data ---------------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_acdc_layout_verifies_clean(capsys):
    root = require_real_acdc()
    assert cli("acdc", str(root), "--layout-only") == 0
    out = capsys.readouterr().out
    assert "70 training units (1312 items), 20 validation and 40 test cases" in out and "OK: no problems found" in out


@pytest.mark.real_data
@pytest.mark.slow
def test_real_acdc_verifies_clean_reading_every_file():
    result = verify("acdc", require_real_acdc(), deep=True)
    assert result.ok, format_report(result)
    assert result.samples_read == 1312 + 60 and not result.checks.notes


def test_fixtures_verify_clean_with_a_note_on_the_counts(acdc_root, la_root):
    for name, root, read in (("acdc", acdc_root, None), ("la", la_root, 8)):
        result = verify(name, root, deep=True)
        assert result.ok, format_report(result)
        assert result.checks.notes and "not comparable with published tables" in result.checks.notes[0]
        if read:
            assert result.samples_read == read
    assert verify("synthetic_acdc", acdc_root).checks.notes == []  # no published counts for synthetic names


# ---- broken copies: the verifier ---------------------------------------------------------------------------------
def test_missing_file(acdc_copy, capsys):
    victim = acdc_copy / "data" / "slices" / f"{first_line(acdc_copy / 'train_slices.list')}.h5"
    victim.unlink()
    assert cli("acdc", str(acdc_copy)) == 2
    out = capsys.readouterr().out
    assert "PROBLEM 1: 1 file(s) named in train_slices.list are missing" in out
    assert str(victim) in out and "fix:   complete the data copy" in out and "FAILED: 1 problem(s)" in out


def test_wrong_shape(acdc_copy, capsys):
    case = first_line(acdc_copy / "test.list")
    path = acdc_copy / "data" / f"{case}.h5"
    with h5py.File(path, "r") as f:
        label = f["label"][()]
    rewrite_h5(path, label=label[:, :-2])
    assert cli("acdc", str(acdc_copy)) == 2
    out = capsys.readouterr().out
    assert f"image and label shapes differ: image {label.shape}, label {label[:, :-2].shape}" in out
    assert f"where: {path}" in out


def test_wrong_number_of_axes(acdc_copy):
    name = first_line(acdc_copy / "train_slices.list")
    path = acdc_copy / "data" / "slices" / f"{name}.h5"
    with h5py.File(path, "r") as f:
        image, label = f["image"][()], f["label"][()]
    rewrite_h5(path, image=image[None], label=label[None])
    result = verify("acdc", acdc_copy)
    assert [p.what for p in result.checks.problems] == [
        f"the image has shape {(1, *image.shape)}; acdc expects 2 spatial axes (a 3-D file given to a 2-D dataset?)"]


def test_bad_label_value(acdc_copy, capsys):
    name = first_line(acdc_copy / "train_slices.list")
    path = acdc_copy / "data" / "slices" / f"{name}.h5"
    with h5py.File(path, "r") as f:
        label = f["label"][()]
    label[0, 0] = 7
    rewrite_h5(path, label=label)
    assert cli("acdc", str(acdc_copy)) == 2
    out = capsys.readouterr().out
    assert "the label has values [7] outside the 4 classes 0..3" in out and str(path) in out


def test_truncated_h5(acdc_copy, capsys):
    path = acdc_copy / "data" / f"{first_line(acdc_copy / 'val.list')}.h5"
    path.write_bytes(path.read_bytes()[:200])
    assert cli("acdc", str(acdc_copy)) == 2
    out = capsys.readouterr().out
    assert "cannot read h5 file" in out and str(path) in out and "truncated: copy it again" in out
    assert cli("acdc", str(acdc_copy), "--layout-only") == 0  # the cheap checks do not open files


def test_wrong_dtype_and_range(acdc_copy):
    path = acdc_copy / "data" / f"{first_line(acdc_copy / 'test.list')}.h5"
    with h5py.File(path, "r") as f:
        image = f["image"][()]
    rewrite_h5(path, image=(image * 255).astype(np.float64))
    messages = [p.what for p in verify("acdc", acdc_copy).checks.problems]
    assert messages[0] == "'image' is stored as float64, the published files have float32"
    assert messages[1].startswith("image values span [0, 255]")


def test_a_case_in_two_splits_is_leakage(acdc_copy):
    test_cases = (acdc_copy / "test.list").read_text()
    (acdc_copy / "val.list").write_text((acdc_copy / "val.list").read_text() + test_cases.split()[0] + "\n")
    result = verify("acdc", acdc_copy, deep=False)
    assert len(result.checks.problems) == 1
    assert "1 patient(s) are in both the validation and the test split" in result.checks.problems[0].what


def test_every_problem_is_reported_in_one_pass(acdc_copy, capsys):
    (acdc_copy / "val.list").unlink()
    (acdc_copy / "data" / f"{first_line(acdc_copy / 'test.list')}.h5").unlink()
    assert cli("acdc", str(acdc_copy)) == 2
    out = capsys.readouterr().out
    assert "PROBLEM 1: missing validation list file" in out
    assert "PROBLEM 2: 1 file(s) named in test.list are missing" in out and "FAILED: 2 problem(s)" in out


def test_la_without_its_data_folder(tmp_path, capsys):
    (tmp_path / "train.list").write_text("A\n")
    (tmp_path / "test.list").write_text("B\n")
    assert cli("la", str(tmp_path)) == 2
    assert "LA data folder '2018LA_Seg_Training Set' (with a space) is missing" in capsys.readouterr().out


def test_unknown_dataset_is_a_usage_error(tmp_path, capsys):
    assert cli("acdcc", str(tmp_path)) == 2
    assert "unknown dataset 'acdcc'" in capsys.readouterr().err


# ---- the same cheap checks before training -------------------------------------------------------------------
def test_datamodule_raises_every_layout_problem_at_once(acdc_copy):
    (acdc_copy / "val.list").unlink()
    victim = acdc_copy / "data" / "slices" / f"{first_line(acdc_copy / 'train_slices.list')}.h5"
    victim.unlink()
    with pytest.raises(UserError) as error:
        acdc(acdc_copy, ratio=0.5)
    message = error.value.message
    assert message.startswith("2 problems with the data; (1) missing validation list file")
    assert "(2) 1 file(s) named in train_slices.list are missing" in message and "data verify DATASET ROOT" in message


def test_datamodule_refuses_leakage_before_training(acdc_copy):
    (acdc_copy / "test.list").write_text((acdc_copy / "val.list").read_text())
    with pytest.raises(UserError, match="in both the validation and the test split"):
        acdc(acdc_copy, ratio=0.5)
