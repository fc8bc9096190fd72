"""Faults of the environment: a disk that fills up under the run folder, file permissions under the umask, a
device count that does not fit (one message, not one per rank), a file that is not a checkpoint at all."""
from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch

from benchmark import checkpoints
from benchmark.checkpoints import read_checkpoint
from benchmark.cli import main
from benchmark.leaderboard import append_rows
from core.atomic import write_text_atomically
from core.errors import UserError
from tests.bad_input_catalogue import earlier_row
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = ["run", "--profile", "smoke", "--no-progress", "--dataset", "synthetic_acdc", "--ratio", "0.2",
       "--set", "trainer.max_steps=4", "--set", "trainer.val_every=2"]


def cli(tmp_path: Path, *extra: str) -> tuple[int, str]:
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        code = main([*RUN, "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"), *extra])
    return code, stderr.getvalue()


def _full_after(calls: int, original):
    """``original``, raising ENOSPC from its ``calls``-th call on (the disk filled up after the first writes)."""
    count = [0]

    def write(*args, **kwargs):
        count[0] += 1
        if count[0] >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)
    return write


@pytest.mark.slow  # two smoke runs (about 7 s each on 2 idle cores, 15 s on busy ones)
@pytest.mark.parametrize("writer", ["checkpoint", "training log"])
def test_a_disk_full_under_the_run_folder_is_one_message_no_row_and_the_run_resumes(tmp_path, monkeypatch, writer):
    from lightning_fabric.loggers.csv_logs import _ExperimentWriter

    if writer == "checkpoint":  # the first validation's two checkpoints fit, the third write does not
        monkeypatch.setattr(checkpoints.torch, "save", _full_after(3, torch.save))
    else:  # the CSV log, once a checkpoint exists (before, the run leaves nothing: its folder is removed)
        original = _ExperimentWriter.save

        def save(writer):
            if any(Path(writer.log_dir).parent.rglob("*.ckpt")):
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
            return original(writer)
        monkeypatch.setattr(_ExperimentWriter, "save", save)
    code, stderr = cli(tmp_path)
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    run_dir = next((tmp_path / "runs").rglob("config.yaml")).parent
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the disk holding the run folder is full" in errors[0], stderr[-3000:]
    assert f"where: {run_dir}" in stderr and " MB" in errors[0] and f"RESUME={run_dir}" in stderr
    assert not (tmp_path / "lb" / "synthetic_acdc.csv").exists()  # no failed row
    monkeypatch.undo()
    code, stderr = cli(tmp_path, "--resume", str(run_dir))
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "lb" / "synthetic_acdc.csv").read_text().count(",ok,") == 2


def test_files_are_written_under_the_umask_and_a_replaced_file_keeps_its_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        new = tmp_path / "config.yaml"
        write_text_atomically(new, "a: 1\n")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        board = tmp_path / "acdc.csv"
        append_rows(board, [earlier_row("acdc")])
        assert stat.S_IMODE(board.stat().st_mode) == 0o644
        board.chmod(0o664)  # a group-writable shared leaderboard stays so after an append
        append_rows(board, [earlier_row("acdc")])
        assert stat.S_IMODE(board.stat().st_mode) == 0o664
        os.umask(0o077)
        private = tmp_path / "private.yaml"
        write_text_atomically(private, "b: 2\n")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_a_run_writes_its_files_under_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        code, stderr = cli(tmp_path)
    finally:
        os.umask(previous)
    assert code == 0, stderr[-3000:]
    written = [path for folder in ("runs", "lb") for path in (tmp_path / folder).rglob("*")
               if path.is_file() and path.suffix in (".csv", ".yaml", ".json", ".ckpt")]
    modes = {str(path.relative_to(tmp_path)): oct(stat.S_IMODE(path.stat().st_mode)) for path in written}
    assert any(name.endswith(".ckpt") for name in modes) and any(name.endswith("split.json") for name in modes)
    assert set(modes.values()) == {"0o644"}, modes


@pytest.mark.slow  # a process of its own (importing torch and Lightning): 10-30 s on 2 busy cores
def test_a_device_count_that_does_not_divide_the_batch_is_reported_once_before_any_rank_starts(tmp_path):
    # A real process: Lightning would launch the other ranks as processes printing to the same stderr.
    completed = subprocess.run([sys.executable, "-m", "benchmark", *RUN, "--devices", "3", "--out", str(tmp_path / "runs"),
                                "--leaderboard-dir", str(tmp_path / "lb")], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert completed.returncode == 2
    assert completed.stderr.count("error: ") == 1 and "cannot be split evenly over 3 devices" in completed.stderr, completed.stderr[-3000:]
    assert not any((tmp_path / "runs").rglob("config.yaml"))


def test_random_bytes_are_not_a_checkpoint_rather_than_code(tmp_path):
    path = tmp_path / "downloaded.ckpt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match="is not a PyTorch checkpoint file") as raised:
        read_checkpoint(path, "the checkpoint")
    assert "could run code" not in raised.value.message
