"""Mixed precision and channels-last: the CPU path stays fp32; what a GPU user should expect.

``trainer.precision`` is handed to Lightning unchanged. Every profile and dataset preset resolves to ``32-true``
(checked here), so CPU runs never autocast; a GPU user opts in with ``--set trainer.precision=bf16-mixed``.
Evaluation (sliding window / slice-wise + metrics) runs outside the Trainer, in fp32, whatever the training
precision, so test numbers stay comparable. This section also measures, informatively, what bf16 autocast does to
one CPU training step here (no GPU on this machine).
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmark.config import PROFILES, resolve_config
from datamodules import DATASETS
from methods.networks import build_network

GPU_EXPECTATIONS = (
    "Not measurable here (no GPU). On Ampere or newer GPUs, bf16-mixed autocast usually speeds up the convolutions "
    "of the U-Net/V-Net by roughly 1.5-2.5x and halves activation memory; V-Net 3-D convolutions gain most. "
    "channels-last (channels_last / channels_last_3d) helps tensor cores further for 2-D nets and is often neutral "
    "for 3-D. bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike 16-mixed); expect small "
    "run-to-run differences in the last digits of the Dice, not a shift. Rows trained with another precision have "
    "another config hash (trainer.precision is part of it), so they never mix with fp32 rows in a leaderboard."
)


def resolved_precisions() -> dict[str, str]:
    return {f"{dataset}/{profile}": resolve_config(dataset, "supervised", profile, family=entry.family)["trainer"]["precision"]
            for dataset, entry in DATASETS.items() for profile in PROFILES}


def cpu_step_seconds(autocast: bool, size: int, repeats: int) -> float:
    torch.manual_seed(0)
    net = build_network(2, 1, 4, base_features=8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    images, labels = torch.randn(16, 1, size, size), torch.randint(0, 4, (16, size, size))
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def run(quick: bool) -> dict[str, Any]:
    precisions = resolved_precisions()
    assert set(precisions.values()) == {"32-true"}, f"a preset changes the precision: {precisions}"
    size, repeats = (32, 1) if quick else (96, 5)
    fp32 = cpu_step_seconds(False, size, repeats)
    bf16 = cpu_step_seconds(True, size, repeats)
    return {
        "resolved_trainer_precision": sorted(set(precisions.values())),
        "presets_checked": len(precisions),
        "cpu_bf16_autocast_step_over_fp32": bf16 / fp32,
        "cpu_step": f"U-Net base_features=8, batch 16, {size}x{size}, forward + CE + backward + SGD",
        "gpu_expectation": GPU_EXPECTATIONS,
        "how_to_enable_on_gpu": "--set trainer.precision=bf16-mixed (OVERRIDES=trainer.precision=bf16-mixed with make)",
    }
