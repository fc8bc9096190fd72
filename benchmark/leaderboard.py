"""Leaderboard CSVs: one row per finished (or failed) run and checkpoint kind, appended atomically.

Every append takes an exclusive lock on a sidecar ``.lock`` file, reads the current table and replaces the file
with the new table in one step (core/atomic.py: a temporary file in the same folder, fsynced, renamed). A
reader or a run killed at any point therefore sees either the old or the new table, never a half row; concurrent
writers serialise. A full disk or a read-only folder is a UserError and leaves the table as it was.
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from benchmark.finalize import REPOSITORY_LEADERBOARDS, SMOKE_LEADERBOARDS, leaderboard_dir_for  # noqa: F401 (re-exported)
from core.atomic import remove_stale_temporaries, replaced_atomically
from core.errors import UserError

# The interface columns (issue-level contract) come first, in this order; per-class Dice and provenance follow.
CORE_COLUMNS = [
    "dataset", "method", "profile", "labeled_cases", "seed", "checkpoint",
    "dice", "jaccard", "hd95", "asd", "status", "config_hash",
]
EXTRA_COLUMNS = [
    "labeled_unit", "ratio", "step", "n_cases", "empty_policy", "lcc", "units",
    "steps", "wall_time_s", "cpu_time_s", "peak_rss_mb", "peak_gpu_mb", "devices", "global_batch",
    "git_rev", "torch", "lightning", "host", "run_dir", "finished_at", "error",
]


# A writer holds the lock for the milliseconds of one append; minutes mean a hung or stopped process.
LOCK_TIMEOUT_S = float(os.environ.get("SSL_BENCH_LOCK_TIMEOUT", "300"))


@contextmanager
def locked(path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive lock on ``<csv>.lock``; a UserError when another process keeps it longer than the timeout."""
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock = open(lock_path, "a+")
    except OSError as error:
        raise UserError(f"cannot open the leaderboard lock file ({error.strerror})", where=str(lock_path),
                        fix="make the leaderboard folder writable or choose another LEADERBOARD_DIR") from error
    with lock:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"leaderboard is locked by another process for more than {timeout_s:g} s", where=str(lock_path),
                        fix=f"wait for the other run or sweep to finish; if none is running, find the holder with `fuser {lock_path}`",
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_leaderboard(path: Path) -> pd.DataFrame:
    """The table, or an empty frame if there is none yet; a damaged file is a UserError (never overwritten)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=CORE_COLUMNS)
    try:
        check_whole_lines(path)
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, csv.Error) as error:
        raise UserError(f"leaderboard CSV is damaged ({error})", where=str(path), fix="restore it from git or move it aside") from error
    except OSError as error:
        raise UserError(f"cannot read the leaderboard CSV ({error.strerror})", where=str(path), fix="check its permissions") from error
    missing = [c for c in CORE_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"leaderboard CSV lacks columns {missing}", where=str(path), fix="restore it from git or move it aside")
    return table


def check_whole_lines(path: Path) -> None:
    """Every record has the header's number of fields and the file ends with a line break; pandas alone pads a
    line cut short (a copy or a disk that stopped mid-write) with empty cells and keeps its status ``ok``."""
    text = path.read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    for record in reader:
        if record and len(record) != len(header):
            raise ValueError(f"line {reader.line_num} has {len(record)} fields, the header {len(header)}: the line is cut or was edited")
    if not text.endswith("\n"):
        raise ValueError(f"the last line (line {reader.line_num}) does not end with a line break: the file was cut there "
                         "(if that line is complete, add the line break)")


def recorded_rows(path: Path, run_dir: Path | None) -> list[dict]:
    """The ``ok`` rows a run folder wrote (of every folder if ``run_dir`` is None); a run writes its rows in one
    append, so all of them or none."""
    table = read_leaderboard(path)
    if "run_dir" not in table.columns:
        return []
    ok = table["status"] == "ok"
    return table[ok if run_dir is None else ok & (table["run_dir"] == str(run_dir))].to_dict("records")


def _ordered_columns(existing: list[str], rows: list[dict]) -> list[str]:
    columns = list(existing) or list(CORE_COLUMNS)
    for name in CORE_COLUMNS + [k for row in rows for k in row if k.startswith("dice_")] + EXTRA_COLUMNS:
        if name not in columns:
            columns.append(name)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    rows = list(rows)
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        table = read_leaderboard(path)
        columns = _ordered_columns(list(table.columns), rows)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="raise", lineterminator="\n")
        writer.writeheader()
        for record in table.to_dict("records"):
            writer.writerow({c: record.get(c, "") for c in columns})
        for row in rows:
            writer.writerow({c: _cell(row.get(c, "")) for c in columns})
        remove_stale_temporaries(path.parent, path.name)  # of writers killed while they held the lock
        with replaced_atomically(path) as out:
            out.write(buffer.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.6e}"
    return str(value)


PER_CASE_FOLDER = "per_case"


def per_case_archive(leaderboard_dir: Path, dataset: str, run_name: str, checkpoint: str) -> Path:
    """Where a run's per-case test metrics are kept beside the leaderboard (small CSVs, committed with it)."""
    return Path(leaderboard_dir) / PER_CASE_FOLDER / dataset / f"{run_name}_{checkpoint}.csv"


CURVES_FOLDER = "curves"


def curve_archive(leaderboard_dir: Path, dataset: str, run_name: str) -> Path:
    """Where a run's validation curve (step, val/dice per class) is kept beside the leaderboard, so a reader can
    see whether each row had finished learning without the run folder."""
    return Path(leaderboard_dir) / CURVES_FOLDER / dataset / f"{run_name}.csv"


CONFIGS_FOLDER = "configs"


def config_archive(leaderboard_dir: Path, dataset: str, run_name: str) -> Path:
    """Where a run's config.yaml is kept beside the leaderboard, so the page can say what each row's config changes
    from its profile's defaults from the repository alone (the run folders stay on the machine that ran them)."""
    return Path(leaderboard_dir) / CONFIGS_FOLDER / dataset / f"{run_name}.yaml"


def check_writable(folder: Path) -> None:
    """Fail before training, not after hours of it, when results could not be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"cannot write to {folder} ({error.strerror})", where=str(folder), fix="choose a writable folder (OUT=... / LEADERBOARD_DIR=...)") from error
