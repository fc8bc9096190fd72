"""benchmark/finalize.py: the config finished before anything is built gives the labeled count the DataModule's split
gives, for every dataset family, and the very config and hash the run computed when it finished the config after
building the DataModule (the hashes of the committed leaderboard rows stay valid)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from benchmark.config import config_hash, resolve_config
from benchmark.finalize import DatasetDescription, finalize, leaderboard_dir_for
from benchmark.run_request import RunRequest
from core.errors import UserError
from datamodules import DATASETS, build_datamodule, get_dataset
from datamodules.listing import UNIT_COUNTERS
from methods.registry import get_method
from tests.conftest import REAL_ACDC, REAL_KVASIR, TINY_ACDC, TINY_LA, require_real_acdc, require_real_kvasir


def finished_after_building(config: dict) -> dict:
    """What run.prepare made of a resolved config before the finalize step existed: it built the DataModule and
    read the labeled count from its split."""
    config = copy.deepcopy(config)
    entry = get_dataset(config["dataset"])
    method_cls = get_method(config["method_name"])
    if config["data"]["patch_size"] is None:
        config["data"]["patch_size"] = list(entry.spec.patch_size)
    datamodule = build_datamodule(config["dataset"], config, use_unlabeled=method_cls.uses_unlabeled,
                                  labeled_partitions=method_cls.labeled_partitions)
    config["data"]["labeled"] = datamodule.split.labeled_count
    trainer = config["trainer"]
    trainer["val_every"] = min(trainer["val_every"], trainer["max_steps"])
    run = config["run"]
    run["leaderboard_dir"] = str(leaderboard_dir_for(config["profile"], run["leaderboard_dir"], run["out"]))
    return config


# ---- a data folder in every family's layout ------------------------------------------------------------------------
def write_layout(dataset: str, root: Path) -> Path:
    """A small data folder in the layout ``dataset`` reads (the suite's format-exact writers)."""
    from datamodules import synthetic, synthetic_brats, synthetic_cadis, synthetic_endoscopy, synthetic_nuclei

    small = (24, 32)
    writers = {
        "acdc": lambda: synthetic.write_acdc_layout(root, **TINY_ACDC),
        "la": lambda: synthetic.write_la_layout(root, crlf=True, **TINY_LA),
        "brats": lambda: synthetic_brats.write_brats_layout(root, n_train=5, n_val=1, n_test=1, shape=(24, 28, 24)),
        "brats_regions": lambda: synthetic_brats.write_brats_layout(root, n_train=5, n_val=1, n_test=1, shape=(24, 28, 24),
                                                                    form="nifti"),
        "monuseg": lambda: synthetic_nuclei.write_monuseg_layout(root, n_train=7, shape=small),
        "dsb2018": lambda: synthetic_nuclei.write_dsb_layout(root, n_images=11, shape=small),
        "cadis": lambda: synthetic_cadis.write_cadis_layout(root, frames_per_video=1, shape=small),
        "kvasir_instrument": lambda: synthetic_endoscopy.write_kvasir_instrument_layout(root, n_train=9, n_test=2, shape=small),
        "endovis17": lambda: synthetic_endoscopy.write_endovis17_layout(root, frames_per_sequence=2, shape=small),
        "image_mask_folders": lambda: synthetic_endoscopy.write_image_mask_folders(root, n_train=9, n_test=2, shape=small),
    }
    key = ("cadis" if dataset.startswith("cadis") else "image_mask_folders" if dataset in ("art_net", "robotool") else dataset)
    return writers[key]()


REAL_ONLY = sorted(name for name, entry in DATASETS.items() if not entry.synthetic and name != "kvasir_seg")
SYNTHETIC = sorted(name for name, entry in DATASETS.items() if entry.synthetic)


def test_every_registered_dataset_has_a_unit_counter():
    assert {entry.datamodule.__name__ for entry in DATASETS.values()} <= set(UNIT_COUNTERS)


def test_the_description_holds_the_spec_values_finishing_reads():
    for name, entry in DATASETS.items():
        description = DatasetDescription.of(name)
        assert (description.name, description.family, description.synthetic) == (entry.spec.name, entry.family, entry.synthetic)
        assert description.patch_size == tuple(entry.spec.patch_size)
        assert description.labeled_counts == entry.spec.labeled_counts and description.labeled_unit == entry.spec.labeled_unit
        assert description.data_options == entry.datamodule.data_options
        assert description.datamodule == entry.datamodule.__name__


# What the small layouts need beside the defaults (EndoVis 2017 crops the download's 1080x1920 frames).
LAYOUT_OVERRIDES = {"endovis17": ["data.crop_black_borders=false"]}


def test_the_catalogue_holds_what_the_method_classes_declare():
    from benchmark.catalogue import catalogue, method_facts

    facts = catalogue()["method_facts"]
    for name in catalogue()["methods"]:
        method_cls = get_method(name)
        assert facts[name] == method_facts(method_cls, DATASETS), name
        assert facts[name]["defaults"] == method_cls.defaults  # JSON kept every value (no tuple became a list)
        for dataset, (what, _, _) in facts[name]["refuses"].items():
            with pytest.raises(UserError, match=re.escape(what)):
                method_cls.check_dataset(DATASETS[dataset].spec)


def check_counts_agree(dataset: str, root: Path | None, asks: list[list[str]]) -> None:
    for ask in asks:
        request = RunRequest(dataset=dataset, profile="smoke", data_root=None if root is None else str(root),
                             overrides=[*LAYOUT_OVERRIDES.get(dataset, []), *ask])
        resolved = request.resolve()
        finished = finalize(resolved)
        built = finished_after_building(resolved)
        assert finished["data"]["labeled"] == built["data"]["labeled"], (dataset, ask)
        assert finished == built and config_hash(finished) == config_hash(built), (dataset, ask)


@pytest.mark.parametrize("dataset", REAL_ONLY)
def test_the_labeled_count_is_the_splits_in_every_family(dataset, tmp_path):
    root = write_layout(dataset, tmp_path / dataset)
    check_counts_agree(dataset, root, [["data.ratio=0.2"], ["data.ratio=1.0"], ["data.ratio=0.05"], ["data.labeled=2"],
                                       ["data.ratio=0.5", "data.val_holdout=1"]])


@pytest.mark.parametrize("dataset", SYNTHETIC)
def test_the_labeled_count_is_the_splits_on_the_synthetic_sets(dataset):
    check_counts_agree(dataset, None, [["data.ratio=0.2"], ["data.ratio=0.1"], ["data.ratio=1.0"], ["data.labeled=3"]])


def test_the_synthetic_acdc_finishes_as_it_did_after_building_for_several_methods():
    for method in ("supervised", "mean_teacher", "mc_net_plus", "action"):
        for profile in ("smoke", "cpu"):
            request = RunRequest(method=method, dataset="synthetic_acdc", profile=profile, ratio=0.2)
            resolved = request.resolve()
            assert config_hash(finalize(resolved)) == config_hash(finished_after_building(resolved)), (method, profile)


def test_finishing_is_idempotent_and_leaves_its_input_alone():
    resolved = RunRequest(dataset="synthetic_acdc", profile="smoke", ratio=0.2).resolve()
    before = copy.deepcopy(resolved)
    finished = finalize(resolved)
    assert resolved == before and finished != resolved
    assert finalize(finished) == finished


def test_prepare_refuses_a_config_that_was_not_finished(tmp_path):
    from benchmark.run import prepare

    resolved = resolve_config("synthetic_acdc", "supervised", "smoke", [f"run.out={tmp_path}", "data.ratio=0.2"],
                              get_method("supervised").defaults, family="acdc")
    with pytest.raises(ValueError, match="finished config"):
        prepare(resolved)
    finished = finalize(resolved)
    kept = copy.deepcopy(finished)
    prepare(finished)
    assert finished == kept  # prepare checks and builds; the config stays as it is


# ---- the hashes of the committed leaderboard rows (real data) ----------------------------------------------------
COMMITTED = [
    ("supervised", "acdc", ["--labeled", "70"], "cb0338cf7aaa"),
    ("supervised", "acdc", ["--ratio", "0.1"], "c76845f055a3"),
    ("mean_teacher", "acdc", ["--ratio", "0.1"], "15771e786611"),
    ("mc_net_plus", "acdc", ["--ratio", "0.1"], "f710c7798016"),
    ("supervised", "kvasir_seg", ["--ratio", "1.0"], "cf6b5e237f63"),
    ("supervised", "kvasir_seg", ["--ratio", "0.1"], "a92edd71e7d4"),
]


@pytest.mark.parametrize("method, dataset, ask, digest", COMMITTED)
def test_the_committed_rows_keep_their_hashes(method, dataset, ask, digest):
    from benchmark.run_command import run_parser

    root = require_real_acdc() if dataset == "acdc" else require_real_kvasir()
    argv = ["run", "--method", method, "--dataset", dataset, *ask, "--profile", "cpu", "--data-root", str(root),
            "--out", "/work/runs", "--leaderboard-dir", "leaderboards"]
    request = RunRequest.from_args(run_parser().parse_args(argv))
    assert config_hash(request.finalized()) == digest
    assert config_hash(finished_after_building(request.resolve())) == digest


def test_the_real_sets_count_as_their_datamodules(real_acdc):
    check_counts_agree("acdc", REAL_ACDC, [["data.ratio=0.1"], ["data.ratio=0.05"], ["data.ratio=0.3"], ["data.labeled=70"]])
    require_real_kvasir()
    check_counts_agree("kvasir_seg", REAL_KVASIR, [["data.ratio=0.1"], ["data.ratio=1.0"], ["data.labeled=80"]])
