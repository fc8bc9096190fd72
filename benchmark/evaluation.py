"""The evaluator: one inference and metric policy for every method (datasets.md 1.4, 2.4).

Per case it predicts a label map of the case's own shape (sliding window in 3D, slice by slice for 2-D-trained
volumes, one resized forward pass for whole 2-D images),
optionally keeps the largest connected component per class, and scores every foreground class with
Dice, Jaccard, HD95 and ASD (benchmark/metrics.py: medpy's definitions, one explicit empty-mask rule).
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

from benchmark import metrics
from benchmark.inference import Predictor, predict_slicewise, predict_whole_image, sliding_window_probabilities
from datamodules.spec import DatasetSpec

METRIC_NAMES = ("dice", "jaccard", "hd95", "asd")
#: Per-case pixel counts recorded when a pooled metric is asked for.
COUNT_NAMES = ("tp", "fp", "fn")
EXTRA_METRICS = ("pooled_f1",)


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

    @property
    def class_indices(self) -> range:
        return range(1, self.spec.num_classes)

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

    def dice_per_class(self, prediction: np.ndarray, label: np.ndarray) -> list[float]:
        """Cheap validation score (Dice only, same empty rule as the full metrics)."""
        scores = []
        for c in self.class_indices:
            p, g = prediction == c, label == c
            total = p.sum() + g.sum()
            if total == 0:
                scores.append(1.0 if self.empty_policy == "penalty" else 0.0)
            else:
                scores.append(float(2.0 * np.logical_and(p, g).sum() / total))
        return scores

    def score(self, prediction: np.ndarray, label: np.ndarray, spacing: Sequence[float] | None) -> list[dict]:
        per_class = metrics.multiclass_metrics(
            prediction, label, self.spec.num_classes,
            spacing=spacing if self.use_spacing else None, empty_policy=self.empty_policy,
        )
        rows = [{"class": self.spec.class_names[c], **per_class[c]} for c in self.class_indices]
        if "pooled_f1" in self.spec.extra_metrics:
            for row, c in zip(rows, self.class_indices):
                p, g = prediction == c, label == c
                row.update(tp=int(np.logical_and(p, g).sum()), fp=int(np.logical_and(p, ~g).sum()), fn=int(np.logical_and(~p, g).sum()))
        return rows

    def evaluate(self, predictor: Predictor, cases: Iterable[dict], progress: bool = True, device="cpu", desc="test") -> pd.DataFrame:
        """One row per (case, foreground class) with the four metrics."""
        rows = []
        cases = list(cases) if not hasattr(cases, "__len__") else cases
        for case in tqdm(cases, desc=desc, disable=not progress, leave=False):
            label = np.asarray(case["label"])
            prediction = self.predict(predictor, np.asarray(case["image"]), device)
            for row in self.score(prediction, label, case.get("spacing")):
                rows.append({"case": case["case"], **row})
        counts = list(COUNT_NAMES) if "pooled_f1" in self.spec.extra_metrics else []
        return pd.DataFrame(rows, columns=["case", "class", *METRIC_NAMES, *counts])


def pooled_f1(per_case: pd.DataFrame) -> float:
    """Dice of all cases' pixels pooled, per class (2 TP / (2 TP + FP + FN)), then the mean over classes.

    A class absent from every prediction and every label scores 1 (nothing to find, nothing found).
    """
    scores = []
    for _, group in per_case.groupby("class", sort=False):
        tp, fp, fn = (int(group[name].sum()) for name in COUNT_NAMES)
        scores.append(1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def summarize(per_case: pd.DataFrame, extra_metrics: Sequence[str] = ()) -> dict[str, float]:
    """Mean over cases of the class-mean of each metric, plus the per-class Dice (``dice_<class>``) and the
    requested ``extra_metrics`` (see EXTRA_METRICS)."""
    if per_case.empty:
        raise ValueError("no cases were evaluated")
    if per_case[list(METRIC_NAMES)].isna().any().any():
        raise ValueError("a metric is NaN: the empty-mask policy must give every case a value")
    case_means = per_case.groupby("case", sort=False)[list(METRIC_NAMES)].mean()
    summary = {name: float(case_means[name].mean()) for name in METRIC_NAMES}
    for class_name, group in per_case.groupby("class", sort=False):
        summary[f"dice_{class_name}"] = float(group["dice"].mean())
    for name in extra_metrics:
        if name != "pooled_f1":
            raise ValueError(f"unknown extra metric '{name}' (known: {', '.join(EXTRA_METRICS)})")
        summary[name] = pooled_f1(per_case)
    summary["n_cases"] = int(case_means.shape[0])
    return summary
