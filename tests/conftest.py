"""Shared fixtures: format-exact data sets in tmp folders, the real ACDC copy, and a quiet, offline environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
REAL_ACDC = SHARED_DATASETS / "ACDC"
REAL_KVASIR = SHARED_DATASETS / "Kvasir-SEG"

# Small fixtures in the real layouts (H, W differ from every crop size so the zoom path runs).
TINY_ACDC = dict(n_train_patients=6, n_val_patients=2, n_test_patients=2, slices=(3, 4), shape=(40, 36), seed=0)
TINY_LA = dict(n_train=6, n_test=2, shape=(40, 36, 24), seed=0)


@pytest.fixture(autouse=True)
def _offline_environment(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.getbasetemp()))
    # One synthetic cache for the whole session, never the user's home.
    monkeypatch.setenv("SSL_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "synthetic-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: intra-op threads mostly spin, one thread is faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_real_dataset(root: Path, marker: str, name: str) -> Path:
    """A real data copy (``root/marker`` must exist). Outside CI a missing copy skips with the path; in CI it
    fails, since CI has it."""
    if not (root / marker).is_file():
        message = f"real {name} copy missing: {root} (see README.md#real-data-sets)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


def require_real_acdc() -> Path:
    return require_real_dataset(REAL_ACDC, "train_slices.list", "ACDC")


def require_real_kvasir() -> Path:
    return require_real_dataset(REAL_KVASIR, "train.txt", "Kvasir-SEG")


@pytest.fixture
def real_acdc() -> Path:
    return require_real_acdc()


@pytest.fixture(scope="session")
def acdc_root(tmp_path_factory) -> Path:
    from datamodules.synthetic_acdc import write_acdc_layout

    return write_acdc_layout(tmp_path_factory.mktemp("acdc"), **TINY_ACDC)


@pytest.fixture(scope="session")
def la_root(tmp_path_factory) -> Path:
    """LA with CRLF lists at the root (FBA-Net's copies), the data folder name with its space."""
    from datamodules.synthetic_la import write_la_layout

    return write_la_layout(tmp_path_factory.mktemp("la"), crlf=True, **TINY_LA)


def run_smoke(tmp_path: Path, *args: str) -> int:
    """``python -m benchmark run --profile smoke`` into tmp_path (runs/ and lb/<dataset>.csv)."""
    from benchmark.cli import main

    return main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), *args])


# What a quick command must not import: they take seconds (torch, Lightning) or import every method / DataModule.
HEAVY_MODULES = ("torch", "pytorch_lightning", "datamodules.registry", "methods.registry")


def cli_in_fresh_interpreter(*commands: list[str], expected_code: int = 0) -> tuple[list[str], str]:
    """Run ``benchmark.cli.main`` on each argv in a new interpreter importing this checkout; return which of
    HEAVY_MODULES it imported and what the commands printed (stdout and stderr). Each must return ``expected_code``
    (``--help``'s SystemExit counts)."""
    script = ("import contextlib, io, json, sys\nfrom benchmark.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):\n"
              f"    for argv in {[list(c) for c in commands]!r}:\n"
              "        try:\n            code = main(argv)\n        except SystemExit as stop:\n            code = stop.code or 0\n"
              f"        assert code == {expected_code}, (argv, code, out.getvalue())\n"
              f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\nprint(out.getvalue())")
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr
    heavy, _, printed = result.stdout.partition("\n")
    return json.loads(heavy), printed


def run_two_rank_script(script: str, out_dir: Path, master_port: int, timeout: int = 600) -> None:
    """Run ``tests/scripts/<script> OUT_DIR``, which fits on 2 gloo ranks and writes what the test compares.

    PYTHONPATH: a script run by path must import this checkout's packages, not an installed copy of another one.
    One OpenMP thread per rank: two spinning pools on two cores slow a step down by an order of magnitude.
    """
    env = {**os.environ, "MASTER_PORT": str(master_port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "tests" / "scripts" / script), str(out_dir)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
