"""The evaluator: one inference and metric policy for every method (docs/datasets.md#la-evaluation, #acdc-evaluation).

Per case it predicts a label map of the case's own shape (sliding window in 3D, slice by slice for 2-D-trained
volumes, one resized forward pass for whole 2-D images),
optionally keeps the largest connected component per class, and scores every foreground class with
Dice, Jaccard, HD95 and ASD (core/metrics.py: medpy's definitions, one explicit empty-mask rule).
The reported number is the mean over cases of the mean over foreground classes. A dataset may ask for extra
summary metrics (``DatasetSpec.extra_metrics``): ``pooled_f1`` is Dice over the pixels of all test cases pooled
(the global F1 of the endoscopy papers, e.g. MMS's test.py with sklearn's f1_score), per class, then the class mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from core import metrics
from core.inference import Predictor, predict_slicewise, predict_whole_image, sliding_window_probabilities
from core.spec import DatasetSpec

METRIC_NAMES = ("dice", "jaccard", "hd95", "asd")
#: Extra metrics computed from per-case pixel counts (``_intersection``, ``_union``) pooled over the whole set.
POOLED_METRICS = {"miou", "pooled_f1"}


@dataclass
class Evaluator:
    spec: DatasetSpec
    patch_size: tuple[int, ...]
    stride: tuple[int, ...] | None
    lcc: bool = False
    use_spacing: bool = False
    empty_policy: str = "penalty"
    window_batch: int = 4

    @classmethod
    def from_config(cls, spec: DatasetSpec, config: dict[str, Any]) -> "Evaluator":
        evaluation = config["eval"]
        stride = evaluation.get("stride") or spec.eval_stride
        return cls(
            spec=spec,
            patch_size=tuple(config["data"]["patch_size"]),
            stride=None if stride is None else tuple(stride),
            lcc=evaluation["lcc"],
            use_spacing=evaluation["use_spacing"],
            empty_policy=evaluation["empty_policy"],
            window_batch=evaluation["window_batch"],
        )

    def predict(self, predictor: Predictor, image: np.ndarray, device="cpu") -> np.ndarray:
        if self.spec.eval_mode == "sliding_window":
            probabilities = sliding_window_probabilities(
                predictor, image, self.patch_size, self.stride, self.spec.num_classes, self.window_batch, device
            )
            prediction = probabilities.argmax(dim=0).numpy().astype(np.uint8)
        elif self.spec.eval_mode == "slicewise":
            prediction = predict_slicewise(predictor, image, self.patch_size, device=device)
        elif self.spec.eval_mode == "whole_image":
            prediction = predict_whole_image(predictor, image, self.patch_size, device=device)
        else:
            raise NotImplementedError(f"evaluation mode {self.spec.eval_mode}")
        if self.lcc:
            prediction = metrics.keep_largest_component_per_class(prediction, self.spec.num_classes)
        return prediction

    @property
    def score_names(self) -> list[str]:
        """The scored classes or regions (spec.scored), in the order of ``dice_per_class`` and ``score``."""
        return [name for name, _ in self.spec.scored]

    def dice_per_class(self, prediction: np.ndarray, label: np.ndarray) -> list[float]:
        """Cheap validation score (Dice only, same empty rule as the full metrics)."""
        scores = []
        valid = None if self.spec.ignore_index is None else label != self.spec.ignore_index
        for _, classes in self.spec.scored:
            p, g = np.isin(prediction, classes), np.isin(label, classes)
            if valid is not None:
                p &= valid
            total = p.sum() + g.sum()
            if total == 0:
                scores.append(1.0 if self.empty_policy == "penalty" else 0.0)
            else:
                scores.append(float(2.0 * np.logical_and(p, g).sum() / total))
        return scores

    def score(self, prediction: np.ndarray, label: np.ndarray, spacing: Sequence[float] | None,
              instances: np.ndarray | None = None) -> list[dict]:
        """Metrics per scored class/region; ``instances`` is the ground truth's instance map (for AJI), if known.

        Pixels labelled with the spec's ignore index count for nothing. With "miou" among the spec's extra metrics
        the rows also carry the pixel counts ``_intersection`` / ``_union`` that ``summarize`` pools over the set.
        """
        spacing = spacing if self.use_spacing else None
        valid = None if self.spec.ignore_index is None else label != self.spec.ignore_index
        rows = []
        for name, classes in self.spec.scored:
            predicted, truth = np.isin(prediction, classes), np.isin(label, classes)
            if valid is not None:
                predicted &= valid
            if self.spec.surface_metrics:
                row = {"class": name, **metrics.binary_metrics(predicted, truth, spacing, self.empty_policy)}
            else:
                row = {"class": name, **metrics.overlap_metrics(predicted, truth, self.empty_policy)}
            if "aji" in self.spec.extra_metrics:
                truth_instances = metrics.connected_instances(truth) if instances is None else np.where(truth, instances, 0)
                row["aji"] = metrics.aggregated_jaccard_index(
                    metrics.connected_instances(predicted), truth_instances, self.empty_policy)
            if POOLED_METRICS & set(self.spec.extra_metrics):
                row["_intersection"] = int(np.count_nonzero(predicted & truth))
                row["_union"] = int(np.count_nonzero(predicted | truth))
            rows.append(row)
        return rows

    @property
    def columns(self) -> list[str]:
        names = list(METRIC_NAMES if self.spec.surface_metrics else ("dice", "jaccard"))
        names += [m for m in self.spec.extra_metrics if m not in POOLED_METRICS]
        if POOLED_METRICS & set(self.spec.extra_metrics):
            names += ["_intersection", "_union"]
        return ["case", "class", *names]

    def evaluate(self, predictor: Predictor, cases: Iterable[dict], progress: bool = True, device="cpu", desc="test") -> pd.DataFrame:
        """One row per (case, scored class) with the metrics (``columns``)."""
        rows = []
        cases = list(cases) if not hasattr(cases, "__len__") else cases
        for case in tqdm(cases, desc=desc, disable=not progress, leave=False):
            label = np.asarray(case["label"])
            prediction = self.predict(predictor, np.asarray(case["image"]), device)
            for row in self.score(prediction, label, case.get("spacing"), case.get("instances")):
                rows.append({"case": case["case"], **row})
        return pd.DataFrame(rows, columns=self.columns)


def pooled_f1(per_case: pd.DataFrame) -> float:
    """Dice of all cases' pixels pooled, per class, then the mean over classes: 2 sum(I) / (sum(I) + sum(U)), since
    |P| + |G| = |P & G| + |P | G| (the global F1 of the endoscopy papers, MMS's test.py with sklearn's f1_score).
    A class absent from every prediction and every label scores 1 (nothing to find, nothing found)."""
    pooled = per_case.groupby("class", sort=False)[["_intersection", "_union"]].sum()
    both = pooled["_intersection"] + pooled["_union"]
    return float(np.where(both > 0, 2 * pooled["_intersection"] / both.where(both > 0, 1), 1.0).mean())


def summarize(per_case: pd.DataFrame) -> dict[str, float]:
    """Mean over cases of the class-mean of each metric, plus the per-class Dice (``dice_<class>``), and with pixel
    counts (``_intersection``, ``_union``) the pooled metrics: the dataset-level mIoU (per class the pooled
    intersection over the pooled union, Cityscapes-style, averaged over the classes present in the ground truth or
    prediction) and the pooled F1 (:func:`pooled_f1`)."""
    if per_case.empty:
        raise ValueError("no cases were evaluated")
    names = [c for c in per_case.columns if c not in ("case", "class") and not c.startswith("_")]
    if per_case[names].isna().any().any():
        raise ValueError("a metric is NaN: the empty-mask policy must give every case a value")
    case_means = per_case.groupby("case", sort=False)[names].mean()
    summary = {name: float(case_means[name].mean()) for name in names}
    for class_name, group in per_case.groupby("class", sort=False):
        summary[f"dice_{class_name}"] = float(group["dice"].mean())
    if "_intersection" in per_case.columns:
        pooled = per_case.groupby("class", sort=False)[["_intersection", "_union"]].sum()
        pooled = pooled[pooled["_union"] > 0]
        summary["miou"] = float((pooled["_intersection"] / pooled["_union"]).mean()) if len(pooled) else 1.0
        summary["pooled_f1"] = pooled_f1(per_case)
    summary["n_cases"] = int(case_means.shape[0])
    return summary
