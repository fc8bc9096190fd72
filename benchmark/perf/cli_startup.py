"""Start-up of the command line: `--help`, `list methods` and `list datasets` (which must not import torch or
Lightning) against `python -c pass` started the same way in the same run, and `run --show-config` (which resolves
the split, so it imports them) against `python -c "import pytorch_lightning"`. Medians of interleaved repeats."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import pytorch_lightning'": ["-c", "import pytorch_lightning"],
    "--help": ["-m", "benchmark", "--help"],
    "list methods": ["-m", "benchmark", "list", "methods"],
    "list datasets": ["-m", "benchmark", "list", "datasets"],
    "run --show-config (smoke)": ["-m", "benchmark", "run", "--show-config", "--profile", "smoke", "--ratio", "0.2"],
}
# Which reference each command is measured against.
REFERENCE = {"--help": "python -c pass", "list methods": "python -c pass", "list datasets": "python -c pass",
             "run --show-config (smoke)": "python -c 'import pytorch_lightning'"}


def wall_seconds(arguments: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, *arguments], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def run(quick: bool) -> dict[str, Any]:
    repeats = 1 if quick else 5
    for arguments in COMMANDS.values():  # warm: the file cache, the catalogue, the synthetic data set
        wall_seconds(arguments)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, arguments in COMMANDS.items():
            times[name].append(wall_seconds(arguments))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "repeats": repeats,
        "median_seconds": medians,
        "over_reference": {name: medians[name] / medians[reference] for name, reference in REFERENCE.items()},
        "reference": REFERENCE,
    }
