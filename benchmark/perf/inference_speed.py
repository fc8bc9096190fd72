"""Inference speed: the 2-D U-Net in images/s at 512x288, batch 1 (as MMS reports it), and the 3-D V-Net in
volumes/min with the LA protocol (72 windows of 112x112x80 on a 200x150x88 volume, 4 windows per pass)."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmark.perf import data
from benchmark.perf.sliding_window import LA_PATCH, LA_STRIDE, vnet
from core.inference import count_windows
from methods.networks import build_network


@torch.inference_mode()
def seconds_per_call(net, batch: torch.Tensor, repeats: int) -> float:
    net(batch)  # warm-up: allocator and oneDNN primitive caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        net(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(quick: bool, sliding_window: dict[str, Any] | None) -> dict[str, Any]:
    size, repeats = ((64, 32), 2) if quick else ((512, 288), 5)
    results: dict[str, Any] = {"2d": {}, "3d": {}}
    for width in (8, 16):
        torch.manual_seed(0)
        net = build_network(2, 1, 4, base_features=width).eval()
        seconds = seconds_per_call(net, torch.randn(1, 1, *size), repeats)
        results["2d"][f"unet_base_features_{width}"] = {"input": [1, 1, *size], "images_per_s": 1.0 / seconds}
    windows = count_windows(data.LA_SIZED_SHAPE, LA_PATCH, LA_STRIDE)
    patch, width_16_repeats = ((32, 32, 16), 1) if quick else (LA_PATCH, 1)
    seconds_16 = seconds_per_call(vnet(16), torch.randn(4, 1, *patch), width_16_repeats) / 4
    results["3d"]["vnet_base_features_16"] = {
        "seconds_per_window": seconds_16, "windows_per_volume": windows,
        "volumes_per_min": 60.0 / (windows * seconds_16),
        "how": "one pass of 4 windows timed after a warm-up pass, times the 72 windows of a 200x150x88 volume",
    }
    if sliding_window and "seconds_per_window_batched" in sliding_window:
        per_window = sliding_window["seconds_per_window_batched"]
        results["3d"]["vnet_sliding_window_section"] = {
            "network": sliding_window["network"], "seconds_per_window": per_window, "windows_per_volume": windows,
            "volumes_per_min": 60.0 / (windows * per_window),
            "how": "the suite's whole sliding-window pass per window (section sliding_window, torch's default threads), times 72 windows",
        }
    return results
