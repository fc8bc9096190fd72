"""The sweep runner: grid expansion and sharding, skipping and resuming, claims, failures, bad input, launchers."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark import leaderboard, sweep as sweep_module
from benchmark.cli import main
from benchmark.sweep import GridPoint, SweepOptions, claim, expand_grid, parse_shard, plan, shard, sweep
from core.errors import UserError
from tests.conftest import PROJECT_ROOT, cli_in_fresh_interpreter
from tests.test_tune import _wait_for as wait_for

SMOKE_GRID = ["--dataset", "synthetic_acdc", "--profile", "smoke", "--methods", "supervised", "--ratios", "0.2"]


def sweep_cli(tmp_path: Path, *args: str) -> int:
    return main(["sweep", *SMOKE_GRID, "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"), *args])


def options(tmp_path: Path, **changes) -> SweepOptions:
    values = dict(dataset="synthetic_acdc", methods=["supervised"], ratios=[0.2], seeds=[0], profile="smoke",
                  out=str(tmp_path / "runs"), leaderboard_dir=str(tmp_path / "lb"))
    return SweepOptions(**{**values, **changes})


def table(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv", dtype={"seed": str})


# ---- grid and shards ------------------------------------------------------------------------------------------
def test_grid_is_seed_major_without_repeats():
    grid = expand_grid(["supervised", "mean_teacher", "supervised"], [0.1, 0.2], [0, 1, 0])
    assert len(grid) == 2 * 2 * 2
    assert grid[:4] == [GridPoint("supervised", 0.1, 0), GridPoint("mean_teacher", 0.1, 0),
                        GridPoint("supervised", 0.2, 0), GridPoint("mean_teacher", 0.2, 0)]
    assert {p.seed for p in grid[4:]} == {1}


def test_shards_are_disjoint_cover_the_grid_and_do_not_depend_on_the_machine():
    grid = expand_grid(["supervised", "mean_teacher", "cps"], [0.05, 0.1], [0, 1, 2])
    shards = [shard(grid, i, 4) for i in range(4)]
    assert sorted(map(len, shards)) == [4, 4, 5, 5]
    assert sorted((p for s in shards for p in s), key=grid.index) == grid
    assert shard(grid, 1, 4) == [grid[1], grid[5], grid[9], grid[13], grid[17]]
    assert shard(grid, 0, 1) == grid


@pytest.mark.parametrize("text", ["2/2", "-1/3", "a/b", "1", "0/0", "1/2/3"])
def test_bad_shards(text):
    with pytest.raises(UserError, match="i/n"):
        parse_shard(text)


def test_shard_text():
    assert parse_shard("3/4") == (3, 4) and parse_shard(None) == (0, 1)


# ---- bad input stops the sweep before anything is written ------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--methods", "supervised", "mean_teachr"], "unknown method 'mean_teachr'"),
    (["--methods", ""], "the sweep grid is empty: no METHODS"),
    (["--seeds", ","], "no SEEDS"),
    (["--ratios", "0.2", "1.5"], "each ratio must be a number in (0, 1]"),
    (["--seeds", "zero"], "SEEDS holds 'zero'"),
    (["--shard", "4/4"], "not of the form i/n"),
    (["--shard", "1/3"], "holds no grid point"),
    (["--launcher", "kubernetes"], "unknown launcher 'kubernetes'"),
    (["--devices", "2", "--in-process"], "--in-process cannot run DDP"),
])
def test_bad_sweep_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    assert sweep_cli(tmp_path, "--seeds", "0", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))
    assert not (tmp_path / "lb" / "synthetic_acdc.csv").exists()


def test_damaged_leaderboard_stops_the_sweep(tmp_path, capsys):
    (tmp_path / "lb").mkdir()
    damaged = tmp_path / "lb" / "synthetic_acdc.csv"
    damaged.write_text("dataset,method\n\"unterminated\n")
    assert sweep_cli(tmp_path, "--seeds", "0") == 2
    assert "leaderboard CSV is damaged" in capsys.readouterr().err
    assert damaged.read_text() == "dataset,method\n\"unterminated\n"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


def test_locked_leaderboard_stops_the_sweep(tmp_path, capsys, monkeypatch):
    (tmp_path / "lb").mkdir()
    monkeypatch.setattr(leaderboard, "LOCK_TIMEOUT_S", 0.2)
    with open(tmp_path / "lb" / "synthetic_acdc.csv.lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process in the middle of an append that never ends
        assert sweep_cli(tmp_path, "--seeds", "0") == 2
    err = capsys.readouterr().err
    assert "leaderboard is locked by another process" in err and "fuser" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


# ---- running, skipping, failing --------------------------------------------------------------------------------
def test_in_process_sweep_runs_then_skips_what_is_done(tmp_path, capsys, one_torch_thread):
    assert sweep_cli(tmp_path, "--seeds", "0", "--in-process") == 0
    rows = table(tmp_path)
    assert rows["checkpoint"].tolist() == ["last", "best"] and (rows["status"] == "ok").all()
    planned = plan(options(tmp_path))
    assert rows["config_hash"][0] == planned[0].config_hash  # the planned hash is the hash the run wrote
    capsys.readouterr()
    assert sweep_cli(tmp_path, "--seeds", "0", "--in-process") == 0
    assert "skip (already in the leaderboard) 1/1" in capsys.readouterr().out
    assert len(table(tmp_path)) == 2


def test_a_run_that_raises_is_recorded_and_the_sweep_goes_on_and_a_resume_retries_it(tmp_path, monkeypatch, capsys, one_torch_thread):
    from benchmark import run as run_module

    real_run = run_module.run

    def run_failing_seed_0(config, **options):
        if config["run"]["seed"] == 0:
            raise RuntimeError("boom in seed 0")
        return real_run(config, **options)

    monkeypatch.setattr(run_module, "run", run_failing_seed_0)
    assert sweep_cli(tmp_path, "--seeds", "0", "1", "--in-process") == 1
    rows = table(tmp_path)
    failed = rows[rows["status"] == "failed"]
    assert failed["seed"].tolist() == ["0"] and "RuntimeError: boom in seed 0" in failed["error"].iloc[0]
    assert failed["config_hash"].iloc[0] == rows[rows["seed"] == "1"]["config_hash"].iloc[0]
    assert rows[rows["seed"] == "1"]["status"].tolist() == ["ok", "ok"]
    assert "FAILED 1/2" in capsys.readouterr().out

    monkeypatch.setattr(run_module, "run", real_run)
    assert sweep_cli(tmp_path, "--seeds", "0", "1", "--in-process") == 0  # the failed row does not count as done
    rows = table(tmp_path)
    assert sorted(rows[rows["status"] == "ok"]["seed"]) == ["0", "0", "1", "1"] and len(rows) == 5


def test_a_run_killed_by_a_signal_gets_a_failed_row(tmp_path, monkeypatch, capsys):
    suicide = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    monkeypatch.setattr(sweep_module, "run_command", lambda argv: suicide)
    assert sweep_cli(tmp_path, "--seeds", "0", "1") == 1
    rows = table(tmp_path)
    assert rows["status"].tolist() == ["failed", "failed"] and rows["seed"].tolist() == ["0", "1"]
    assert rows["error"].str.contains("killed by SIGKILL").all()
    assert (rows["labeled_cases"] == 4).all() and (rows["checkpoint"] == "none").all()


def test_a_point_claimed_by_another_sweep_is_left_to_it(tmp_path, capsys):
    planned = plan(options(tmp_path))[0]
    with claim(tmp_path / "lb", planned) as descriptor:
        assert descriptor is not None
        outcomes = sweep(options(tmp_path))
    assert outcomes[0].status == "claimed"
    assert "another sweep is running it" in capsys.readouterr().out
    assert not (tmp_path / "lb" / "synthetic_acdc.csv").exists()


def test_dry_run_lists_the_plan(tmp_path, capsys):
    assert sweep_cli(tmp_path, "--seeds", "0", "1", "--dry-run", "--methods", "supervised", "mean_teacher") == 0
    out = capsys.readouterr().out
    assert out.count("[sweep] to run") == 4 and "mean_teacher ratio=0.2 seed=1" in out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


def test_a_point_run_in_its_own_process_gets_the_request_the_sweep_planned(tmp_path):
    """A point's subprocess parses the request's command line: the same request, hence config and hash, whichever
    parser reads it."""
    from benchmark.cli import build_parser
    from benchmark.run_command import run_parser
    from benchmark.run_request import RunRequest
    from benchmark.sweep import run_request

    settings = options(tmp_path, devices=2, wandb="offline", data_root=str(tmp_path), overrides=["trainer.max_steps=3"])
    request = run_request(settings, GridPoint("mean_teacher", 0.1, 3))
    for parser in (run_parser(), build_parser()):
        assert RunRequest.from_args(parser.parse_args(request.argv())) == request
    assert request.method == "mean_teacher" and request.overrides[-1] == "trainer.max_steps=3"


def test_planning_builds_no_datamodule_and_imports_no_method(tmp_path, monkeypatch):
    from benchmark.catalogue import catalogue
    from datamodules.base import SemiSupervisedDataModule

    catalogue()  # built (or read) before: building it reads the registries

    def refuse(*args, **kwargs):
        raise AssertionError("a DataModule was built while planning")

    monkeypatch.setattr(SemiSupervisedDataModule, "__init__", refuse)
    monkeypatch.setattr("datamodules.registry.build_datamodule", refuse)
    monkeypatch.setattr("methods.registry.get_method", refuse)
    planned = plan(options(tmp_path, seeds=[0, 1], methods=["supervised", "mean_teacher"]))
    assert len(planned) == 4 and {p.config["data"]["labeled"] for p in planned} == {4}
    assert sweep_cli(tmp_path, "--seeds", "0", "1", "--dry-run", "--methods", "supervised", "mean_teacher") == 0


def test_a_dry_run_imports_neither_torch_nor_lightning(tmp_path):
    from benchmark.catalogue import catalogue

    catalogue()  # the subprocess reads this session's catalogue (building it would import every method)
    argv = ["sweep", *SMOKE_GRID, "--seeds", "0", "1", "--methods", "supervised", "mean_teacher", "--out", str(tmp_path / "runs"),
            "--leaderboard-dir", str(tmp_path / "lb"), "--dry-run"]
    heavy, printed = cli_in_fresh_interpreter(argv)
    assert heavy == [] and printed.count("[sweep] to run") == 4


def test_runs_carry_the_sweep_name_and_sweep_settings(tmp_path):
    planned = plan(options(tmp_path, seeds=[0, 1], name="my-sweep", overrides=["trainer.max_steps=3"]))
    assert [p.config["run"]["sweep"] for p in planned] == ["my-sweep", "my-sweep"]
    assert planned[0].config["trainer"]["max_steps"] == 3
    assert planned[0].config_hash == planned[1].config_hash  # seeds repeat one experiment
    default_name = options(tmp_path, seeds=[0, 1]).sweep_name()
    assert default_name == options(tmp_path, seeds=[1, 0], shard="1/2").sweep_name()  # shards share the W&B group


# ---- subprocess sweeps: kills, resume, concurrency, submitit ----------------------------------------------------
def sweep_command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark", "sweep", *SMOKE_GRID, "--out", str(tmp_path / "runs"),
            "--leaderboard-dir", str(tmp_path / "lb"), *args]


def start_sweep(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen(sweep_command(tmp_path, *args), cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


def is_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # a zombie waiting for a reaper has stopped running


def kill_at_line(process: subprocess.Popen, marker: str) -> str:
    """Read the sweep's output until a line contains ``marker``, then SIGKILL the sweep; returns that line."""
    for line in process.stdout:
        if marker in line:
            process.kill()
            process.wait()
            return line
    raise AssertionError(f"the sweep ended before printing {marker!r} (exit {process.wait()})")


def ok_keys(rows: pd.DataFrame) -> list[tuple]:
    ok = rows[rows["status"] == "ok"]
    return sorted(zip(ok["config_hash"], ok["seed"], ok["checkpoint"]))


@pytest.mark.slow
def test_resume_after_the_sweep_is_killed_between_and_inside_runs(tmp_path):
    seeds = ["--seeds", "0", "1", "2"]
    # Killed between runs: right after the first point is reported done.
    kill_at_line(start_sweep(tmp_path, *seeds), "[sweep] ok 1/3")
    rows = table(tmp_path)
    done_after_first_kill = set(rows["seed"])
    assert "0" in done_after_first_kill and (rows["status"] == "ok").all()
    assert rows.groupby("seed").size().eq(2).all()  # last and best, never half a run

    # Killed inside a run: once the run has written its config (it is training), kill the sweep.
    process = start_sweep(tmp_path, *seeds)
    started = None
    for line in process.stdout:
        if "[sweep] start" in line:
            started = line
            break
    assert started is not None and "pid=" in started
    run_pid = int(started.rsplit("pid=", 1)[1])
    seed = started.split("seed=", 1)[1].split()[0]
    wait_for(lambda: any((tmp_path / "runs").rglob(f"L4_s{seed}_*/config.yaml")) or is_gone(run_pid), "the run to start training", 600)
    process.kill()
    process.wait()
    wait_for(lambda: is_gone(run_pid), "the orphaned run to die with its sweep", 60)
    rows = table(tmp_path)
    assert seed not in set(rows["seed"]) and set(rows["seed"]) == done_after_first_kill

    # The resumed sweep runs the rest, once each.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(sweep_command(tmp_path, *seeds), cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "skip (already in the leaderboard) 1/3" in result.stdout
    rows = table(tmp_path)
    assert len(rows) == 6 and (rows["status"] == "ok").all()
    assert len(set(ok_keys(rows))) == 6 and sorted(set(rows["seed"])) == ["0", "1", "2"]


@pytest.mark.slow
def test_two_concurrent_sweeps_run_each_point_once(tmp_path):
    seeds = ["--seeds", "0", "1"]
    sweeps = [start_sweep(tmp_path, *seeds) for _ in range(2)]
    outputs = [process.communicate(timeout=1200)[0] for process in sweeps]
    assert [process.returncode for process in sweeps] == [0, 0], outputs
    rows = table(tmp_path)
    assert len(rows) == 4 and (rows["status"] == "ok").all() and len(set(ok_keys(rows))) == 4
    assert sum(output.count("[sweep] ok ") for output in outputs) == 2  # each point trained by exactly one sweep


@pytest.mark.slow
def test_a_raising_run_in_a_subprocess_writes_exactly_one_failed_row(tmp_path):
    # Every value a user can set is checked before a run starts (benchmark/schema.py), so the run is made to raise
    # inside training by a sitecustomize module that the sweep's subprocesses import at start-up.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import methods.base\n\n\ndef configure_optimizers(self):\n    raise RuntimeError('boom in configure_optimizers')\n\n\n"
        "methods.base.SemiSupervisedMethod.configure_optimizers = configure_optimizers\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(hook)])}
    result = subprocess.run(sweep_command(tmp_path, "--seeds", "0"), cwd=PROJECT_ROOT,
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1 and "FAILED 1/1" in result.stdout, result.stderr[-3000:]
    rows = table(tmp_path)
    assert rows["status"].tolist() == ["failed"] and "boom in configure_optimizers" in rows["error"][0]


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path, one_torch_thread):
    assert sweep_cli(tmp_path, "--seeds", "0", "--launcher", "submitit-local") == 0
    rows = table(tmp_path)
    assert rows["checkpoint"].tolist() == ["last", "best"] and (rows["status"] == "ok").all()
    assert list((tmp_path / "runs" / "submitit").rglob("*_result.pkl"))
    assert sweep_cli(tmp_path, "--seeds", "0", "--launcher", "submitit-local") == 0
    assert len(table(tmp_path)) == 2


def test_slurm_executor_parameters(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    executor = sweep_module.make_executor(options(
        tmp_path, launcher="slurm", devices=4, num_nodes=2, slurm_partition="gpu", slurm_time_min=90,
        slurm_cpus_per_task=8, slurm_params=["account=proj"], slurm_setup=["module load cuda"]))
    parameters = executor.parameters
    assert parameters["partition"] == "gpu" and parameters["time"] == 90 and parameters["nodes"] == 2
    assert parameters["ntasks_per_node"] == 4 and parameters["gpus_per_node"] == 4 and parameters["cpus_per_task"] == 8
    assert parameters["additional_parameters"] == {"account": "proj"} and parameters["setup"] == ["module load cuda"]
    script = executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --nodes=2", "#SBATCH --time=90", "#SBATCH --account=proj", "module load cuda"):
        assert line in script, line
    with pytest.raises(UserError, match="KEY=VALUE"):
        sweep_module.make_executor(options(tmp_path, launcher="slurm", slurm_params=["account"]))


def test_failure_reasons():
    from benchmark.sweep import failure_reason

    assert failure_reason(-9, "") == "killed by SIGKILL (out of memory? the kernel's OOM killer sends SIGKILL)"
    assert failure_reason(-15, "") == "killed by SIGTERM"
    traceback = "Traceback (most recent call last):\n  File x\nValueError: unknown optim.schedule 'bogus'\n"
    assert failure_reason(1, traceback) == "exit code 1: ValueError: unknown optim.schedule 'bogus'"
    user_error = "error: needs DATA_ROOT\n  where: acdc\n  fix:   give it\n"
    assert failure_reason(2, user_error) == "exit code 2: error: needs DATA_ROOT"
    assert failure_reason(3, "") == "exit code 3: no error output"


def test_local_runs_do_not_inherit_launcher_ranks(monkeypatch):
    """A sweep inside an sbatch/srun allocation: its runs must not take SLURM_PROCID for their own DDP rank;
    a submitit task (one rank of a multi-task run) keeps it."""
    from benchmark.sweep import run_subprocess

    probe = [sys.executable, "-c", "import os, sys; sys.stderr.write(os.environ.get('SLURM_PROCID', 'none') + ' ' + os.environ.get('RANK', 'none'))"]
    monkeypatch.setattr(sweep_module, "run_command", lambda argv: probe)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("RANK", "3")
    assert run_subprocess([]) == (0, "none none")
    assert run_subprocess([], own_job=False) == (0, "3 3")
