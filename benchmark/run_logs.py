"""A run's logs after Lightning wrote them: the parts of a resumed stage joined into one metrics.csv, the test
summaries appended to it, the validation curve over all stages, and the per-case metrics and curve archived beside
the leaderboard."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from benchmark.leaderboard import config_archive, curve_archive, per_case_archive
from core.atomic import replaced_atomically

if TYPE_CHECKING:
    from benchmark.run_folder import RunFolder


def read_log(metrics: Path) -> pd.DataFrame:
    """A metrics.csv's rows; none if it is missing or empty. Lightning's CSV writer truncates the file before it
    writes it again under a wider header, so a kill can leave it empty; the log must not stop a resume."""
    try:
        return pd.read_csv(metrics)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["step"])


def stack_logs(*parts: pd.DataFrame) -> pd.DataFrame:
    """The parts' rows in order, under the union of their columns; empty parts are left out (pandas warns on
    concatenating them)."""
    return pd.concat([part for part in parts if len(part)] or parts[-1:], ignore_index=True)


def join_interrupted_metrics(interrupted: Path, metrics: Path) -> None:
    """One metrics.csv again: the interrupted part's rows before the first step the resumed part logged (the
    steps between the checkpoint and the kill were trained again), then the resumed part's rows."""
    before, after = read_log(interrupted), read_log(metrics)
    if len(after):
        before = before[before["step"] < after["step"].min()]
    with replaced_atomically(metrics) as out:
        stack_logs(before, after).to_csv(out, index=False)
    interrupted.unlink()


def append_test_metrics(metrics: Path, test_metrics: list[dict[str, float]], step: int) -> None:
    """Append the test summaries (one row each) to a stage's metrics.csv, replacing those of an earlier attempt.

    Written here rather than through the CSVLogger: after a resume its writer knows only the columns it logged
    itself, and on a new column it rewrites the joined file with those alone (it raises on the interrupted part's
    columns, having truncated the file); a run resumed after its training logs nothing, so every column is new."""
    logged = read_log(metrics)
    earlier_test = [column for column in logged.columns if column.startswith("test_")]
    if earlier_test:  # a resume after the test had logged (killed before its row was written)
        logged = logged[logged[earlier_test].isna().all(axis=1)].drop(columns=earlier_test)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(metrics) as out:
        stack_logs(logged, pd.DataFrame([{**row, "step": step} for row in test_metrics])).to_csv(out, index=False)


def validation_curve(folder: RunFolder, stages: list[str]) -> pd.DataFrame:
    """The run's validation Dice (mean and per class) against its step, stages one after another (a later stage's
    steps continue the earlier ones' count, so the curve reads as one run)."""
    parts, offset = [], 0
    for stage in stages:
        log = read_log(folder.stage_dir(stage) / "logs" / "metrics.csv")
        columns = [c for c in log.columns if c == "val/dice" or c.startswith("val/dice_")]
        if "val/dice" in columns:
            part = log.dropna(subset=["val/dice"])[["step", *columns]].copy()
            part["step"] = part["step"].astype(int) + 1 + offset
            part.insert(0, "stage", stage)
            parts.append(part)
        steps = log["step"].dropna()
        offset += int(steps.max()) + 1 if len(steps) else 0
    return stack_logs(*parts) if parts else pd.DataFrame(columns=["stage", "step", "val/dice"])


def archive_validation_curve(leaderboard: Path, dataset: str, folder: RunFolder, stages: list[str]) -> None:
    curve = validation_curve(folder, stages)
    with replaced_atomically(curve_archive(leaderboard.parent, dataset, folder.path.name)) as out:
        curve.to_csv(out, index=False)


def archive_config(leaderboard: Path, dataset: str, run_dir: Path) -> None:
    """Copy the run's config.yaml beside the leaderboard with its rows (what the page's Config column reads)."""
    with replaced_atomically(config_archive(leaderboard.parent, dataset, run_dir.name), "wb") as out:
        out.write((run_dir / "config.yaml").read_bytes())


def archive_per_case(leaderboard: Path, dataset: str, run_dir: Path, kinds: list[str]) -> None:
    """Copy the run's per-case test metrics beside the leaderboard once its rows are there, so the paired tests
    of ``make leaderboard`` can be recomputed from the repository alone (the run folders stay local)."""
    for kind in kinds:
        archived = per_case_archive(leaderboard.parent, dataset, run_dir.name, kind)
        with replaced_atomically(archived, "wb") as out:
            out.write((run_dir / f"test_per_case_{kind}.csv").read_bytes())
