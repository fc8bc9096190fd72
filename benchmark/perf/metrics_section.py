"""Metrics: ours equal medpy's (asserted to 1e-6 on every pair) and how much faster; MONAI's HD95 beside them."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from benchmark.perf import data
from benchmark.perf.timing import interleaved, ratio, summary
from core.metrics import binary_metrics

TOLERANCE = 1e-6
ACDC_CLASSES = {1: "RV", 2: "Myo", 3: "LV"}


def medpy_four(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The four numbers the SSL-MIS test scripts compute, with medpy as they call it."""
    from medpy.metric import binary as medpy_binary  # a test dependency; `make perf` runs in the test environment

    return {"dice": medpy_binary.dc(pred, gt), "jaccard": medpy_binary.jc(pred, gt),
            "hd95": medpy_binary.hd95(pred, gt), "asd": medpy_binary.asd(pred, gt)}


def monai_hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notices
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], include_background=True, percentile=95
        )
    return float(value)


def largest_differences(ours: list[dict], reference: list[dict], names: list[str]) -> dict[str, float]:
    """Asserts ours == medpy within TOLERANCE on every pair; returns the largest difference per metric."""
    largest = dict.fromkeys(("dice", "jaccard", "hd95", "asd"), 0.0)
    for name, mine, theirs in zip(names, ours, reference):
        for key, value in theirs.items():
            difference = abs(mine[key] - float(value))
            assert difference <= TOLERANCE, f"{name} {key}: ours {mine[key]} medpy {value}"
            largest[key] = max(largest[key], difference)
    return largest


def time_pairs(pairs: list[tuple[str, np.ndarray, np.ndarray]], repeats: int) -> dict[str, Any]:
    """medpy (four metrics), ours (four metrics) and MONAI (HD95 only) over all pairs, interleaved."""
    results: dict[str, list] = {}

    def over_pairs(name, function):
        def run_all():
            results[name] = [function(pred, gt) for _, pred, gt in pairs]
        return run_all

    times = interleaved({"medpy": over_pairs("medpy", medpy_four), "ours": over_pairs("ours", binary_metrics)}, repeats)
    monai_hd95(pairs[0][1], pairs[0][2])  # MONAI's first call pays seconds of one-off set-up
    monai_times = interleaved({"monai_hd95": over_pairs("monai_hd95", monai_hd95)}, 1)["monai_hd95"]
    hd95_ours = np.array([scores["hd95"] for scores in results["ours"]])
    hd95_monai = np.array(results["monai_hd95"])
    relative = np.abs(hd95_monai - hd95_ours) / np.maximum(hd95_ours, 1e-12)
    return {
        "pairs": len(pairs),
        "largest_difference_to_medpy": largest_differences(results["ours"], results["medpy"], [n for n, _, _ in pairs]),
        "medpy": summary(times["medpy"]), "ours": summary(times["ours"]), "monai_hd95": summary(monai_times),
        "speedup_vs_medpy": ratio(times["medpy"], times["ours"]),
        "monai_hd95_time_vs_ours_all_four": monai_times[0] / summary(times["ours"])["median_s"],
        "monai_hd95_minus_medpy_hd95": {
            "mean": float(np.mean(hd95_monai - hd95_ours)), "mean_abs": float(np.mean(np.abs(hd95_monai - hd95_ours))),
            "max_relative": float(relative.max()), "pairs_that_differ": int(np.sum(relative > 1e-9)),
        },
    }


def combined(per_group: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """All ACDC classes together: sums of the per-class medians."""
    total = {key: sum(group[key]["median_s"] for group in per_group.values()) for key in ("medpy", "ours", "monai_hd95")}
    largest = {key: max(group["largest_difference_to_medpy"][key] for group in per_group.values())
               for key in ("dice", "jaccard", "hd95", "asd")}
    return {"pairs": sum(group["pairs"] for group in per_group.values()), "largest_difference_to_medpy": largest,
            **{f"{key}_median_s": value for key, value in total.items()},
            "speedup_vs_medpy": total["medpy"] / total["ours"]}


def run(acdc_root, la_root, quick: bool) -> dict[str, Any]:
    repeats = 1 if quick else 3
    # Every 4th test volume (10 of 40): the timing is what counts, and the machine is shared.
    acdc_cases = data.acdc_test_labels(acdc_root, limit=1 if quick else None)[:: 1 if quick else 4]
    per_class = {c: [] for c in ACDC_CLASSES}
    for name, gt in acdc_cases:
        pred = data.perturbed_acdc_prediction(gt)
        for c in ACDC_CLASSES:
            per_class[c].append((f"{name} {ACDC_CLASSES[c]}", pred == c, gt == c))
    rng = np.random.default_rng(0)
    la_pairs = [(case, data.perturbed_la_prediction(label, rng), label != 0) for case, _, label in data.la_cases(la_root)[: 1 if quick else 3]]
    acdc_timed = {ACDC_CLASSES[c]: time_pairs(pairs, repeats) for c, pairs in per_class.items()}
    return {
        "tolerance": TOLERANCE,
        "acdc_test_volumes": len(acdc_cases),
        "acdc_largest_volume_shape": list(max((gt.shape for _, gt in acdc_cases), key=np.prod)),
        "acdc_prediction": "ground truth with RV dilated, myocardium eroded in-plane, LV shifted (1, 3, -2)",
        "acdc_per_class": acdc_timed,
        "acdc_all_classes": combined(acdc_timed),
        "la_sized_volume_shape": list(la_pairs[0][2].shape),
        "la_prediction": "boundary moved by a smooth random field (~2.5 voxels) plus 3 stray blobs of radius 2-5",
        "la_sized": time_pairs(la_pairs, repeats),
    }
