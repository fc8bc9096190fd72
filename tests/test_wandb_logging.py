"""W&B in offline mode: runs grouped by sweep, tagged, with per-class validation Dice and prediction overlays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.cli import main
from benchmark.config import resolve_config
from benchmark.wandb_overlays import most_foreground_slice, overlay_callbacks


def test_offline_run_is_grouped_tagged_and_logs_overlays(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["run", "--profile", "smoke", "--no-progress", "--dataset", "synthetic_acdc", "--ratio", "0.2", "--seed", "3",
                 "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"), "--wandb", "offline",
                 "--set", "run.sweep=my-sweep"]) == 0
    run_dir = Path(pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")["run_dir"][0])
    (offline,) = run_dir.glob("wandb/offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    # The run file is W&B's binary record log (what `wandb sync` uploads); its strings are stored verbatim.
    content = run_file.read_bytes()
    for text in ("my-sweep", "sweep=my-sweep", "synthetic_acdc", "labeled=4", "ratio=0.2", "seed=3",
                 "val/dice_RV", "val/dice_Myo", "val/dice_LV", "train/loss", "test_last/dice", "val/overlays"):
        assert text.encode() in content, text
    # smoke: validation at steps 2 and 4, two cases each; each image with its ground-truth and prediction masks
    assert len(list(offline.glob("files/media/images/val/overlays_*.png"))) == 4
    assert list(offline.glob("files/media/images/mask/val/overlays_*.mask.png"))


def test_overlays_only_when_wandb_is_enabled():
    config = resolve_config("synthetic_acdc", "supervised", "smoke", family="acdc")
    assert overlay_callbacks(config) == []
    config["run"]["wandb"] = "offline"
    assert len(overlay_callbacks(config)) == 1


def test_the_overlay_slice_is_the_one_with_most_foreground():
    label = np.zeros((5, 4, 4), dtype=np.uint8)
    label[1, :2, :2] = 1  # 4 voxels
    label[3, :, :3] = 2  # 12 voxels
    assert most_foreground_slice(label, 0) == 3
    assert most_foreground_slice(np.moveaxis(label, 0, -1), -1) == 3
    assert most_foreground_slice(np.zeros((6, 2, 2)), 0) == 3  # no foreground: the middle slice


def test_wandb_logger_group_job_type_and_tags(tmp_path, monkeypatch):
    from benchmark.run import build_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    config = resolve_config("synthetic_acdc", "mean_teacher", "smoke", ["run.wandb=offline", "data.ratio=0.2", "run.seed=2"],
                            family="acdc")
    config["data"]["labeled"] = 4
    _, wandb_logger = build_loggers(config, tmp_path / "run", "abc")
    assert wandb_logger._wandb_init["group"] == "synthetic_acdc-smoke" and wandb_logger._wandb_init["job_type"] == "run"
    config["run"]["sweep"] = "grid-1"
    _, wandb_logger = build_loggers(config, tmp_path / "run", "abc")
    init = wandb_logger._wandb_init
    assert init["group"] == "grid-1" and init["job_type"] == "sweep"
    assert init["tags"] == ["synthetic_acdc", "mean_teacher", "smoke", "labeled=4", "ratio=0.2", "seed=2", "sweep=grid-1"]
    assert init["config"]["config_hash"] == "abc"


def test_wandb_mode_from_the_environment_unless_asked_otherwise(monkeypatch):
    from benchmark.cli import build_parser
    from benchmark.run_command import config_from_args

    def mode(*args):
        return config_from_args(build_parser().parse_args(["run", "--ratio", "0.2", *args]))["run"]["wandb"]

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert mode() == "offline" and mode("--wandb", "disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert mode() == "disabled"
