"""End to end: the CLI and one run (fit, test of last and best checkpoints, run folder, leaderboard rows)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from benchmark.cli import main
from benchmark.config import resolve_config
from datamodules import get_dataset
from methods.registry import get_method, method_names
from tests.conftest import PROJECT_ROOT, require_real_acdc


def run_cli(tmp_path: Path, *args: str) -> int:
    return main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), *args])


def check_finished_run(tmp_path: Path, dataset: str) -> pd.DataFrame:
    table = pd.read_csv(tmp_path / "lb" / f"{dataset}.csv")
    assert table["checkpoint"].tolist() == ["last", "best"] and (table["status"] == "ok").all()
    run_dir = Path(table["run_dir"][0])
    for name in ("config.yaml", "split.json", "result.json", "test_per_case_last.csv", "test_per_case_best.csv",
                 "checkpoints/last.ckpt", "logs/metrics.csv"):
        assert (run_dir / name).is_file(), name
    per_case = pd.read_csv(run_dir / "test_per_case_last.csv")
    assert per_case["dice"].between(0, 1).all() and not per_case.isna().any().any()
    for kind in ("last", "best"):  # the copies the leaderboard keeps for its paired tests
        archived = tmp_path / "lb" / "per_case" / dataset / f"{run_dir.name}_{kind}.csv"
        assert archived.read_bytes() == (run_dir / f"test_per_case_{kind}.csv").read_bytes()
    curve = pd.read_csv(tmp_path / "lb" / "curves" / dataset / f"{run_dir.name}.csv")  # the validation curve
    # and the config, so the leaderboard page can describe the row without the run folder
    assert (tmp_path / "lb" / "configs" / dataset / f"{run_dir.name}.yaml").read_bytes() == (run_dir / "config.yaml").read_bytes()
    assert len(curve) >= 1 and curve["val/dice"].between(0, 1).all() and curve["step"].is_monotonic_increasing
    result = json.loads((run_dir / "result.json").read_text())
    assert result["config_hash"] == table["config_hash"][0]
    # CPU time: some, and at most the wall time on every core (with the loader workers that have ended).
    assert ((table["cpu_time_s"] > 0) & (table["cpu_time_s"] <= table["wall_time_s"] * (os.cpu_count() or 1))).all()
    return table


def test_smoke_fit_2d_writes_a_row(tmp_path, capsys):
    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.2", "--seed", "1") == 0
    table = check_finished_run(tmp_path, "synthetic_acdc")
    assert table["labeled_cases"][0] == 4 and table["seed"][0] == 1 and table["steps"][0] == 4
    assert {"dice_RV", "dice_Myo", "dice_LV"} <= set(table.columns)
    out = capsys.readouterr().out
    assert "run folder:" in out and "supervised on synthetic_acdc (smoke profile), 4 labeled patients" in out


def test_smoke_fit_3d_writes_a_row(tmp_path):
    assert run_cli(tmp_path, "--dataset", "synthetic_la", "--labeled", "2") == 0
    table = check_finished_run(tmp_path, "synthetic_la")
    assert table["labeled_cases"][0] == 2 and "dice_LA" in table.columns


def test_training_values_are_logged_on_the_logger_steps_only(tmp_path):
    """log_losses skips the steps Lightning would not write (it decides with its own should_update_logs), so the
    CSV must still hold every step Lightning writes: steps 2, 5 and 8 of 9 with log_every 3 (Lightning counts from
    1: step index s is written when (s + 1) % 3 == 0)."""
    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.2", "--method", "mean_teacher",
                   "--set", "trainer.max_steps=9", "--set", "trainer.log_every=3", "--set", "trainer.val_every=9") == 0
    run_dir = Path(pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")["run_dir"][0])
    logged = pd.read_csv(run_dir / "logs" / "metrics.csv")
    for column in ("train/loss", "train/supervised", "train/consistency"):
        assert logged.loc[logged[column].notna(), "step"].tolist() == [2, 5, 8], column


def test_a_budget_that_is_not_a_multiple_of_val_every_is_validated_at_its_last_step(tmp_path):
    """7 steps validated every 3: Lightning alone validates after steps 3 and 6, leaving the last checkpoint unscored
    and the best one chosen without it (ACTION's fine-tuning stage: 1 333 steps, validated every 500)."""
    # seed 1: here the final validation scores highest, so the best checkpoint must be the one saved after it
    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.2", "--seed", "1", "--set", "trainer.max_steps=7",
                   "--set", "trainer.val_every=3") == 0
    table = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv").set_index("checkpoint")
    run_dir = Path(table["run_dir"]["last"])
    curve = pd.read_csv(tmp_path / "lb" / "curves" / "synthetic_acdc" / f"{run_dir.name}.csv")
    assert curve["step"].tolist() == [3, 6, 7]
    best_step = int(table["step"]["best"])
    assert best_step == int(curve.loc[curve["val/dice"].idxmax(), "step"])  # chosen among all three, the last included
    assert int(table["step"]["last"]) == 7


# Bad input through this CLI (names, values, paths, data, checkpoints): tests/test_bad_input_catalogue.py.


def test_list_commands(capsys):
    for what, expected in (("methods", "supervised"), ("datasets", "synthetic_acdc"), ("profiles", "smoke")):
        assert main(["list", what]) == 0
        assert expected in capsys.readouterr().out.split("\n")


def test_show_config(capsys):
    assert main(["run", "--dataset", "synthetic_la", "--profile", "cpu", "--ratio", "0.2", "--show-config"]) == 0
    assert "patch_size:" in capsys.readouterr().out


def test_every_loss_of_supervised_reaches_every_parameter():
    entry = get_dataset("synthetic_acdc")
    config = resolve_config("synthetic_acdc", "supervised", "smoke", family="acdc")
    config["data"]["patch_size"] = [32, 32]
    model = get_method("supervised")(entry.spec, config)
    batch = {"labeled": {"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 4, (2, 32, 32))}}
    model.log = lambda *a, **k: None
    model.log_dict = lambda *a, **k: None
    model.training_step(batch, 0).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
    assert "supervised" in method_names()


def test_python_m_benchmark_help():
    result = subprocess.run([sys.executable, "-m", "benchmark", "--help"], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0 and "run" in result.stdout and "score" in result.stdout


@pytest.mark.real_data
def test_short_real_acdc_run_writes_a_row(tmp_path):
    root = require_real_acdc()
    assert run_cli(tmp_path, "--dataset", "acdc", "--data-root", str(root), "--ratio", "0.1") == 0
    table = check_finished_run(tmp_path, "acdc")
    assert table["labeled_cases"][0] == 7 and table["n_cases"][0] == 2


@pytest.mark.slow
def test_make_bench_end_to_end(tmp_path):
    env = {**os.environ, "SSL_BENCH_CACHE": os.environ["SSL_BENCH_CACHE"]}
    result = subprocess.run(
        ["make", "bench", "PROFILE=smoke", "RATIO=0.2", f"OUT={tmp_path / 'runs'}", f"LEADERBOARD_DIR={tmp_path / 'lb'}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "run folder:" in result.stdout
    check_finished_run(tmp_path, "synthetic_acdc")


@pytest.mark.slow
def test_make_bench_bad_input_exit_code(tmp_path):
    result = subprocess.run(
        ["make", "bench", "METHOD=nope", f"OUT={tmp_path / 'runs'}", f"LEADERBOARD_DIR={tmp_path / 'lb'}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "unknown method 'nope'" in result.stderr


def test_wandb_offline_writes_the_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.2", "--wandb", "offline") == 0
    run_dir = Path(pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")["run_dir"][0])
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_score_command_scores_a_folder(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    gt = np.zeros((20, 20, 10), dtype=np.uint8)
    gt[5:15, 5:15, 2:8] = 1
    gt[8:12, 8:12, 3:6] = 2
    pred = gt.copy()
    pred[5:7] = 0
    for folder, volume in (("gt", gt), ("pred", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / folder / "case01.nii.gz")
    assert main(["score", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 0
    scores = pd.read_csv(tmp_path / "pred" / "scores.csv")
    class1 = scores[(scores["case"] == "case01") & (scores["class"].astype(str) == "1")]
    # Class 1: 10x10x6 minus the 4x4x3 class-2 core = 552 voxels; zeroing x = 5, 6 removes 2x10x6 = 120 of them.
    assert class1["dice"].iloc[0] == pytest.approx(2 * 432 / (552 + 432), abs=1e-6)
    assert "case01" in capsys.readouterr().out
    assert main(["score", str(tmp_path / "missing"), str(tmp_path / "gt")]) == 2


def test_reevaluate_reproduces_the_row_and_evaluates_the_other_network(tmp_path, capsys):
    from benchmark.reevaluate import main as reevaluate_main

    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.2", "--method", "cps") == 0
    table = check_finished_run(tmp_path, "synthetic_acdc")
    run_dir = Path(table["run_dir"][0])
    before = sorted(p.name for p in (tmp_path / "lb").iterdir())
    assert reevaluate_main([str(run_dir)]) == 0
    assert f"dice={table['dice'][0]:.4f}" in capsys.readouterr().out  # its own settings: the row's number
    assert reevaluate_main([str(run_dir), "--set", "method.predict_with=model2"]) == 0
    assert "method.predict_with=model2" in capsys.readouterr().out
    assert reevaluate_main([str(run_dir), "--batchnorm-from", "labeled+unlabeled", "--batchnorm-batches", "2"]) == 0
    assert "BatchNorm statistics from 2 labeled+unlabeled training batches" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "lb").iterdir()) == before and len(list(run_dir.glob("reevaluated_last_*.csv"))) == 3
    # the validation cases: the best checkpoint's validation Dice is the one its run logged when choosing it
    curve = pd.read_csv(tmp_path / "lb" / "curves" / "synthetic_acdc" / f"{run_dir.name}.csv")
    assert reevaluate_main([str(run_dir), "--checkpoint", "best", "--split", "val"]) == 0
    assert f"dice={curve['val/dice'].max():.4f}" in capsys.readouterr().out
    assert len(list(run_dir.glob("reevaluated_val_best_*.csv"))) == 1
    assert reevaluate_main([str(tmp_path)]) == 2  # not a run folder
    assert reevaluate_main([str(run_dir), "--batchnorm-from", "labeled", "--batchnorm-batches", "0"]) == 2
    # a run written before a flag existed: the flag can still be named, at the value the run computed with
    config_file = run_dir / "config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    del saved["trainer"]["channels_last"]
    config_file.write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert reevaluate_main([str(run_dir), "--set", "trainer.channels_last=false"]) == 0
    assert f"dice={table['dice'][0]:.4f}" in capsys.readouterr().out


def test_keys_newer_than_a_run_are_added_at_their_neutral_value_where_the_method_has_them():
    from benchmark.config import HASH_NEUTRAL_VALUES, add_keys_newer_than_the_run
    from methods.registry import get_method

    old = {"method": {"temperature": 0.07}, "trainer": {"max_steps": 10}}
    completed = add_keys_newer_than_the_run(old, get_method("mms").defaults)
    assert completed["method"]["faithful_batch_statistics_at_test"] is False
    assert "joint_student_pass" not in completed["method"]  # Mean Teacher's flag, not MMS's
    assert completed["trainer"]["channels_last"] == HASH_NEUTRAL_VALUES[("trainer", "channels_last")]
    assert "faithful_batch_statistics_at_test" not in old["method"]  # the caller's dict is left alone


def test_batchnorm_statistics_are_re_estimated_as_the_average_over_training_batches():
    from benchmark.reevaluate import reestimate_batchnorm
    from core.errors import UserError
    from tests.method_helpers import build_method, random_batch

    model = build_method("mean_teacher", patch=(32, 32))
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(model, n_labeled=2, n_unlabeled=3, generator=generator) for _ in range(3)]
    first_norm = next(m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    inputs = []
    hook = first_norm.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    assert reestimate_batchnorm(model, batches, "labeled+unlabeled") == 3
    hook.remove()
    assert [x.shape[0] for x in inputs[1:]] == [5, 5, 5]  # after the one-image probe: both streams in one batch
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs[1:]]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs[1:]]).mean(0)
    torch.testing.assert_close(first_norm.running_mean, means)
    torch.testing.assert_close(first_norm.running_var, variances)
    assert first_norm.momentum == 0.1 and not model.training
    # the teacher is not what the method tests: its statistics stay as they were
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())
    supervised = build_method("supervised", patch=(32, 32))
    with pytest.raises(UserError, match="no unlabeled stream"):
        reestimate_batchnorm(supervised, [random_batch(supervised, n_unlabeled=0)], "labeled+unlabeled")
    supervised.net = torch.nn.Conv2d(1, 4, 1)  # a network without normalisation layers
    with pytest.raises(UserError, match="no BatchNorm layer"):
        reestimate_batchnorm(supervised, [random_batch(supervised, n_unlabeled=0)], "labeled")


def test_gradients_reports_each_terms_gradient_per_module(tmp_path, capsys):
    from benchmark.gradients import gradient_norms, main as gradients_main

    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.2", "--method", "fba_net") == 0
    table = check_finished_run(tmp_path, "synthetic_acdc")
    run_dir = Path(table["run_dir"][0])
    norms, step = gradient_norms(run_dir, "last", batches=2)
    assert step == table["steps"][0]
    assert {"loss", "supervised", "contrastive"} <= set(norms.index)
    assert list(norms.columns) == ["value", "net", "contrastive_modules"]
    # The Dice term never reaches the contrastive modules (they read the logits, the Dice does not read them);
    # it does train the network. The contrast trains its own modules.
    assert norms.loc["supervised", "contrastive_modules"] == 0 and norms.loc["supervised", "net"] > 0
    assert norms.loc["contrastive", "contrastive_modules"] > 0
    assert gradients_main([str(run_dir), "--batches", "1"]) == 0
    assert f"(last, step {step})" in capsys.readouterr().out
    assert gradients_main([str(tmp_path)]) == 2  # not a run folder
    assert gradients_main([str(run_dir), "--batches", "0"]) == 2
    # A stopped run holds only its resume checkpoint: --checkpoint resume reads it (here the final state, renamed)
    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir, stopped)
    (stopped / "checkpoints" / "best.ckpt").unlink(missing_ok=True)
    (stopped / "checkpoints" / "last.ckpt").rename(stopped / "checkpoints" / "resume.ckpt")
    resumed, resumed_step = gradient_norms(stopped, "resume", batches=2)
    assert resumed_step == step
    pd.testing.assert_frame_equal(resumed, norms)
    assert gradients_main([str(run_dir), "--checkpoint", "resume"]) == 2  # finished: its resume.ckpt is gone
    assert "no resume checkpoint" in capsys.readouterr().err


def test_at_step_makes_ramp_ups_read_the_checkpoints_step_without_a_trainer():
    import pytorch_lightning as pl

    from benchmark.gradients import at_step

    model = pl.LightningModule()
    assert model.global_step == 0  # Lightning's value without a Trainer
    at_step(model, 1500)
    assert model.global_step == 1500 and isinstance(model, pl.LightningModule)
