"""Data loading: how fast the ACDC and LA loaders deliver batches (default workers) against how fast a training
step consumes them (the bare step of the same configuration, batches already in memory)."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmark.perf.training_step import bare_steps, method_config

# Prefetched batches (2 per worker and stream) come out at once; time the steady state after them.
SKIPPED_BATCHES = 4


def loader_batch_seconds(config: dict, batches: int) -> float:
    """Seconds per combined batch (every stream of the method) from the DataModule's own loaders."""
    from benchmark.finalize import finalize
    from benchmark.run import prepare

    config.update(finalize(config))  # finished in place: the caller's config is the run's
    _, _, datamodule = prepare(config)
    streams = datamodule.train_dataloader().iterables
    iterators = {name: iter(loader) for name, loader in streams.items()}
    for _ in range(SKIPPED_BATCHES + 1):  # the first includes starting the workers
        for iterator in iterators.values():
            next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        for iterator in iterators.values():
            next(iterator)
    elapsed = time.perf_counter() - started
    del iterators
    return elapsed / batches


def measure(dataset: str, root: Path, method: str, profile: str, batches: int, steps: int, extra=()) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="perf-loading-") as out:
        total = SKIPPED_BATCHES + 1 + batches + steps + 8
        config = method_config(method, dataset, profile, total, Path(out), [f"data.root={root}", *extra])
        per_batch = loader_batch_seconds(config, batches)
        step = statistics.median(bare_steps(config, warmup=2, steps=steps)["step"])
    return {
        "method": method, "num_workers": config["data"]["num_workers"],
        "batch": {"labeled": config["data"]["labeled_batch_size"], "unlabeled": config["data"]["unlabeled_batch_size"]},
        "patch": config["data"]["patch_size"], "loader_seconds_per_batch": per_batch, "bare_step_seconds": step,
        "loader_speed_over_step": step / per_batch,
    }


def run(acdc_root: Path, la_root: Path, quick: bool) -> dict[str, Any]:
    profile, batches, steps = ("smoke", 3, 2) if quick else ("cpu", 8, 4)
    # smoke turns workers off; the default worker count is what is measured.
    workers = ["data.num_workers=2"] if quick else []
    results: dict[str, Any] = {"profile": profile, "datasets": {}}
    la_extra = ["data.val_holdout=1", *workers]
    for label, dataset, root, extra in (("acdc (real)", "acdc", acdc_root, workers),
                                        ("la (generated, LA-sized volumes)", "la", la_root, la_extra)):
        results["datasets"][label] = {
            method: measure(dataset, root, method, profile, batches, steps, extra) for method in ("supervised", "mean_teacher")
        }
    return results
