"""Inputs that used to give wrong results without a word: a name listed twice, 16-bit images read as white, a tile
in another format skipped, a leaderboard cut mid-line accepted, blank images and empty test labels verified clean.
(Scoring's label values, orientation and spacing: tests/test_score.py. Through the CLI: the catalogue.)"""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.leaderboard import append_rows, read_leaderboard
from core.errors import UserError
from datamodules.base import read_list
from datamodules.endoscopy import read_mask, read_rgb
from datamodules.nuclei import read_binary_mask, read_image
from datamodules.synthetic_nuclei import write_monuseg_layout
from datamodules.verify import format_report, verify
from tests.bad_input_catalogue import earlier_row


# ---- list files ------------------------------------------------------------------------------------------------
def test_a_name_listed_twice_is_refused_with_its_line_numbers(tmp_path):
    listing = tmp_path / "train.list"
    listing.write_text("case_a\ncase_b\n\ncase_a\ncase_c\ncase_b\n")
    with pytest.raises(UserError, match="2 name.s. listed more than once: case_a on lines 1, 4; case_b on lines 2, 6"):
        read_list(listing, "training")


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    listing = tmp_path / "test.list"
    listing.write_bytes("\ufeffpatient001\r\npatient002\r\n".encode("utf-8"))
    assert read_list(listing, "test") == ["patient001", "patient002"]


def test_verify_reports_a_duplicate_in_the_acdc_lists(tmp_path, acdc_root):
    root = Path(shutil.copytree(acdc_root, tmp_path / "ACDC"))
    names = (root / "val.list").read_text().split()
    (root / "val.list").write_text("\n".join([*names, names[0]]) + "\n")
    result = verify("acdc", root, deep=False)
    assert not result.ok and f"{names[0]} on lines 1, {len(names) + 1}" in format_report(result)


# ---- image bit depths --------------------------------------------------------------------------------------------
def _ramp16(shape=(6, 8)) -> np.ndarray:
    return np.linspace(0, 65535, num=shape[0] * shape[1]).round().astype(np.uint16).reshape(shape)


def test_a_16_bit_png_image_is_rescaled_not_clipped_to_white(tmp_path):
    path = tmp_path / "tile.png"
    Image.fromarray(_ramp16()).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.round(_ramp16() / 257).astype(np.uint8)
    nuclei = read_image(path, "RGB")
    assert nuclei.dtype == np.uint8 and nuclei.shape == (6, 8, 3)
    np.testing.assert_array_equal(nuclei[..., 0], expected)
    np.testing.assert_array_equal(nuclei[..., 2], expected)
    np.testing.assert_allclose(read_rgb(path)[1], expected / 255.0, atol=1e-6)


@pytest.mark.parametrize("foreground", [1, 255, 65535])
def test_16_bit_masks_keep_their_values(tmp_path, foreground):
    mask = np.zeros((6, 8), np.uint16)
    mask[2:4, 3:6] = foreground
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    np.testing.assert_array_equal(read_binary_mask(path), (mask > 0).astype(np.uint8))
    np.testing.assert_array_equal(read_mask(path), (mask > 0).astype(np.uint8))


def test_a_32_bit_float_image_is_refused(tmp_path):
    path = tmp_path / "tile.tif"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(UserError, match="32-bit float image is not supported"):
        read_image(path, "RGB")


def test_a_tile_in_another_format_is_a_problem_not_skipped(tmp_path):
    root = write_monuseg_layout(tmp_path / "MoNuSeg", n_train=3, n_val=1, n_test=1, shape=(40, 40))
    tile = next((root / "Train_Folder" / "img").glob("*.png"))
    Image.open(tile).convert("RGB").save(tile.with_suffix(".jpg"))
    tile.unlink()
    result = verify("monuseg", root, deep=False)
    assert not result.ok and f"are not .png / .tif / .tiff and would be skipped: {tile.stem}.jpg" in format_report(result)


# ---- leaderboard -------------------------------------------------------------------------------------------------
def test_a_leaderboard_cut_in_the_middle_of_a_line_is_damaged_and_names_the_line(tmp_path):
    board = tmp_path / "acdc.csv"
    append_rows(board, [earlier_row("acdc"), {**earlier_row("acdc"), "seed": 1}])
    whole = board.read_bytes()
    board.write_bytes(whole[: len(whole) - 20])  # the second row loses its last fields
    with pytest.raises(UserError, match="damaged .*line 3"):
        read_leaderboard(board)
    with pytest.raises(UserError, match="damaged"):
        append_rows(board, [earlier_row("acdc")])
    assert board.read_bytes() == whole[: len(whole) - 20]


def test_a_sweep_stops_on_a_cut_leaderboard_before_training(tmp_path, capsys):
    board = tmp_path / "lb" / "synthetic_acdc.csv"
    append_rows(board, [earlier_row("synthetic_acdc")])
    board.write_bytes(board.read_bytes()[:-5])
    code = main(["sweep", "--dataset", "synthetic_acdc", "--profile", "smoke", "--methods", "supervised", "--ratios", "0.2",
                 "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb")])
    assert code == 2 and "line 2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


# ---- what verify warns about -------------------------------------------------------------------------------------
def _rewrite_every_h5(root: Path, key: str, make) -> None:
    for path in root.rglob("*.h5"):
        with h5py.File(path, "r+") as f:
            f[key][...] = make(f[key][()])


def test_verify_warns_when_every_image_is_blank(tmp_path, acdc_root):
    root = Path(shutil.copytree(acdc_root, tmp_path / "ACDC"))
    _rewrite_every_h5(root, "image", np.zeros_like)
    report = format_report(verify("acdc", root))
    assert "WARNING: every one of the" in report and "images read is constant" in report, report


def test_verify_warns_when_no_test_label_holds_foreground(tmp_path, acdc_root):
    root = Path(shutil.copytree(acdc_root, tmp_path / "ACDC"))
    cases = (root / "test.list").read_text().split()
    for case in cases:
        with h5py.File(root / "data" / f"{case}.h5", "r+") as f:
            f["label"][...] = 0
    report = format_report(verify("acdc", root))
    assert f"WARNING: none of the {len(cases)} test labels holds foreground" in report, report


def test_verify_of_clean_data_warns_about_nothing(acdc_root):
    result = verify("acdc", acdc_root)
    assert result.ok and not result.checks.warnings, format_report(result)
