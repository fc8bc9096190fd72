"""Runs killed with SIGKILL at chosen or random points, then resumed (``run --resume RUN_DIR``).

Every kill is a real ``kill -9`` of a process running the CLI: the test forks a child (cheap: torch and
Lightning are already imported) that arranges to SIGKILL itself when it reaches a named point (the n-th training
step, validation case, checkpoint write, ...), or the parent SIGKILLs it after a random delay. After each kill
the leaderboard must be a well-formed CSV with no partial or duplicated rows, and the resumed run must end with
exactly the test metrics and weights of an uninterrupted run (CPU, same seed: tolerance 0).
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A smoke run long enough to validate (and so checkpoint) several times: 40 steps, validation every 10 on 2
# cases, 2 test cases. Adam at 1e-2 with width 8 already gives non-zero Dice here, so the metrics compared mean
# something (the smoke default of width 4 with SGD predicts background only after 40 steps).
KILLABLE_RUN = ["--dataset", "synthetic_acdc", "--ratio", "0.2", "--set", "trainer.max_steps=40", "--set", "trainer.val_every=10",
                "--set", "trainer.deterministic=true", "--set", "optim.name=adam", "--set", "optim.lr=0.01",
                "--set", "model.base_features=8"]
# ACTION's three stages, 6 steps each with a validation every 2: a kill inside the second stage.
KILLABLE_STAGES = ["--method", "action", "--dataset", "synthetic_acdc", "--ratio", "0.5", "--set", "trainer.max_steps=6",
                   "--set", "trainer.val_every=2", "--set", "trainer.deterministic=true"]


# ---- running the CLI in a child that dies where it is told ---------------------------------------------------
def cli(workspace: Path, options: list[str], *extra: str) -> int:
    return main(["run", "--profile", "smoke", "--no-progress", "--out", str(workspace / "runs"),
                 "--leaderboard-dir", str(workspace / "lb"), *options, *extra])


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def dying_on_call(owner, name: str, call: int, before: bool = True, when=lambda *args, **kwargs: True) -> None:
    """Make ``owner.name`` SIGKILL the process on its ``call``-th call for which ``when(*args)`` holds (before or
    after doing its work)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == call and before:
                die()
        result = original(*args, **kwargs)
        if calls[0] == call and not before and when(*args, **kwargs):
            die()
        return result

    setattr(owner, name, wrapper)


def die_while_writing_a_checkpoint(call: int) -> None:
    """SIGKILL half-way through writing the ``call``-th checkpoint file (the temporary file is left behind)."""
    from benchmark import checkpoints
    from core.atomic import replaced_atomically

    calls = [0]
    original = checkpoints.AtomicCheckpointIO.save_checkpoint

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        calls[0] += 1
        if calls[0] != call:
            return original(self, checkpoint, path, storage_options)
        with replaced_atomically(path, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
            out.flush()
            die()

    checkpoints.AtomicCheckpointIO.save_checkpoint = save_checkpoint


def arm(point: str, n: int) -> None:
    """In the child: die at the ``n``-th passage of ``point``."""
    from benchmark import leaderboard, run
    from core import atomic
    from core.evaluation import Evaluator
    from datamodules.base import SemiSupervisedDataModule
    from methods.base import SemiSupervisedMethod

    if point == "loading":  # decoding the training items before the first step
        dying_on_call(SemiSupervisedDataModule, "load_checked_item", n)
    elif point == "training":
        dying_on_call(SemiSupervisedMethod, "training_step", 1, when=lambda self, *a: self.global_step == n)
    elif point == "training_stage":  # step n of ACTION's second stage
        dying_on_call(SemiSupervisedMethod, "training_step", 1,
                      when=lambda self, *a: self.stage == "pretrain_local" and self.global_step == n)
    elif point == "validation":
        dying_on_call(SemiSupervisedMethod, "validation_step", n)
    elif point == "checkpoint":
        die_while_writing_a_checkpoint(n)
    elif point == "last_checkpoint":  # trained and validated to the end, its resume.ckpt saved, not its last.ckpt
        import pytorch_lightning as pl

        dying_on_call(pl.Trainer, "save_checkpoint", 1, when=lambda self, path, *a, **k: Path(path).name == "last.ckpt")
    elif point == "testing":  # testing the last (n = 1) or the best (n = 2) checkpoint
        dying_on_call(Evaluator, "evaluate", n)
    elif point == "result_json":  # tested, result.json complete but not yet in place, no row yet
        dying_on_call(atomic.os, "replace", 1, when=lambda source, target: Path(target).name == "result.json")
    elif point == "writing_row":  # the new table is written and fsynced, not yet renamed over the CSV
        dying_on_call(atomic.os, "replace", 1, when=lambda source, target: Path(target).suffix == ".csv")
    elif point == "after_row":  # the rows are in, the process dies before it exits
        dying_on_call(leaderboard, "append_rows", 1, before=False)
        run.append_rows = leaderboard.append_rows
    else:
        raise ValueError(point)


def child(workspace: Path, options: list[str], extra: list[str], point: str | None, n: int) -> None:
    if point is not None:
        arm(point, n)
    os._exit(cli(workspace, options, *extra))


def in_child(workspace: Path, options: list[str], *extra: str, point: str | None = None, n: int = 0,
             kill_after_s: float | None = None) -> int:
    """Exit code of the CLI run in a forked child (negative: the signal that ended it)."""
    process = multiprocessing.get_context("fork").Process(target=child, args=(workspace, options, list(extra), point, n))
    process.start()
    if kill_after_s is not None:
        process.join(kill_after_s)
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
    process.join()
    return process.exitcode


# ---- what is checked after each kill and each resume ---------------------------------------------------------
def check_leaderboard(path: Path) -> pd.DataFrame:
    """Well-formed (every line has the header's fields), only whole runs (last + best), no duplicates."""
    if not path.exists():
        return pd.DataFrame(columns=["run_dir", "checkpoint", "status"])
    with open(path, newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines and all(len(line) == len(lines[0]) for line in lines), f"ragged CSV {path}"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert (table["status"] == "ok").all(), table[["run_dir", "status", "error"]]
    assert not table.duplicated(["run_dir", "checkpoint"]).any(), "duplicate rows"
    assert table.groupby("run_dir")["checkpoint"].apply(sorted).map(lambda kinds: kinds == ["best", "last"]).all(), "partial run"
    return table


def run_folders(workspace: Path) -> list[Path]:
    """runs/<dataset>/<method>/<run>/ (a multi-stage run also has a config.yaml in each stage's folder)."""
    runs = workspace / "runs"
    return sorted(path.parent for path in runs.rglob("config.yaml") if len(path.relative_to(runs).parts) == 4)


@dataclass
class Outcome:
    test: dict
    weights: dict[str, torch.Tensor]
    log: pd.DataFrame
    seconds: float = 0.0  # how long the run took in a forked child


def outcome(run_dir: Path, final_stage: str | None = None) -> Outcome:
    """The test summaries of result.json, the final weights (the final stage's last.ckpt) and its training log
    (metrics.csv: the training and validation values by step; the test summaries logged once)."""
    stage_dir = run_dir / final_stage if final_stage else run_dir
    state = torch.load(stage_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    test = json.loads((run_dir / "result.json").read_text())["test"]
    log = pd.read_csv(stage_dir / "logs" / "metrics.csv")
    for kind, summary in test.items():
        logged = log[f"test_{kind}/dice"].dropna().tolist()
        assert logged == [summary["dice"]], f"{run_dir}: metrics.csv logs test_{kind}/dice as {logged}, not once"
    columns = ["step", *sorted(column for column in log.columns if column.startswith(("train/", "val/")))]
    log = log[columns].dropna(how="all", subset=columns[1:])
    return Outcome(test, state, log.sort_values(columns, ignore_index=True))


def assert_same(resumed: Outcome, uninterrupted: Outcome, what: str) -> None:
    assert resumed.test == uninterrupted.test, f"{what}: test metrics differ"
    differing = [name for name, tensor in uninterrupted.weights.items() if not torch.equal(tensor, resumed.weights[name])]
    assert not differing, f"{what}: weights differ in {differing[:3]}"
    pd.testing.assert_frame_equal(resumed.log, uninterrupted.log, check_exact=True, obj=f"{what}: the training log")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Outcome:
    """The reference run, in this process: it also warms the process up (lazy imports, the synthetic data, first
    calls), so that each forked child runs in the seconds a run takes rather than paying that again."""
    workspace = tmp_path_factory.mktemp("uninterrupted")
    assert cli(workspace, KILLABLE_RUN) == 0
    result = outcome(run_folders(workspace)[0])
    forked = tmp_path_factory.mktemp("forked")
    started = time.monotonic()
    assert in_child(forked, KILLABLE_RUN) == 0
    result.seconds = time.monotonic() - started  # what a whole run takes in a fork, for the random external kills
    assert_same(outcome(run_folders(forked)[0]), result, "a forked child")  # children compute what this process does
    return result


def kill_and_resume(workspace: Path, options: list[str], point: str | None, n: int = 0, kill_after_s: float | None = None) -> Path:
    """Kill one run, check the leaderboard, resume it (or start it, if it died before making its folder); returns
    its folder. Several calls may share a workspace (one leaderboard, many runs)."""
    before = set(run_folders(workspace))
    code = in_child(workspace, options, point=point, n=n, kill_after_s=kill_after_s)
    what = f"killed at {point} #{n}" if point else f"killed after {kill_after_s:.2f} s"
    # A named point must be reached; a timed kill may come after the run has finished.
    assert code in ((-signal.SIGKILL,) if point else (-signal.SIGKILL, 0)), f"{what}: exit code {code}"
    check_leaderboard(workspace / "lb" / "synthetic_acdc.csv")
    new = sorted(set(run_folders(workspace)) - before)
    assert len(new) <= 1
    resume = ["--resume", str(new[0])] if new else []
    assert in_child(workspace, options, *resume) == 0, f"{what}: the resume failed"
    table = check_leaderboard(workspace / "lb" / "synthetic_acdc.csv")
    run_dir = new[0] if new else sorted(set(run_folders(workspace)) - before)[0]
    assert (table["run_dir"] == str(run_dir)).sum() == 2, f"{what}: not exactly one pair of rows"
    stale = [*run_dir.rglob(".*.tmp"), *(workspace / "lb").glob(".*.tmp")]
    assert not stale, f"{what}: temporary files of the killed writer remain: {stale}"
    return run_dir


def set_run_clock(checkpoint: Path, seconds: float, cpu_seconds: float | None = None) -> None:
    """Pretend the run had been going for ``seconds`` (and used ``cpu_seconds`` of CPU; None: a checkpoint written
    before CPU time was recorded) when ``checkpoint`` was saved: values no real run of these reaches, so the row
    shows whether the resume carried them over."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert "RunClock" in state["callbacks"], f"{checkpoint} does not carry the run clock"
    assert "cpu_seconds" in state["callbacks"]["RunClock"], f"{checkpoint} does not carry the run's CPU time"
    state["callbacks"]["RunClock"]["seconds"] = seconds
    if cpu_seconds is None:
        del state["callbacks"]["RunClock"]["cpu_seconds"]
    else:
        state["callbacks"]["RunClock"]["cpu_seconds"] = cpu_seconds
    torch.save(state, checkpoint)


def resumed_times(workspace: Path, options: list[str], run_dir: Path, column: str = "wall_time_s") -> tuple[list[str], float]:
    """Resume ``run_dir``: (its rows' ``column`` as written, how long the resume took, measured around the child)."""
    started = time.monotonic()
    assert in_child(workspace, options, "--resume", str(run_dir)) == 0
    took = time.monotonic() - started
    table = check_leaderboard(workspace / "lb" / "synthetic_acdc.csv")
    return list(table.loc[table["run_dir"] == str(run_dir), column]), took


def resumed_wall_times(workspace: Path, options: list[str], run_dir: Path) -> tuple[list[float], float]:
    """Resume ``run_dir``: (its rows' wall_time_s, how long the resume took, measured around the child)."""
    cells, took = resumed_times(workspace, options, run_dir)
    return [float(seconds) for seconds in cells], took


def assert_carried(wall_times: list[float], took: float, carried: float) -> None:
    """Both rows (last, best) count the carried seconds plus at most the resume's own time."""
    assert len(wall_times) == 2, wall_times
    assert all(carried < seconds <= carried + took for seconds in wall_times), (wall_times, carried, took)


# ---- the tests -----------------------------------------------------------------------------------------------
def test_a_run_killed_in_training_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    run_dir = kill_and_resume(tmp_path, KILLABLE_RUN, "training", 25)
    assert_same(outcome(run_dir), uninterrupted, "killed at step 25")
    assert not (run_dir / "checkpoints" / "resume.ckpt").exists()  # superseded by last.ckpt
    metrics = pd.read_csv(run_dir / "logs" / "metrics.csv")
    assert metrics["val/dice"].notna().sum() >= 4  # the logs continue where the checkpoint was


@pytest.mark.parametrize("point", ["last_checkpoint", "testing"])
def test_a_run_killed_after_its_training_resumes_with_its_whole_training_log(tmp_path, uninterrupted, point):
    """The resume trains nothing (from the final resume.ckpt) or nothing at all (from last.ckpt): metrics.csv keeps
    the killed part's log, and the test summaries are logged once (Lightning's CSV logger, resumed, would
    truncate the joined file or delete it)."""
    run_dir = kill_and_resume(tmp_path, KILLABLE_RUN, point, 1)
    assert_same(outcome(run_dir), uninterrupted, f"killed at {point}")


def test_a_run_whose_log_a_kill_left_empty_resumes_and_logs_from_its_checkpoint(tmp_path, uninterrupted):
    """Lightning's CSV writer truncates metrics.csv before writing it again under a wider header: a kill in between
    leaves it empty. The resume must not fail on the log; it keeps what the resumed part logs."""
    assert in_child(tmp_path, KILLABLE_RUN, point="training", n=25) == -signal.SIGKILL
    run_dir = run_folders(tmp_path)[0]
    (run_dir / "logs" / "metrics.csv").write_bytes(b"")
    assert in_child(tmp_path, KILLABLE_RUN, "--resume", str(run_dir)) == 0
    resumed = outcome(run_dir)
    assert resumed.test == uninterrupted.test
    expected = uninterrupted.log[uninterrupted.log["step"] >= resumed.log["step"].min()].reset_index(drop=True)
    assert resumed.log["step"].min() == 20  # from the checkpoint of step 20 on
    pd.testing.assert_frame_equal(resumed.log, expected, check_exact=True)


def test_joining_a_log_tolerates_an_empty_or_missing_part(tmp_path):
    from benchmark.run import join_interrupted_metrics

    interrupted, metrics = tmp_path / "metrics.interrupted.csv", tmp_path / "metrics.csv"
    interrupted.write_text("")
    metrics.write_text("step,train/loss\n5,0.5\n")
    join_interrupted_metrics(interrupted, metrics)
    assert pd.read_csv(metrics).to_dict("list") == {"step": [5], "train/loss": [0.5]} and not interrupted.exists()
    metrics.replace(interrupted)  # a resume that logged nothing: the interrupted part is the whole log
    join_interrupted_metrics(interrupted, metrics)
    assert pd.read_csv(metrics).to_dict("list") == {"step": [5], "train/loss": [0.5]}


def test_a_resumed_run_counts_the_time_before_its_checkpoint(tmp_path, uninterrupted):
    """wall_time_s = the run's seconds when its resume.ckpt was saved + the resume's own, not the resume's only."""
    assert in_child(tmp_path, KILLABLE_RUN, point="training", n=25) == -signal.SIGKILL
    run_dir = run_folders(tmp_path)[0]
    set_run_clock(run_dir / "checkpoints" / "resume.ckpt", 10_000.0, cpu_seconds=5_000.0)
    wall_times, took = resumed_wall_times(tmp_path, KILLABLE_RUN, run_dir)
    assert_carried(wall_times, took, 10_000.0)
    table = check_leaderboard(tmp_path / "lb" / "synthetic_acdc.csv")
    cpu_times = [float(s) for s in table.loc[table["run_dir"] == str(run_dir), "cpu_time_s"]]
    # The resume's own CPU time: more than none, at most its wall time on every core.
    assert len(cpu_times) == 2 and all(5_000 < s <= 5_000 + took * os.cpu_count() for s in cpu_times), (cpu_times, took)
    assert_same(outcome(run_dir), uninterrupted, "resumed with a carried clock")  # the clock does not touch training


def test_a_run_resumed_from_a_checkpoint_without_cpu_time_leaves_its_cpu_time_empty(tmp_path):
    """An older checkpoint has the run's wall seconds but not its CPU seconds: the row says unknown, not the
    resume's part alone."""
    assert in_child(tmp_path, KILLABLE_RUN, point="training", n=25) == -signal.SIGKILL
    run_dir = run_folders(tmp_path)[0]
    set_run_clock(run_dir / "checkpoints" / "resume.ckpt", 10_000.0, cpu_seconds=None)
    cells, _ = resumed_times(tmp_path, KILLABLE_RUN, run_dir, "cpu_time_s")
    assert cells == ["", ""]


def test_a_run_killed_before_its_row_writes_it_once_on_resume_and_a_finished_run_is_left_alone(tmp_path, uninterrupted, capsys):
    run_dir = kill_and_resume(tmp_path, KILLABLE_RUN, "result_json")
    assert_same(outcome(run_dir), uninterrupted, "killed before result.json")
    capsys.readouterr()
    assert cli(tmp_path, KILLABLE_RUN, "--resume", str(run_dir)) == 0
    assert "is finished" in capsys.readouterr().out
    assert len(check_leaderboard(tmp_path / "lb" / "synthetic_acdc.csv")) == 2


def test_a_multi_stage_run_resumes_in_the_interrupted_stage(tmp_path):
    reference = tmp_path / "reference"
    assert cli(reference, KILLABLE_STAGES) == 0
    expected = outcome(run_folders(reference)[0], "finetune")
    assert in_child(tmp_path, KILLABLE_STAGES, point="training_stage", n=3) == -signal.SIGKILL
    run_dir = run_folders(tmp_path)[0]
    first_stage = run_dir / "pretrain_global" / "checkpoints" / "last.ckpt"
    assert first_stage.is_file() and (run_dir / "pretrain_local" / "checkpoints" / "resume.ckpt").is_file()
    # The interrupted stage's resume.ckpt holds the run's latest time; the finished stage's last.ckpt an earlier one.
    set_run_clock(first_stage, 10_000.0)
    set_run_clock(run_dir / "pretrain_local" / "checkpoints" / "resume.ckpt", 20_000.0)
    finished_at = first_stage.stat().st_mtime_ns
    wall_times, took = resumed_wall_times(tmp_path, KILLABLE_STAGES, run_dir)
    assert first_stage.stat().st_mtime_ns == finished_at  # the finished stage was not trained again
    assert_same(outcome(run_dir, "finetune"), expected, "ACTION killed in pretrain_local")
    assert_carried(wall_times, took, 20_000.0)


def test_a_stage_started_over_on_resume_carries_the_time_of_the_finished_stages(tmp_path):
    """Killed before the interrupted stage saved anything: the clock continues from the finished stage's last.ckpt."""
    assert in_child(tmp_path, KILLABLE_STAGES, point="training_stage", n=3) == -signal.SIGKILL
    run_dir = run_folders(tmp_path)[0]
    set_run_clock(run_dir / "pretrain_global" / "checkpoints" / "last.ckpt", 10_000.0)
    (run_dir / "pretrain_local" / "checkpoints" / "resume.ckpt").unlink()  # as if killed before its first save
    wall_times, took = resumed_wall_times(tmp_path, KILLABLE_STAGES, run_dir)
    assert_carried(wall_times, took, 10_000.0)


def test_the_sweep_resumes_an_unfinished_run_folder(tmp_path, capsys):
    from benchmark.cli import main as cli_main

    grid = ["sweep", "--dataset", "synthetic_acdc", "--methods", "supervised", "--ratios", "0.2", "--seeds", "0",
            "--profile", "smoke", "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"), "--in-process",
            "--set", "trainer.max_steps=6", "--set", "trainer.val_every=2"]
    options = ["--dataset", "synthetic_acdc", "--ratio", "0.2", "--set", "trainer.max_steps=6", "--set", "trainer.val_every=2"]
    assert in_child(tmp_path, options, point="training", n=4) == -signal.SIGKILL
    killed = run_folders(tmp_path)[0]
    capsys.readouterr()
    assert cli_main(grid) == 0
    assert f"from {killed}" in capsys.readouterr().out
    table = check_leaderboard(tmp_path / "lb" / "synthetic_acdc.csv")
    assert table["run_dir"].tolist() == [str(killed)] * 2 and len(run_folders(tmp_path)) == 1


# The points a run is killed at: each kind once, then random ones, with a random occurrence each time.
POINT_RANGES = {"loading": (1, 8), "training": (1, 39), "validation": (1, 8), "checkpoint": (1, 5), "last_checkpoint": (1, 1),
                "testing": (1, 2),
                "result_json": (1, 1), "writing_row": (1, 1), "after_row": (1, 1)}
KILLS = 12


@pytest.mark.slow
def test_random_kills_never_damage_the_leaderboard_and_resume_to_the_same_metrics(tmp_path, uninterrupted):
    seed = int(os.environ.get("KILL_TEST_SEED", time.time_ns() % 10_000))
    chooser = random.Random(seed)
    plan = [*POINT_RANGES, "external", "external"]
    plan += [chooser.choice([*POINT_RANGES, "external"]) for _ in range(KILLS - len(plan))]
    chooser.shuffle(plan)
    for index, point in enumerate(plan):
        if point == "external":  # anywhere in the time a whole run takes
            delay = chooser.uniform(0.05, 1.0) * uninterrupted.seconds
            run_dir = kill_and_resume(tmp_path, KILLABLE_RUN, None, kill_after_s=delay)
            what = f"kill {index} (KILL_TEST_SEED={seed}): external after {delay:.2f} s"
        else:
            n = chooser.randint(*POINT_RANGES[point])
            run_dir = kill_and_resume(tmp_path, KILLABLE_RUN, point, n)
            what = f"kill {index} (KILL_TEST_SEED={seed}): {point} #{n}"
        assert_same(outcome(run_dir), uninterrupted, what)
    table = check_leaderboard(tmp_path / "lb" / "synthetic_acdc.csv")
    assert len(table) == 2 * KILLS and table["run_dir"].nunique() == KILLS
