"""Timing helpers for a noisy machine: interleaved repetitions, medians, and the machine's description."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from typing import Any, Callable

import torch

# torch's own intra-op thread count, read before `make perf` sets its own (what a suite run uses).
DEFAULT_THREADS = torch.get_num_threads()


def interleaved(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each candidate, run in turn ``repeats`` times (A B A B ...), so a load spike on the shared
    machine hits every candidate alike instead of one of them."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "repeats": len(seconds)}


def ratio(slow: list[float], fast: list[float]) -> float:
    """Median of the per-repetition ratios (the pairs were measured side by side)."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
