"""Runs stopped by SIGTERM (SLURM, Kubernetes, `timeout`) or SIGINT (Ctrl+C): exit 143 / 130, one line saying the run
was stopped and how to resume it, no leaderboard row, and a sweep that counts the point as not done.

Lightning alone turns a SIGTERM during training into a clean exit 0 (its SIGTERMException is a SystemExit without a
code) and Ctrl+C into exit 1; benchmark/stops.py replaces both.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from benchmark import sweep as sweep_module
from benchmark.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG_RUN = ["run", "--profile", "smoke", "--no-progress", "--dataset", "synthetic_acdc", "--ratio", "0.2",
            "--set", "trainer.max_steps=100000", "--set", "trainer.val_every=2"]


class _SignalInsideFinalizer:
    """Sends ``signum`` to its own process from ``__del__``: Python prints and drops the exception the handler raises
    there, as it would for a signal landing in a DataLoader iterator's ``__del__`` while it joins its workers."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        time.sleep(0.01)  # the handler runs here, inside the finalizer


def _lose_a_stop_signal_in_a_finalizer_at_step(step: int, signum: int) -> None:
    """In the forked child only: a Trainer callback that, at training step ``step``, lets ``signum`` arrive inside a
    finalizer."""
    import pytorch_lightning as pl

    from benchmark import trainer_setup

    class LoseASignal(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                _SignalInsideFinalizer(signum)  # created and finalized at once

    overlays = trainer_setup.overlay_callbacks
    trainer_setup.overlay_callbacks = lambda config: [*overlays(config), LoseASignal()]


def _child(workspace: Path, stderr_file: Path, extra: list[str], lost_signal: int | None = None) -> None:
    if lost_signal is not None:
        _lose_a_stop_signal_in_a_finalizer_at_step(3, lost_signal)
    os.setpgrp()  # a process group of its own, signalled as a whole as SLURM, Kubernetes and Ctrl+C do
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        code = main([*LONG_RUN, "--out", str(workspace / "runs"), "--leaderboard-dir", str(workspace / "lb"), *extra])
    stderr_file.write_text(stderr.getvalue())
    # The way the CLI ends: Python's exit, where multiprocessing ends the loader workers still running (os._exit
    # would skip that and leave them orphaned).
    sys.exit(code)


def group_ended(pgid: int, grace_s: float = 15.0) -> bool:
    """Whether every process of group ``pgid`` (a run and its loader workers) has ended within ``grace_s``; kills
    the ones left, so that none outlives the test holding its output pipes."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    return False


def stop_while_training(workspace: Path, signum: int, extra: list[str] = ()) -> tuple[int, str]:
    """Start a long smoke run in a forked child, send ``signum`` to its process group once it has written a resumable
    checkpoint; returns (exit code, error output)."""
    stderr_file = workspace / "stderr.txt"
    child = multiprocessing.get_context("fork").Process(target=_child, args=(workspace, stderr_file, list(extra)))
    child.start()
    deadline = time.monotonic() + 120
    while not any((workspace / "runs").rglob("resume.ckpt")):
        assert child.is_alive() and time.monotonic() < deadline, "the run ended or never checkpointed"
        time.sleep(0.1)
    os.killpg(child.pid, signum)  # the run and its loader workers
    child.join(60)
    assert group_ended(child.pid), "a process of the stopped run (a loader worker) outlived it"
    return child.exitcode, stderr_file.read_text() if stderr_file.exists() else ""


@pytest.mark.slow  # a real training run in a forked child for a few steps: 10-30 s on 2 busy cores
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_lost_inside_a_finalizer_still_stops_the_run(tmp_path, signum, code):
    stderr_file = tmp_path / "stderr.txt"
    child = multiprocessing.get_context("fork").Process(target=_child, args=(tmp_path, stderr_file, [], signum))
    child.start()
    child.join(180)
    if child.is_alive():  # the stop was lost and the run trains on: end it, and fail below
        os.killpg(child.pid, signal.SIGKILL)
        child.join()
    assert group_ended(child.pid), "a process of the stopped run (a loader worker) outlived it"
    stderr = stderr_file.read_text() if stderr_file.exists() else ""
    assert child.exitcode == code, stderr[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "RESUME=" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    assert not (tmp_path / "lb" / "synthetic_acdc.csv").exists()


@pytest.mark.slow  # a real training run in a forked child until its first checkpoint: 15-35 s on 2 busy cores
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_run_exits_with_the_signal_code_says_how_to_resume_and_writes_no_row(tmp_path, signum, code):
    exit_code, stderr = stop_while_training(tmp_path, signum, ["--set", "data.num_workers=2", "--set", "data.cache_decoded=false"])
    assert exit_code == code, stderr[-2000:]
    run_dir = next((tmp_path / "runs").rglob("config.yaml")).parent
    assert f"stopped by {signal.Signals(signum).name}" in stderr and f"RESUME={run_dir}" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    assert not (tmp_path / "lb" / "synthetic_acdc.csv").exists()  # neither an ok nor a failed row


@pytest.mark.parametrize("program", ["import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "raise SystemExit(143)",
                                     "raise SystemExit(130)"])
def test_a_sweep_counts_a_stopped_point_as_not_done_and_writes_no_row(tmp_path, monkeypatch, capsys, program):
    monkeypatch.setattr(sweep_module, "run_command", lambda argv: [sys.executable, "-c", program])
    code = main(["sweep", "--dataset", "synthetic_acdc", "--profile", "smoke", "--methods", "supervised", "--ratios", "0.2",
                 "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb")])
    assert code == 1
    assert "STOPPED" in capsys.readouterr().out
    assert not (tmp_path / "lb" / "synthetic_acdc.csv").exists()
