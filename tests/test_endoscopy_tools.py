"""The surgical-tool members of the endoscopy family on generated fixtures in their download layouts:
Kvasir-instrument (train.txt hold-out), EndoVis 2017 (folds, merged instrument masks, black-border crop, evenly
spread labeled frames, released test set), ART-Net / RoboTool as MMS packs them; the verifier; a CLI smoke fit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.config import resolve_config
from core.errors import UserError
from datamodules import build_datamodule, get_dataset
from datamodules.endoscopy import ENDOVIS_FOLDS, IMAGENET_MEAN, IMAGENET_STD, KVASIR_SEG_SPEC, read_mask
from datamodules.synthetic_endoscopy import (
    ENDOVIS_INSTRUMENT_FOLDERS,
    write_endovis17_layout,
    write_image_mask_folders,
    write_kvasir_instrument_layout,
)
from datamodules.verify import format_report, verify
from tests.conftest import run_smoke

TOOL_SETS = ("kvasir_instrument", "endovis17", "art_net", "robotool")
NOT_CROPPED = {"crop_black_borders": False}


def datamodule(name: str, root: Path, **options):
    entry = get_dataset(name)
    defaults = dict(patch_size=(32, 48), labeled_batch_size=2, unlabeled_batch_size=2, max_steps=2, seed=0, num_workers=0)
    return entry.datamodule(entry.spec, root, **{**defaults, **options})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def sequence_of(frame: str) -> int:
    return int(frame.split("/")[1].rsplit("_", 1)[1])


@pytest.fixture(scope="module")
def instrument_root(tmp_path_factory) -> Path:
    return write_kvasir_instrument_layout(tmp_path_factory.mktemp("kvasir-instrument"), n_train=10, n_test=4)


@pytest.fixture(scope="module")
def endovis_root(tmp_path_factory) -> Path:
    """Small frames (not the download's size, so read with the crop off), 3 frames per sequence, 9 and 10 too."""
    return write_endovis17_layout(tmp_path_factory.mktemp("endovis17"), frames_per_sequence=3, released_test=True)


@pytest.fixture(scope="module")
def folders_root(tmp_path_factory) -> Path:
    return write_image_mask_folders(tmp_path_factory.mktemp("robotool"), n_train=10, n_test=4)


# ---- specs and presets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOOL_SETS)
def test_specs_follow_the_kvasir_protocol_with_a_tool_class(name):
    spec = get_dataset(name).spec
    assert spec.class_names == ("background", "tool") and spec.eval_mode == "whole_image"
    assert spec.patch_size == KVASIR_SEG_SPEC.patch_size == (512, 288) and spec.extra_metrics == ("pooled_f1",)
    assert spec.image_normalization == (IMAGENET_MEAN, IMAGENET_STD) and spec.in_channels == 3
    assert spec.labeled_unit == ("frame" if name == "endovis17" else "image")


def test_presets_extend_kvasir_seg_with_their_own_budget_and_options():
    paper = {name: resolve_config(name, "mms", "paper", family=get_dataset(name).family) for name in TOOL_SETS}
    assert paper["kvasir_instrument"]["trainer"]["max_steps"] == 99 * 118
    assert paper["endovis17"]["trainer"]["max_steps"] == 99 * 281
    endovis_options = {key: paper["endovis17"]["data"][key] for key in ("fold", "crop_black_borders", "test_set")}
    assert endovis_options == {"fold": 0, "crop_black_borders": True, "test_set": "fold"}
    for name in TOOL_SETS:
        assert paper[name]["optim"]["name"] == "adam" and paper[name]["data"]["patch_size"] == [512, 288]
        for profile in ("cpu", "smoke"):
            kvasir = resolve_config("kvasir_seg", "mms", profile, family="kvasir_seg")
            assert resolve_config(name, "mms", profile, family="kvasir_seg")["trainer"] == kvasir["trainer"]
    with pytest.raises(UserError, match="wrong type"):
        resolve_config("endovis17", "mms", "cpu", ["data.fold=one"], family="kvasir_seg")


# ---- Kvasir-instrument --------------------------------------------------------------------------------------------
def test_kvasir_instrument_validates_on_the_last_ids_of_train_txt(instrument_root):
    train = lines(instrument_root / "train.txt")
    dm = datamodule("kvasir_instrument", instrument_root, labeled=3)
    assert not (instrument_root / "val.txt").exists()
    assert dm.split.val == train[-1:]  # 10 % of 10
    assert dm.split.labeled == train[:3] and dm.split.unlabeled == train[3:-1]
    assert dm.split.test == lines(instrument_root / "test.txt") and dm.split.total_units == 9
    assert datamodule("kvasir_instrument", instrument_root, labeled=3, val_holdout=4).split.val == train[-4:]
    assert datamodule("kvasir_instrument", instrument_root, labeled=3, options={"val_fraction": 0.3}).split.val == train[-3:]
    with pytest.raises(UserError, match="cannot hold out 10 of the 10 training images"):
        datamodule("kvasir_instrument", instrument_root, labeled=1, val_holdout=10)


def test_kvasir_instrument_uses_a_val_txt_when_there_is_one(tmp_path, instrument_root):
    copy = Path(shutil.copytree(instrument_root, tmp_path / "copy"))
    train = lines(copy / "train.txt")
    (copy / "train.txt").write_text("\n".join(train[:7]) + "\n")
    (copy / "val.txt").write_text("\n".join(train[7:]) + "\n")
    dm = datamodule("kvasir_instrument", copy, ratio=1.0)
    assert dm.split.val == train[7:] and dm.split.labeled == train[:7]


def test_kvasir_instrument_png_masks_are_binary_and_match_the_files(instrument_root):
    dm = datamodule("kvasir_instrument", instrument_root, labeled=3)
    case = dm.cases("test")[0]
    with Image.open(instrument_root / "masks" / f"{case['case']}.png") as mask:
        expected = (np.asarray(mask) == 255).astype(np.uint8)
    np.testing.assert_array_equal(case["label"], expected)
    assert 0 < expected.mean() < 0.5 and case["image"].shape == (3, *expected.shape)


def test_zero_one_png_masks_are_not_thresholded_away(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), mask)
    Image.fromarray(mask * 255, "L").save(tmp_path / "mask255.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask255.png"), mask)


# ---- EndoVis 2017 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fold", sorted(ENDOVIS_FOLDS))
def test_endovis_fold_tests_on_its_sequences_and_validates_on_the_highest_other(endovis_root, fold):
    dm = datamodule("endovis17", endovis_root, ratio=1.0, options={**NOT_CROPPED, "fold": fold})
    test, val = {sequence_of(f) for f in dm.split.test}, {sequence_of(f) for f in dm.split.val}
    train = {sequence_of(f) for f in dm.split.labeled}
    rest = sorted(set(range(1, 9)) - set(ENDOVIS_FOLDS[fold]))
    assert test == set(ENDOVIS_FOLDS[fold]) and val == {rest[-1]} and train == set(rest[:-1])
    assert len(dm.split.test) == 6 and len(dm.split.val) == 3 and dm.split.total_units == 15
    assert all(f.startswith("train/") for f in dm.split.test)
    assert dm.leaderboard_fields() == {"fold": fold}
    assert dm.split.notes[0].startswith(f"fold {fold}: test sequences {list(ENDOVIS_FOLDS[fold])}")


def test_endovis_labeled_frames_are_spread_evenly_over_the_sequences(endovis_root):
    dm = datamodule("endovis17", endovis_root, labeled=5, options=NOT_CROPPED)
    # 15 training frames (5 sequences x 3), 5 labeled: positions 1, 4, 7, 10, 13 = the middle frame of each sequence.
    assert dm.split.labeled == [f"train/instrument_dataset_{n}/frame001" for n in (2, 4, 5, 6, 7)]
    assert len(dm.split.unlabeled) == 10 and not set(dm.split.labeled) & set(dm.split.unlabeled)
    assert "per sequence 2: 1, 4: 1, 5: 1, 6: 1, 7: 1" in dm.split.notes[1]
    sparse = datamodule("endovis17", endovis_root, ratio=0.2, options=NOT_CROPPED).split  # round(0.2 x 15) = 3
    assert [sequence_of(f) for f in sparse.labeled] == [2, 5, 7] and sparse.labeled_count == 3


def test_endovis_released_test_set(endovis_root):
    dm = datamodule("endovis17", endovis_root, ratio=1.0, options={**NOT_CROPPED, "test_set": "released", "fold": 2})
    assert {f.rsplit("/", 1)[0] for f in dm.split.test} == {"test/instrument_dataset_9", "test/instrument_dataset_10"}
    assert {sequence_of(f) for f in dm.split.labeled} == set(range(1, 8)) and {sequence_of(f) for f in dm.split.val} == {8}
    assert dm.leaderboard_fields() == {"fold": "released"} and "ignored" in dm.split.notes[0]
    assert dm.load_case(dm.split.test[0])["label"].any()


def test_endovis_masks_merge_the_robotic_instruments(endovis_root):
    dm = datamodule("endovis17", endovis_root, ratio=1.0, options=NOT_CROPPED)
    for frame in ("train/instrument_dataset_1/frame000", "train/instrument_dataset_1/frame001"):
        sequence, name = frame.rsplit("/", 1)
        parts = {folder: np.asarray(Image.open(endovis_root / sequence / "ground_truth" / folder / f"{name}.png"))
                 for folder in ENDOVIS_INSTRUMENT_FOLDERS}
        left, right, other = (parts[folder] for folder in ENDOVIS_INSTRUMENT_FOLDERS)
        assert {10, 20, 30} <= set(np.unique(left).tolist())  # parts, not a binary mask
        case = dm.load_case(frame)
        # Other_labels (non-robotic tools) is background, as in ternaus's prepare_data.py.
        np.testing.assert_array_equal(case["label"], ((left > 0) | (right > 0)).astype(np.uint8))
        assert case["label"].dtype == np.uint8 and set(np.unique(case["label"]).tolist()) == {0, 1}
        if frame.endswith("frame000"):
            assert (other > 0).any() and not case["label"][(other > 0) & (left == 0) & (right == 0)].any()
        else:  # only the first instrument is in view in odd frames: the other label files are all zero
            assert not right.any() and not other.any()


def test_endovis_black_border_crop_of_full_frames(tmp_path):
    root = write_endovis17_layout(tmp_path, frames_per_sequence=1, shape=(1080, 1920), instrument_folders=ENDOVIS_INSTRUMENT_FOLDERS[:1])
    dm = datamodule("endovis17", root, ratio=1.0)  # the crop is the default
    frame = "train/instrument_dataset_1/frame000"
    case = dm.load_case(frame)
    assert case["image"].shape == (3, 1024, 1280) and case["label"].shape == (1024, 1280)
    with Image.open(root / "train/instrument_dataset_1/left_frames/frame000.png") as image:
        rgb = np.asarray(image, dtype=np.float32)[28:1052, 320:1600] / 255
    np.testing.assert_allclose(case["image"][0], (rgb[..., 0] - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-5)
    with Image.open(root / "train/instrument_dataset_1/ground_truth" / ENDOVIS_INSTRUMENT_FOLDERS[0] / "frame000.png") as label:
        np.testing.assert_array_equal(case["label"], (np.asarray(label)[28:1052, 320:1600] > 0).astype(np.uint8))
    uncropped = datamodule("endovis17", root, ratio=1.0, options=NOT_CROPPED).load_case(frame)
    assert uncropped["image"].shape == (3, 1080, 1920) and uncropped["label"].sum() >= case["label"].sum()


def test_endovis_crop_on_frames_of_another_size_is_one_problem_before_training(endovis_root):
    with pytest.raises(UserError, match="8 sequence.s. have frames of another size") as error:
        datamodule("endovis17", endovis_root, ratio=0.5)
    assert "data.crop_black_borders=false" in error.value.message


@pytest.mark.parametrize("options, match", [
    ({"fold": 4}, "data.fold must be one of"),
    ({"test_set": "challenge"}, "data.test_set must be one of"),
    ({"folds": 1}, "no data option folds"),
])
def test_endovis_bad_options(endovis_root, options, match):
    with pytest.raises(UserError, match=match):
        datamodule("endovis17", endovis_root, ratio=0.5, options={**NOT_CROPPED, **options})


@pytest.fixture
def endovis_copy(tmp_path, endovis_root) -> Path:
    return Path(shutil.copytree(endovis_root, tmp_path / "EndoVis17"))


def test_endovis_layout_errors(endovis_copy):
    sequence = endovis_copy / "train/instrument_dataset_2"
    (sequence / "ground_truth" / ENDOVIS_INSTRUMENT_FOLDERS[0] / "frame001.png").unlink()  # a label missing
    shutil.copy(sequence / "ground_truth" / ENDOVIS_INSTRUMENT_FOLDERS[1] / "frame000.png",
                sequence / "ground_truth" / ENDOVIS_INSTRUMENT_FOLDERS[1] / "frame099.png")  # a label without a frame
    shutil.rmtree(endovis_copy / "train/instrument_dataset_6/ground_truth")  # a folder missing
    shutil.rmtree(endovis_copy / "train/instrument_dataset_7")  # a sequence missing
    with pytest.raises(UserError) as error:
        datamodule("endovis17", endovis_copy, ratio=0.5, options=NOT_CROPPED)
    message = error.value.message
    assert "4 problems with the data" in message
    assert "frame001.png" in message and "named in Left_Prograsp_Forceps_labels are missing" in message
    assert "1 label file(s) in 'Right_Prograsp_Forceps_labels' have no frame in left_frames/ (e.g. frame099.png)" in message
    assert "'train/instrument_dataset_6' lacks ground_truth/" in message and "'train/instrument_dataset_7' lacks left_frames and ground_truth/" in message


def test_endovis_released_test_set_missing(endovis_copy):
    shutil.rmtree(endovis_copy / "test/instrument_dataset_10")
    with pytest.raises(UserError, match="'test/instrument_dataset_10' lacks left_frames and ground_truth/"):
        datamodule("endovis17", endovis_copy, ratio=0.5, options={**NOT_CROPPED, "test_set": "released"})
    shutil.rmtree(endovis_copy / "test")
    with pytest.raises(UserError, match="EndoVis 2017 folder test/ is missing"):
        datamodule("endovis17", endovis_copy, ratio=0.5, options={**NOT_CROPPED, "test_set": "released"})


def test_endovis_wrong_root_is_one_problem(endovis_root):
    with pytest.raises(UserError, match="EndoVis 2017 folder train/ is missing") as error:
        datamodule("endovis17", endovis_root / "train", ratio=0.5, options=NOT_CROPPED)
    assert "problems with the data" not in error.value.message


def test_endovis_unreadable_frame_names_the_file(endovis_copy):
    dm = datamodule("endovis17", endovis_copy, ratio=0.5, options=NOT_CROPPED)
    victim = endovis_copy / "train/instrument_dataset_1/left_frames/frame002.png"
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    with pytest.raises(UserError, match="cannot read image") as error:
        dm.load_case("train/instrument_dataset_1/frame002")
    assert str(victim) in error.value.message


def test_endovis_options_come_from_the_config(endovis_root):
    config = resolve_config("endovis17", "supervised", "smoke",
                            ["data.fold=3", "data.crop_black_borders=false", f"data.root={endovis_root}", "data.patch_size=[32, 32]"],
                            family="kvasir_seg")
    config["data"]["ratio"] = 0.5
    dm = build_datamodule("endovis17", config)
    assert {sequence_of(f) for f in dm.split.test} == {6, 7} and dm.options["fold"] == 3


# ---- ART-Net / RoboTool as MMS packs them -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["art_net", "robotool"])
def test_image_mask_folders_in_natural_order_with_the_last_training_names_validating(folders_root, name):
    dm = datamodule(name, folders_root, labeled=3)
    assert dm.split.labeled == ["train/1", "train/2", "train/3"]  # natural order: 2 before 10
    assert dm.split.unlabeled == [f"train/{n}" for n in range(4, 10)] and dm.split.val == ["train/10"]
    assert dm.split.test == [f"test/{n}" for n in range(1, 5)]
    case = dm.load_case("test/2")
    with Image.open(folders_root / "test/mask/2.png") as mask:
        np.testing.assert_array_equal(case["label"], (np.asarray(mask) > 0).astype(np.uint8))


def test_image_mask_folders_take_jpeg_images(tmp_path):
    root = write_image_mask_folders(tmp_path, n_train=4, n_test=2, image_suffix=".jpg")
    dm = datamodule("art_net", root, labeled=1)
    assert dm.split.test == ["test/1", "test/2"] and dm.describe("case", "test/1").endswith("test/image/1.jpg")
    assert dm.load_case("test/1")["image"].shape[0] == 3


@pytest.fixture
def folders_copy(tmp_path, folders_root) -> Path:
    return Path(shutil.copytree(folders_root, tmp_path / "RoboTool"))


def test_image_mask_folder_errors(folders_copy):
    (folders_copy / "train/image/3.png").unlink()  # a mask without its image
    (folders_copy / "test/mask/4.png").unlink()  # an image without its mask
    shutil.copy(folders_copy / "train/image/5.png", folders_copy / "train/image/5.jpg")  # two files, one name
    with pytest.raises(UserError) as error:
        datamodule("robotool", folders_copy, labeled=2)
    message = error.value.message
    assert "3 problems with the data" in message
    assert "1 file(s) in train/mask have no image of the same name: 3.png" in message
    assert "1 file(s) in test/image have no mask of the same name: 4.png" in message
    assert "train/image exist with several extensions (e.g. 5.jpg, 5.png)" in message


def test_image_mask_folder_missing(folders_copy):
    shutil.rmtree(folders_copy / "test/mask")
    with pytest.raises(UserError, match="folder test/mask is missing") as error:
        datamodule("robotool", folders_copy, labeled=2)
    assert "image/ and mask/" in error.value.fix


def test_image_mask_folder_unreadable_image(folders_copy):
    dm = datamodule("robotool", folders_copy, labeled=2)
    (folders_copy / "test/image/1.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image") as error:
        dm.load_case("test/1")
    assert str(folders_copy / "test/image/1.png") in error.value.message


# ---- the verifier -------------------------------------------------------------------------------------------------
def cli_verify(*args: str) -> int:
    return main(["data", "verify", *args])


def test_fixtures_verify_clean(instrument_root, endovis_root, folders_root, capsys):
    assert cli_verify("kvasir_instrument", str(instrument_root)) == 0
    out = capsys.readouterr().out
    assert "9 training units (9 items), 1 validation and 4 test cases" in out and "the published set 472" in out
    assert cli_verify("endovis17", str(endovis_root), "--set", "data.crop_black_borders=false",
                      "--set", "data.test_set=released") == 0
    out = capsys.readouterr().out
    assert "21 training units (21 items), 3 validation and 6 test cases" in out and "OK: no problems found" in out
    assert "do not have the published 225 frames" in out
    for name in ("art_net", "robotool"):
        result = verify(name, folders_root)
        assert result.ok and result.samples_read == 14, format_report(result)


def test_verifier_reports_the_crop_and_bad_options(endovis_root, capsys):
    assert cli_verify("endovis17", str(endovis_root), "--layout-only") == 2
    assert "data.crop_black_borders=false" in capsys.readouterr().out
    assert cli_verify("endovis17", str(endovis_root), "--set", "data.patch_size=[8, 8]") == 2
    assert "not a data option of endovis17" in capsys.readouterr().err
    assert cli_verify("endovis17", str(endovis_root), "--set", "data.fold=two") == 2
    assert "wrong type" in capsys.readouterr().err


def test_verifier_finds_a_corrupt_mask_and_a_mask_without_image(folders_copy, capsys):
    (folders_copy / "train/mask/2.png").write_bytes(b"\x89PNG truncated")
    assert cli_verify("robotool", str(folders_copy)) == 2  # the layout is whole: the deep pass reads the mask
    out = capsys.readouterr().out
    assert "FAILED: 1 problem(s)" in out and "cannot read mask" in out and "train/mask/2.png" in out
    (folders_copy / "test/image/3.png").unlink()
    assert cli_verify("robotool", str(folders_copy)) == 2
    out = capsys.readouterr().out
    assert "test/mask have no image of the same name: 3.png" in out and "deep checks skipped" in out


# ---- through the CLI ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["supervised", "mms"])
def test_smoke_fit_endovis17(tmp_path, endovis_root, method, one_torch_thread):
    assert run_smoke(tmp_path, "--method", method, "--dataset", "endovis17", "--data-root", str(endovis_root),
                     "--labeled", "4", "--set", "data.crop_black_borders=false", "--set", "data.fold=1") == 0
    row = pd.read_csv(tmp_path / "lb" / "endovis17.csv").iloc[-1]
    assert row["status"] == "ok" and row["fold"] == 1 and row["labeled_unit"] == "frame" and 0 <= row["pooled_f1"] <= 1
    split = json.loads(next((tmp_path / "runs").rglob("split.json")).read_text())
    assert split["notes"][0].startswith("fold 1: test sequences [2, 5], validation sequence 8")
    # 4 of the 15 frames of sequences 1, 3, 4, 6, 7: positions floor((i + 0.5) 15 / 4) = 1, 5, 9, 13.
    assert [sequence_of(f) for f in split["labeled"]] == [1, 3, 6, 7]


@pytest.mark.slow
@pytest.mark.parametrize("name, method", [("kvasir_instrument", "mms"), ("robotool", "supervised")])
def test_smoke_fit_the_other_layouts(tmp_path, instrument_root, folders_root, name, method, one_torch_thread):
    root = instrument_root if name == "kvasir_instrument" else folders_root
    assert run_smoke(tmp_path, "--method", method, "--dataset", name, "--data-root", str(root), "--labeled", "4") == 0
    row = pd.read_csv(tmp_path / "lb" / f"{name}.csv").iloc[-1]
    assert row["status"] == "ok" and row["labeled_cases"] == 4 and "fold" not in row
