"""A NaN or inf loss stops the run with the term and step named, recorded as a failed row (or is skipped on request)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from benchmark.cli import main
from core.errors import EXIT_RUN_FAILED, EXIT_USER_ERROR
from methods.registry import get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def nan_at_step_two(monkeypatch):
    """The supervised baseline with a loss term that overflows on its third batch only (as a tiny temperature
    would). Counted in calls: a skipped step does not advance global_step."""
    supervised = get_method("supervised")
    original = supervised.compute_losses
    calls = []

    def compute_losses(self, batch):
        losses = original(self, batch)
        calls.append(self.global_step)
        overflow = torch.tensor(float("inf") if len(calls) == 3 else 0.0)
        losses["contrast"] = overflow
        losses["loss"] = losses["loss"] + overflow
        return losses

    monkeypatch.setattr(supervised, "compute_losses", compute_losses)


def run(tmp_path, *extra):
    return main(["run", "--method", "supervised", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), "--ratio", "0.5", *extra])


def test_nonfinite_loss_stops_the_run_and_records_it_as_failed(tmp_path, nan_at_step_two, capsys):
    assert run(tmp_path) == EXIT_RUN_FAILED
    message = capsys.readouterr().err
    assert "non-finite loss at step 2" in message and "contrast=inf" in message and "loss=inf" in message
    table = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    assert table["status"].tolist() == ["failed"] and table["dice"].isna().all()
    assert "contrast=inf" in table["error"][0]


def test_skip_policy_skips_the_step_and_finishes(tmp_path, nan_at_step_two, recwarn):
    assert run(tmp_path, "--set", "trainer.on_nonfinite_loss=skip") == 0
    table = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    assert (table["status"] == "ok").all() and table["dice"].between(0, 1).all()
    skipped = [w for w in recwarn if "step skipped" in str(w.message)]
    assert len(skipped) == 1 and "contrast=inf" in str(skipped[0].message)
    metrics = pd.read_csv(next((tmp_path / "runs").rglob("logs/metrics.csv")))
    assert "train/skipped_steps" in metrics.columns


def test_unknown_policy_is_a_user_error(tmp_path, capsys):
    assert run(tmp_path, "--set", "trainer.on_nonfinite_loss=ignore") == EXIT_USER_ERROR
    assert "on_nonfinite_loss" in capsys.readouterr().err
    assert not (tmp_path / "lb" / "synthetic_acdc.csv").exists()
