"""``run --show-config`` answers from the catalogue and the data set's lists: neither torch nor Lightning is imported,
nothing is written, and it names the labeled count and the hash the run will have."""
from __future__ import annotations

import os
import subprocess
import sys

from benchmark.catalogue import catalogue
from benchmark.config import config_hash
from benchmark.run_request import RunRequest
from tests.conftest import PROJECT_ROOT


def test_show_config_imports_neither_torch_nor_lightning_and_names_the_runs_hash(tmp_path):
    catalogue()  # the subprocess reads this session's catalogue (building it would import every method)
    argv = ["run", "--method", "mean_teacher", "--dataset", "synthetic_acdc", "--profile", "cpu", "--ratio", "0.1",
            "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"), "--set", "optim.lr=0.02", "--show-config"]
    script = ("import sys, contextlib, io\nfrom benchmark.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
              f"    assert main({argv!r}) == 0\n"
              "heavy = sorted(m for m in ('torch', 'pytorch_lightning', 'datamodules.registry', 'methods.registry') if m in sys.modules)\n"
              "print(heavy)\nprint(out.getvalue())")
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr
    heavy, _, shown = result.stdout.partition("\n")
    assert heavy == "[]", heavy
    finished = RunRequest(method="mean_teacher", dataset="synthetic_acdc", profile="cpu", ratio=0.1, out=str(tmp_path / "runs"),
                          leaderboard_dir=str(tmp_path / "lb"), overrides=["optim.lr=0.02"]).finalized()
    assert f"# labeled: {finished['data']['labeled']} patients" in shown
    assert f"# config hash: {config_hash(finished)}" in shown
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lb").exists()
