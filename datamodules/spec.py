"""What a method and the evaluator need to know about a dataset, independent of where it lives on disk."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

EvalMode = Literal["sliding_window", "slicewise", "whole_image"]


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts of one dataset family member (the protocol, not the training budget).

    ``patch_size`` is the training crop (3D) or the size slices are resized to (2D); the evaluator uses
    the same size for its windows / resized slices. Profiles may override it (the `cpu` profile trains on
    smaller slices), so the effective value comes from the resolved config, not from here.
    """

    name: str
    spatial_dims: int
    in_channels: int
    class_names: tuple[str, ...]
    patch_size: tuple[int, ...]
    eval_mode: EvalMode
    # Per-axis stride of the sliding window (3D protocol); unused by the other modes.
    eval_stride: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    # Conventional labeled counts keyed by ratio (e.g. ACDC 0.1 -> 7 patients); other ratios round.
    labeled_counts: dict[float, int] = field(default_factory=dict)
    # What one labeled unit is: "patient" (ACDC), "case" (LA), "image" (2D sets).
    labeled_unit: str = "case"
    # Dice on the background channel in the supervised loss: SSL4MIS (ACDC) includes it, UA-MT (LA) does not.
    dice_include_background: bool = True
    # Per-channel (mean, std) the loader normalised the images with (ImageNet statistics for RGB endoscopy),
    # or None when images are stored ready to use (ACDC, LA). Image-space augmentations undo it first.
    image_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # Summary metrics beyond the per-case means, e.g. "pooled_f1" (pixels of all test images pooled: the
    # global F1 of the endoscopy literature); benchmark/evaluation.py lists the known ones.
    extra_metrics: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
