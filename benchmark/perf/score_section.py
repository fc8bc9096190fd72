"""Scoring a folder (``python -m benchmark score``) vs medpy, end to end (files read), on scattered false positives.

The case: LA volumes at the raw challenge size (576x576x88, NIfTI) whose prediction has a moved boundary and
0.05 % of the volume as isolated false-positive voxels (a half-trained network's output; every stray voxel is a
surface voxel, so the surface distances span the whole volume). The reference is what the SSL-MIS test scripts
do per case: read both files, then medpy's ``dc``, ``jc``, ``hd95`` and ``asd``. Ours is ``score_folders`` on the
folder, once in one process and once with a worker process per core (cases in parallel, as nnU-Net's evaluation);
every number is asserted equal to medpy's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from benchmark.perf import data
from benchmark.perf.metrics_section import TOLERANCE, medpy_four
from benchmark.perf.timing import interleaved, ratio, summary
from benchmark.score import default_workers, score_folders

LA_SPACING = (0.625, 0.625, 0.625)
QUICK_SHAPE = (64, 56, 32)  # holds the quick mode's (48, 40, 24) crops


def write_cases(la_root: Path, root: Path, cases: int, quick: bool) -> tuple[Path, Path]:
    """``cases`` scattered-false-positive LA cases (the generated LA crops of ``la_root`` in raw-size volumes) as
    pred/ and gt/ folders of .nii.gz files."""
    pred_dir, gt_dir = root / "pred", root / "gt"
    pred_dir.mkdir(parents=True, exist_ok=True), gt_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    affine = np.diag([*LA_SPACING, 1.0])
    for name, _, label in data.la_cases(la_root)[:cases]:
        pred, gt = data.scattered_fp_la_case(label, rng, QUICK_SHAPE if quick else data.LA_RAW_SHAPE)
        nib.save(nib.Nifti1Image(pred, affine), pred_dir / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(gt, affine), gt_dir / f"{name}.nii.gz")
    return pred_dir, gt_dir


def medpy_folder(pred_dir: Path, gt_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    """The SSL-MIS test scripts' way: each case read with nibabel, then medpy's four metrics per class."""
    scores = {}
    for gt_path in sorted(gt_dir.glob("*.nii.gz")):
        case = gt_path.name[: -len(".nii.gz")]
        gt = np.asanyarray(nib.load(gt_path).dataobj)
        pred = np.asanyarray(nib.load(pred_dir / gt_path.name).dataobj)
        for c in range(1, int(gt.max()) + 1):
            scores[case, c] = medpy_four(pred == c, gt == c)
    return scores


def run(la_root: Path, work: Path, quick: bool, workers: int | None = None) -> dict[str, Any]:
    workers = workers or default_workers()
    pred_dir, gt_dir = write_cases(la_root, work / "scattered-fp", 2 if quick else 4, quick)
    cases = len(list(gt_dir.glob("*.nii.gz")))
    results: dict[str, Any] = {}
    candidates = {
        "medpy": lambda: results.__setitem__("medpy", medpy_folder(pred_dir, gt_dir)),
        "ours_one_process": lambda: results.__setitem__("serial", score_folders(pred_dir, gt_dir, workers=1)),
        "ours_parallel": lambda: results.__setitem__("parallel", score_folders(pred_dir, gt_dir, workers=workers)),
    }
    times = interleaved(candidates, 1 if quick else 2)

    assert results["serial"].equals(results["parallel"]), "parallel scoring differs from serial scoring"
    largest = dict.fromkeys(("dice", "jaccard", "hd95", "asd"), 0.0)
    bitwise_equal = True
    for (case, c), reference in results["medpy"].items():
        row = results["serial"][(results["serial"]["case"] == case) & (results["serial"]["class"] == c)].iloc[0]
        for key, value in reference.items():
            difference = abs(float(row[key]) - float(value))
            assert difference <= TOLERANCE, f"{case} class {c} {key}: ours {row[key]} medpy {value}"
            largest[key] = max(largest[key], difference)
            bitwise_equal &= float(row[key]) == float(value)

    def per_case(seconds):
        return summary([s / cases for s in seconds])

    return {
        "cases": cases, "workers": workers, "tolerance": TOLERANCE,
        "volume_shape": list(QUICK_SHAPE if quick else data.LA_RAW_SHAPE),
        "prediction": "boundary moved by a smooth random field (~2.5 voxels) plus "
                      f"{100 * data.SCATTERED_FP_FRACTION:g} % of the volume as isolated false-positive voxels",
        "files": ".nii.gz files, distances in voxels (as the SSL-MIS test scripts)",
        "largest_difference_to_medpy": largest, "bitwise_equal_to_medpy": bitwise_equal,
        "parallel_equals_serial": True,
        "medpy_per_case": per_case(times["medpy"]),
        "ours_one_process_per_case": per_case(times["ours_one_process"]),
        "ours_parallel_per_case": per_case(times["ours_parallel"]),
        "speedup_one_process": ratio(times["medpy"], times["ours_one_process"]),
        "speedup_parallel": ratio(times["medpy"], times["ours_parallel"]),
    }
