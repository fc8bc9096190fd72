"""Sliding window: the suite's batched LA protocol against the published per-window loop, same network, same volume.

The reference is UA-MT's ``test_single_case`` (code/test_util.py; copied unchanged by MC-Net, SS-Net, BCP, ...):
numpy padding, one window per forward pass, softmax added into a numpy score map. The suite's
:func:`core.inference.sliding_window_probabilities` sends ``window_batch`` windows per forward pass.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from benchmark.perf import data
from benchmark.perf.timing import DEFAULT_THREADS, interleaved, ratio, summary
from core.inference import count_windows, sliding_window_probabilities

LA_PATCH, LA_STRIDE = (112, 112, 80), (18, 18, 4)


def published_per_window_loop(net, image, stride_xy, stride_z, patch_size, num_classes):
    """UA-MT's ``test_single_case`` transcribed with numpy as published: one window at a time."""
    w, h, d = image.shape
    pads = [max(p - s, 0) for p, s in zip(patch_size, image.shape)]
    add_pad = any(pads)
    lefts = [p // 2 for p in pads]
    if add_pad:
        image = np.pad(image, [(l, p - l) for l, p in zip(lefts, pads)], mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape, dtype=np.float32)
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(sz):
                zs = min(stride_z * z, dd - patch_size[2])
                patch = image[xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]]
                with torch.no_grad():
                    y1 = net(torch.from_numpy(patch[None, None].astype(np.float32)))
                y_soft = torch.softmax(y1, dim=1)[0].numpy()
                score_map[:, xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]] += y_soft
                cnt[xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]] += 1
    score_map = score_map / cnt[None]
    if add_pad:
        score_map = score_map[:, lefts[0] : lefts[0] + w, lefts[1] : lefts[1] + h, lefts[2] : lefts[2] + d]
    return score_map


def vnet(width: int) -> torch.nn.Module:
    from methods.networks import build_network

    torch.manual_seed(0)
    return build_network(3, 1, 2, base_features=width).eval()


def run(la_root, quick: bool, window_batch: int = 4) -> dict[str, Any]:
    """Full mode: the LA patch and stride on a 130x112x84 crop of an LA-sized volume (4 windows = one suite pass
    of ``window_batch`` 4; the whole ~200x150x88 volume has 72, i.e. many minutes per pass on a shared 2-core CPU),
    V-Net width 8 (the cpu profile's width; the paper's is 16). Quick mode: a tiny patch, volume and width."""
    _, image, _ = data.la_cases(la_root)[0]
    if quick:
        patch, stride, crop, width = (32, 32, 16), (8, 8, 4), (40, 36, 20), 2
    else:
        patch, stride, crop, width = LA_PATCH, LA_STRIDE, (130, 112, 84), 8
    volume = np.ascontiguousarray(image[: crop[0], : crop[1], : crop[2]])
    net = vnet(width)
    outputs: dict[str, np.ndarray] = {}

    def reference():
        outputs["reference"] = published_per_window_loop(net, volume, stride[0], stride[2], patch, 2)

    def batched():
        outputs["suite"] = sliding_window_probabilities(net, volume, patch, stride, 2, window_batch=window_batch).numpy()

    windows = count_windows(volume.shape, patch, stride)
    by_threads = {}
    original_threads = torch.get_num_threads()
    # Batching pays mostly through fewer, larger parallel regions: measured with one thread and with torch's
    # default count, which is what the evaluator of a suite run uses.
    for threads in sorted({1, DEFAULT_THREADS}):
        torch.set_num_threads(threads)
        with torch.no_grad():  # one-off set-up (oneDNN primitives per batch size) out of the timings
            for batch_size in {1, min(window_batch, windows), windows % window_batch or window_batch}:
                net(torch.zeros(batch_size, 1, *patch))
        times = interleaved({"per_window_loop": reference, "suite_batched": batched}, 1 if quick else 2)
        by_threads[threads] = {
            "per_window_loop": summary(times["per_window_loop"]), "suite_batched": summary(times["suite_batched"]),
            "speedup": ratio(times["per_window_loop"], times["suite_batched"]),
            "seconds_per_window_batched": summary(times["suite_batched"])["median_s"] / windows,
        }
    torch.set_num_threads(original_threads)
    difference = float(np.abs(outputs["suite"] - outputs["reference"]).max())
    labels_equal = bool((outputs["suite"].argmax(0) == outputs["reference"].argmax(0)).all())
    assert labels_equal and difference <= 1e-5, f"batched sliding window differs from the loop by {difference}"
    return {
        "network": f"V-Net (suite), base_features={width}, eval mode, 2 classes",
        "patch": list(patch), "stride": list(stride), "timed_volume_shape": list(volume.shape),
        "windows_timed_volume": windows,
        "windows_la_sized_volume": count_windows(data.LA_SIZED_SHAPE, LA_PATCH, LA_STRIDE),
        "la_sized_volume_shape": list(data.LA_SIZED_SHAPE),
        "window_batch": window_batch, "default_threads": DEFAULT_THREADS, "by_threads": by_threads,
        "speedup": by_threads[DEFAULT_THREADS]["speedup"],
        "seconds_per_window_batched": by_threads[DEFAULT_THREADS]["seconds_per_window_batched"],
        "max_abs_probability_difference": difference, "label_maps_equal": labels_equal,
    }
