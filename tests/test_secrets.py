"""Secrets in the environment (the W&B API key, cloud and database credentials) never reach what a run writes:
leaderboard CSV, config.yaml, hparams.yaml, result.json, Lightning's logs, W&B's offline run files, the console."""
from __future__ import annotations

import os
import re
import secrets

import pytest

from tests.conftest import run_smoke

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Names under which secrets usually live (W&B reads WANDB_API_KEY; PGPASSWORD is what the README advises for Optuna).
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
PLANTED = ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "PGPASSWORD", "SSL_BENCH_TEST_SERVICE_API_KEY")


def secret_values() -> dict[str, str]:
    """Every key-like variable of the environment with a value long enough to be a credential."""
    return {name: value for name, value in os.environ.items() if SECRET_NAME.search(name) and len(value) >= 8}


def test_no_secret_from_the_environment_is_written_anywhere(tmp_path, monkeypatch, capfd):
    for name in PLANTED:
        monkeypatch.setenv(name, f"{name.lower()}-{secrets.token_hex(20)}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run_smoke(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.2", "--wandb", "offline") == 0
    console = capfd.readouterr()
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    assert {"synthetic_acdc.csv", "config.yaml", "hparams.yaml", "result.json", "metrics.csv"} <= names
    assert any(path.suffix == ".wandb" for path in written)  # W&B's offline run was written too
    contents = {path: path.read_bytes() for path in written}
    values = secret_values()
    assert set(PLANTED) <= set(values)
    for name, value in values.items():
        leaks = [str(path.relative_to(tmp_path)) for path, data in contents.items() if value.encode() in data]
        assert not leaks, f"{name} written to {leaks}"
        assert value not in console.out and value not in console.err, f"{name} printed"
