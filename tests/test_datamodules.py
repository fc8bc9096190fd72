"""Splits, labeled-count conventions, loaders and bad-input messages of the ACDC and LA DataModules."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from datamodules import DATASETS, build_datamodule, get_dataset
from datamodules.acdc import ACDC_SPEC, ACDCDataModule
from datamodules.base import resolve_labeled_count
from datamodules.la import LA_SPEC, LADataModule
from datamodules.synthetic_la import write_la_layout
from tests.conftest import TINY_LA


def acdc(root, **options) -> ACDCDataModule:
    defaults = dict(patch_size=(32, 32), labeled_batch_size=2, unlabeled_batch_size=2, max_steps=3, seed=0, num_workers=0)
    return ACDCDataModule(ACDC_SPEC, root, **{**defaults, **options})


def la(root, **options) -> LADataModule:
    defaults = dict(patch_size=(32, 32, 16), labeled_batch_size=2, unlabeled_batch_size=2, max_steps=3, seed=0, num_workers=0)
    return LADataModule(LA_SPEC, root, **{**defaults, **options})


# ---- labeled-count convention ----------------------------------------------------------------------
@pytest.mark.parametrize("ratio, count", [(0.05, 3), (0.1, 7), (0.2, 14), (1.0, 70), (0.5, 35), (0.3, 21)])
def test_acdc_ratios_map_to_the_conventional_patient_counts(ratio, count):
    assert resolve_labeled_count(ACDC_SPEC, 70, ratio, None) == count


@pytest.mark.parametrize("ratio, count", [(0.1, 8), (0.2, 16), (1.0, 72)])
def test_la_ratios_follow_the_published_list_even_with_a_validation_holdout(ratio, count):
    # 80 listed, 8 held out for validation: 10 % / 20 % stay 8 / 16 scans, 1.0 is every remaining case.
    assert resolve_labeled_count(LA_SPEC, 72, ratio, None, listed_units=80) == count


def test_unconventional_datasets_round_the_ratio():
    assert resolve_labeled_count(ACDC_SPEC, 20, 0.2, None) == 4
    assert resolve_labeled_count(ACDC_SPEC, 20, 0.01, None) == 1


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "0.2", True])
def test_impossible_ratios_are_user_errors(ratio):
    with pytest.raises(UserError, match="RATIO must be a number in \\(0, 1\\]"):
        resolve_labeled_count(ACDC_SPEC, 70, ratio, None)


@pytest.mark.parametrize("labeled", [0, 71, -3])
def test_impossible_labeled_counts_are_user_errors(labeled):
    with pytest.raises(UserError, match="impossible for acdc: it has 70 training patients"):
        resolve_labeled_count(ACDC_SPEC, 70, None, labeled)


def test_labeled_wins_over_ratio():
    assert resolve_labeled_count(ACDC_SPEC, 70, 0.1, 3) == 3


# ---- ACDC --------------------------------------------------------------------------------------------
def test_acdc_labeled_set_is_the_first_patients_of_train_slices_list(acdc_root):
    dm = acdc(acdc_root, labeled=2)
    lines = (acdc_root / "train_slices.list").read_text().split()
    patients = list(dict.fromkeys(line.split("_")[0] for line in lines))
    assert dm.split.labeled_units == patients[:2]
    k = len(dm.split.labeled)
    assert dm.split.labeled == lines[:k]  # SSL4MIS: the first k slices, k = patients_to_slices(2)
    assert dm.split.unlabeled == lines[k:]
    assert dm.split.val == (acdc_root / "val.list").read_text().split()
    assert dm.split.test == (acdc_root / "test.list").read_text().split()
    assert dm.split.labeled_count == 2 and dm.split.total_units == 6


def test_full_supervision_and_supervised_only_have_no_unlabeled_stream(acdc_root):
    assert not acdc(acdc_root, ratio=1.0).has_unlabeled
    assert not acdc(acdc_root, labeled=2, use_unlabeled=False).has_unlabeled
    batch = next(iter(acdc(acdc_root, ratio=1.0).train_dataloader()))
    assert set(batch[0] if isinstance(batch, tuple) else batch) == {"labeled"}


def test_acdc_training_batches_and_cases(acdc_root):
    dm = acdc(acdc_root, labeled=2)
    loader = dm.train_dataloader()
    batches = list(iter(loader))
    assert len(batches) == 3
    batch = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    assert batch["labeled"]["image"].shape == (2, 1, 32, 32) and batch["labeled"]["image"].dtype == torch.float32
    assert batch["labeled"]["label"].shape == (2, 32, 32) and batch["labeled"]["label"].dtype == torch.int64
    assert set(batch["unlabeled"]) == {"image"}  # unlabeled samples never carry their label
    case = dm.cases("test")[0]
    assert case["image"].ndim == 3 and case["image"].shape == case["label"].shape
    assert case["spacing"] is None


def test_split_is_written_with_the_run(acdc_root, tmp_path):
    import json

    dm = acdc(acdc_root, labeled=2)
    dm.split.write(tmp_path / "split.json")
    written = json.loads((tmp_path / "split.json").read_text())
    assert written["labeled_units"] == dm.split.labeled_units and written["unit"] == "patient"


def test_real_acdc_counts(real_acdc):
    dm = acdc(real_acdc, ratio=0.1)
    assert dm.split.total_units == 70
    assert len(dm.split.labeled) + len(dm.split.unlabeled) == 1312
    assert len(dm.split.labeled) == 136  # patients_to_slices["7"] in SSL4MIS / BCP
    assert len(dm.split.val) == 20 and len(dm.split.test) == 40
    val_patients = {c.split("_")[0] for c in dm.split.val}
    test_patients = {c.split("_")[0] for c in dm.split.test}
    assert len(val_patients) == 10 and len(test_patients) == 20
    assert "patient002" in val_patients and "patient001" in test_patients
    assert dm.split.labeled_units[:3] == ["patient099", "patient038", "patient050"]
    assert len(acdc(real_acdc, ratio=0.05).split.labeled) == 68
    assert len(acdc(real_acdc, ratio=0.2).split.labeled) == 256


# ---- LA ----------------------------------------------------------------------------------------------
def test_la_reads_crlf_lists_and_holds_out_validation_cases(la_root):
    ids = [line.strip() for line in (la_root / "train.list").read_text().splitlines()]
    assert (la_root / "train.list").read_bytes().count(b"\r\n") == len(ids)
    dm = la(la_root, labeled=2, val_holdout=2)
    assert dm.split.labeled == ids[:2] and dm.split.unlabeled == ids[2:4] and dm.split.val == ids[4:]
    assert not any("\r" in name for name in dm.split.labeled + dm.split.test)
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert batch["labeled"]["image"].shape == (2, 1, 32, 32, 16)
    case = dm.cases("test")[0]
    assert case["image"].shape == tuple(TINY_LA["shape"]) and case["spacing"] == (0.625, 0.625, 0.625)


def test_la_lists_inside_the_data_folder_dtc_layout(tmp_path):
    root = write_la_layout(tmp_path, lists_in="data_folder", **TINY_LA)
    dm = la(root, labeled=1)
    assert len(dm.split.labeled) == 1 and len(dm.split.test) == 2


def test_la_crop_pads_volumes_smaller_than_the_patch(tmp_path):
    root = write_la_layout(tmp_path, n_train=2, n_test=1, shape=(24, 20, 16), seed=1)
    dm = la(root, labeled=1, patch_size=(32, 32, 32))
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert batch["labeled"]["image"].shape == (2, 1, 32, 32, 32)


# ---- bad input (the DataModule's own errors; through the CLI: tests/test_bad_input_catalogue.py) ---------------
def test_missing_data_root(tmp_path):
    with pytest.raises(UserError, match="does not exist") as error:
        acdc(tmp_path / "nowhere", ratio=0.1)
    assert str(tmp_path / "nowhere") in error.value.message


def test_missing_list_file(tmp_path, acdc_root):
    copy = Path(shutil.copytree(acdc_root, tmp_path / "acdc"))
    (copy / "val.list").unlink()
    with pytest.raises(UserError, match="missing validation list file") as error:
        acdc(copy, ratio=0.5)
    assert "val.list" in error.value.message


def test_list_naming_a_missing_file(tmp_path, acdc_root):
    copy = Path(shutil.copytree(acdc_root, tmp_path / "acdc"))
    victim = sorted((copy / "data" / "slices").glob("*.h5"))[0]
    victim.unlink()
    with pytest.raises(UserError, match="1 file\\(s\\) named in train_slices.list are missing") as error:
        acdc(copy, ratio=0.5)
    assert victim.name in error.value.message


def test_path_traversal_in_a_list_is_refused(tmp_path, acdc_root):
    copy = Path(shutil.copytree(acdc_root, tmp_path / "acdc"))
    (copy / "test.list").write_text("../../etc/passwd\n")
    with pytest.raises(UserError, match="not a plain case name"):
        acdc(copy, ratio=0.5)


def test_corrupt_h5_is_a_user_error_naming_the_file(tmp_path, acdc_root):
    copy = Path(shutil.copytree(acdc_root, tmp_path / "acdc"))
    dm = acdc(copy, ratio=0.5)
    victim = copy / "data" / f"{dm.split.test[0]}.h5"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read h5 file") as error:
        dm.load_case(dm.split.test[0])
    assert str(victim) in error.value.message


def test_la_root_without_the_data_folder(tmp_path):
    (tmp_path / "train.list").write_text("A\n")
    with pytest.raises(UserError, match="2018LA_Seg_Training Set"):
        la(tmp_path, ratio=0.2)


def test_patch_with_the_wrong_number_of_axes(acdc_root):
    with pytest.raises(UserError, match="has 3 axes but acdc is 2D"):
        acdc(acdc_root, ratio=0.5, patch_size=(32, 32, 16))


def test_registry_names_and_real_dataset_needs_a_root():
    assert {"acdc", "la", "synthetic_acdc", "synthetic_la"} <= set(DATASETS)
    with pytest.raises(UserError, match="unknown dataset 'acdcc'") as error:
        get_dataset("acdcc")
    assert "did you mean acdc" in error.value.message
    config = {"data": {"root": None}, "trainer": {}, "run": {}}
    with pytest.raises(UserError, match="needs DATA_ROOT"):
        build_datamodule("acdc", config)


@pytest.mark.parametrize("family", ["acdc", "la"])
def test_cached_decoded_items_give_the_same_batches_and_stay_unchanged(acdc_root, la_root, family):
    """data.cache_decoded reads every item once; the batches are those of reading the files each time."""
    make = {"acdc": lambda **o: acdc(acdc_root, labeled=2, **o), "la": lambda **o: la(la_root, labeled=2, **o)}[family]
    batches = {}
    for cache in (False, True):
        torch.manual_seed(0)  # the per-sample RNG is drawn from torch's stream
        batches[cache] = list(iter(make(cache_decoded=cache, max_steps=6).train_dataloader()))
    for uncached, cached in zip(batches[False], batches[True]):
        uncached, cached = (b[0] if isinstance(b, tuple) else b for b in (uncached, cached))
        for stream in uncached:
            for key in uncached[stream]:
                assert torch.equal(uncached[stream][key], cached[stream][key]), (stream, key)
    datamodule = make(cache_decoded=True, max_steps=6)
    loader = datamodule.train_dataloader()
    items = loader.iterables["labeled"].dataset
    first = items.items[0]
    before = {k: None if a is None else a.copy() for k, a in zip(("image", "label"), items.decoded[first])}
    list(iter(loader))
    for (name, original), now in zip(before.items(), items.decoded[first]):
        np.testing.assert_array_equal(now, original, err_msg=name)
