"""Prediction overlays in W&B: image, ground truth and prediction of a few validation cases at every validation.

Only added to the Trainer when W&B is enabled (``run.wandb`` offline or online), so the disabled path neither
imports wandb nor predicts anything extra. W&B draws the two label maps as toggleable masks over the image.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

OVERLAY_CASES = 2  # validation cases shown per validation; each is one more whole-case prediction


def overlay_callbacks(config: dict[str, Any]) -> list[Callback]:
    return [PredictionOverlays()] if config["run"]["wandb"] != "disabled" else []


def most_foreground_slice(label: np.ndarray, axis: int) -> int:
    """The slice along ``axis`` with the most labeled voxels (the middle one when the case has none)."""
    other_axes = tuple(a for a in range(label.ndim) if a != axis % label.ndim)
    counts = (label > 0).sum(axis=other_axes)
    return int(counts.argmax()) if counts.any() else label.shape[axis] // 2


def to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, (0.5, 99.5))
    scaled = (np.clip(image, low, high) - low) / max(high - low, 1e-8)
    return (scaled * 255).astype(np.uint8)


class PredictionOverlays(Callback):
    """Logs ``val/overlays``: one 2D slice per case (the slice with the most ground-truth foreground)."""

    def __init__(self, num_cases: int = OVERLAY_CASES):
        self.num_cases = num_cases

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        from pytorch_lightning.loggers import WandbLogger

        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        import wandb

        cases = trainer.datamodule.cases("val")
        class_labels = dict(enumerate(module.spec.class_names))
        # 2D sets stack slices on the first axis (D, H, W); 3D volumes are (H, W, D): show an axial slice.
        axis = 0 if module.spec.spatial_dims == 2 else -1
        images = []
        for index in range(min(self.num_cases, len(cases))):
            case = cases[index]
            volume, label = np.asarray(case["image"]), np.asarray(case["label"])
            prediction = module.evaluator.predict(module.predict_logits, volume, device=module.device)
            if label.ndim == 2:  # whole-image sets: nothing to slice
                picked_image, picked_label, picked_prediction = volume, label, prediction
            else:
                at = most_foreground_slice(label, axis)
                picked_image, picked_label, picked_prediction = (np.take(a, at, axis=axis) for a in (volume, label, prediction))
            if picked_image.ndim == 3:  # channels first (multi-channel 2D images)
                picked_image = np.moveaxis(picked_image, 0, -1)
            images.append(wandb.Image(
                to_uint8(picked_image),
                masks={
                    "ground_truth": {"mask_data": picked_label.astype(np.uint8), "class_labels": class_labels},
                    "prediction": {"mask_data": picked_prediction.astype(np.uint8), "class_labels": class_labels},
                },
                caption=str(case["case"]),
            ))
        for logger in loggers:
            logger.experiment.log({"val/overlays": images, "trainer/global_step": trainer.global_step})
