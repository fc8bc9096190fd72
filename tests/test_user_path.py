"""The user's path: where smoke rows go, resuming by folder alone, accelerator and precision, a fast CLI, overrides
with spaces, warm starts across methods."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark import leaderboard
from benchmark.cli import main
from benchmark.leaderboard import REPOSITORY_LEADERBOARDS, leaderboard_dir_for
from tests.conftest import PROJECT_ROOT


def test_smoke_rows_aimed_at_the_repository_leaderboards_go_to_a_scratch_folder(tmp_path):
    assert REPOSITORY_LEADERBOARDS == PROJECT_ROOT / "leaderboards"
    assert leaderboard_dir_for("smoke", PROJECT_ROOT / "leaderboards", tmp_path) == tmp_path / "leaderboards-smoke"
    # Other profiles, and smoke rows sent anywhere else, go where they are sent.
    assert leaderboard_dir_for("cpu", PROJECT_ROOT / "leaderboards", tmp_path) == PROJECT_ROOT / "leaderboards"
    assert leaderboard_dir_for("smoke", tmp_path / "lb", tmp_path) == tmp_path / "lb"


def test_a_smoke_run_never_writes_into_the_repository_leaderboards(tmp_path, monkeypatch):
    # A stand-in for the repository's folder, so that a failure of this test cannot touch the real one.
    tracked = tmp_path / "tracked"
    tracked.mkdir()
    monkeypatch.setattr(leaderboard, "REPOSITORY_LEADERBOARDS", tracked.resolve())
    assert main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tracked), "--dataset", "synthetic_acdc", "--ratio", "0.2"]) == 0
    assert list(tracked.iterdir()) == []
    table = pd.read_csv(tmp_path / "runs" / "leaderboards-smoke" / "synthetic_acdc.csv")
    assert table["profile"].tolist() == ["smoke", "smoke"]
    assert (tmp_path / "runs" / "leaderboards-smoke" / "per_case" / "synthetic_acdc").is_dir()
