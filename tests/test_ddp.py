"""One run on two CPU processes (Lightning DDP over gloo) against the same run on one process.

What must be equal: the split, the global batch, the step count, the config hash (devices are not part of the
experiment), one run folder and one pair of rows written by rank 0 only, and the test metrics within
``METRIC_TOLERANCE``. Why not bit-equal training: the U-Net's BatchNorm normalises each rank's half of the
batch on its own (SyncBatchNorm is CUDA-only), the Dice term of the loss couples the samples of a batch, and each
rank draws its own augmentation and dropout (methods/base.py on_train_start); so the two runs follow different
trajectories, which part as far as two seeds do once the model starts to segment (docs/reliability.md#determinism).
The smoke budget used here ends before that, which is what lets the metrics be compared tightly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import PROJECT_ROOT, run_two_rank_script

METRIC_TOLERANCE = 0.05  # absolute, on per-case Dice and Jaccard in [0, 1]; HD95/ASD within 5 % of their value


def smoke_run(tmp_path: Path, devices: int) -> pd.DataFrame:
    folder = tmp_path / f"devices{devices}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "benchmark", "run", "--dataset", "synthetic_acdc", "--profile", "smoke", "--ratio", "0.2",
         "--seed", "0", "--devices", str(devices), "--no-progress", "--out", str(folder / "runs"),
         "--leaderboard-dir", str(folder / "lb"), "--set", "trainer.accelerator=cpu",
         "--set", "trainer.max_steps=6", "--set", "trainer.val_every=3"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return pd.read_csv(folder / "lb" / "synthetic_acdc.csv")


@pytest.mark.slow
def test_two_cpu_processes_agree_with_one(tmp_path):
    single, ddp = smoke_run(tmp_path, 1), smoke_run(tmp_path, 2)
    for rows in (single, ddp):
        assert rows["checkpoint"].tolist() == ["last", "best"] and (rows["status"] == "ok").all()  # rank 1 wrote nothing
    assert ddp["devices"].tolist() == [2, 2] and single["devices"].tolist() == [1, 1]
    for column in ("config_hash", "labeled_cases", "global_batch", "steps", "step", "n_cases"):
        assert ddp[column].tolist() == single[column].tolist(), column
    assert len(list((tmp_path / "devices2" / "runs").rglob("config.yaml"))) == 1  # one run folder for both ranks

    for kind in ("last", "best"):
        cases_1 = pd.read_csv(Path(single["run_dir"][0]) / f"test_per_case_{kind}.csv")
        cases_2 = pd.read_csv(Path(ddp["run_dir"][0]) / f"test_per_case_{kind}.csv")
        assert cases_1[["case", "class"]].equals(cases_2[["case", "class"]])
        for metric in ("dice", "jaccard"):
            assert (cases_1[metric] - cases_2[metric]).abs().max() <= METRIC_TOLERANCE, (kind, metric)
        for metric in ("hd95", "asd"):
            assert ((cases_1[metric] - cases_2[metric]).abs() <= 0.05 * cases_1[metric].abs() + 1e-6).all(), (kind, metric)

    logs_1 = pd.read_csv(next((tmp_path / "devices1" / "runs").rglob("logs/metrics.csv")))
    logs_2 = pd.read_csv(next((tmp_path / "devices2" / "runs").rglob("logs/metrics.csv")))
    validated = lambda logs: logs.dropna(subset=["val/dice"])["step"].tolist()  # noqa: E731
    assert validated(logs_1) == validated(logs_2) and len(validated(logs_1)) == 2


@pytest.mark.slow
def test_torchrun_launch_writes_one_run_folder_and_one_pair_of_rows(tmp_path):
    """torchrun starts both ranks itself (as on every node of a multi-node job): rank 1 inherits nothing from
    rank 0, finds its rank in RANK and must neither create a folder nor write rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "benchmark", "run", "--dataset", "synthetic_acdc", "--profile", "smoke", "--ratio", "0.2", "--devices", "2",
         "--no-progress", "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"),
         "--set", "trainer.accelerator=cpu"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    assert rows["checkpoint"].tolist() == ["last", "best"] and rows["devices"].tolist() == [2, 2]
    (run_folder,) = (tmp_path / "runs" / "synthetic_acdc" / "supervised").iterdir()
    assert (run_folder / "result.json").is_file()


RANK_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID",
                  "SLURM_JOB_NAME", "SLURM_NTASKS_PER_NODE")


@pytest.mark.parametrize("variables, devices, rank", [
    ({}, 1, 0),
    # torchrun (TorchElasticEnvironment), also inside a SLURM allocation: RANK wins
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2, 3),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, 2, 0),
    # srun tasks (SLURMEnvironment)
    ({"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "2", "LOCAL_RANK": "0"}, 2, 2),
    # an interactive SLURM shell is not an srun launch: Lightning starts the ranks itself
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "bash", "NODE_RANK": "1", "LOCAL_RANK": "0"}, 2, 2),
    # Lightning's own launcher on the second node: LOCAL_RANK alone would say 0
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 4, 4),
    ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, 4, 1),
])
def test_rank_detection_follows_lightning_cluster_environments(monkeypatch, variables, devices, rank):
    from benchmark.run_folder import global_rank

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert global_rank(devices) == rank


@pytest.mark.slow
def test_validation_and_test_cases_are_spread_over_the_ranks_and_gathered(tmp_path):
    run_two_rank_script("ddp_spread_eval.py", tmp_path, master_port=29543)
    seen = [json.loads((tmp_path / f"seen_rank{rank}.json").read_text()) for rank in (0, 1)]
    split = json.loads(next((tmp_path / "runs").rglob("split.json")).read_text())
    val_cases, test_cases = split["val"][:4], split["test"][:4]
    # One validation (at step 2): each rank scored every other case, together all of them once.
    assert seen[0]["val"] == val_cases[0::2] and seen[1]["val"] == val_cases[1::2]
    # Two test evaluations (last and best checkpoints), each spread the same way.
    assert seen[0]["test"] == [test_cases[0::2]] * 2 and seen[1]["test"] == [test_cases[1::2]] * 2
    rows = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    assert rows["checkpoint"].tolist() == ["last", "best"] and (rows["n_cases"] == 4).all()
    per_case = pd.read_csv(Path(rows["run_dir"][0]) / "test_per_case_last.csv")
    assert list(dict.fromkeys(per_case["case"])) == test_cases  # gathered in the split's order


def test_a_rank_only_takes_the_run_folder_of_the_process_that_launched_it(monkeypatch, tmp_path):
    # A test session (or any shell) that once ran a run keeps the variable; a torchrun started from it must not
    # send its ranks into that stale folder.
    from benchmark.run import RUN_DIR_ENV, inherited_run_dir, share_run_dir_with_ranks

    monkeypatch.setenv(RUN_DIR_ENV, "")
    share_run_dir_with_ranks(tmp_path)
    assert inherited_run_dir() is None  # set by this process: only its children take it
    monkeypatch.setenv(RUN_DIR_ENV, f"{os.getppid()}:{tmp_path}")
    assert inherited_run_dir() == tmp_path
    monkeypatch.setenv(RUN_DIR_ENV, f"{os.getppid() + 1}:{tmp_path}")
    assert inherited_run_dir() is None


def test_a_finished_run_releases_its_process_group_and_a_failed_one_does_not(tmp_path, monkeypatch):
    """Left alive, gloo's threads can abort a finished rank at exit (torchrun then reports the run as failed);
    destroying it under a failed rank's partners could deadlock them instead."""
    import torch.distributed as dist

    from benchmark.cli import main
    from core.errors import UserError

    args = ["run", "--dataset", "synthetic_acdc", "--profile", "smoke", "--ratio", "0.2", "--no-progress",
            "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb")]

    def failing_run(config, callbacks=(), resume=None):
        raise UserError("a rank failed")

    try:
        # run() itself releases the group, so scripts calling it directly (tests/scripts/ddp_*.py) are covered too.
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        monkeypatch.setattr("benchmark.run.run_once", failing_run)
        assert main(args) == 2 and dist.is_initialized()
        monkeypatch.setattr("benchmark.run.run_once", lambda config, callbacks=(), resume=None: [])
        assert main(args) == 0 and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
