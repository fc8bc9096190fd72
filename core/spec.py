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
    # Label value that is not a class (CaDIS tasks II/III: 255): excluded from the loss and the metrics.
    ignore_index: int | None = None
    # Scored regions as (name, classes) when they are unions of classes rather than the classes themselves
    # (BraTS: whole tumour = {1, 2, 3}, tumour core = {1, 3}, enhancing tumour = {3}); None = each foreground class.
    eval_regions: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    # Per-channel (mean, std) the loader normalised the images with (ImageNet statistics for RGB endoscopy),
    # or None when images are stored ready to use (ACDC, LA). Image-space augmentations undo it first.
    image_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # Metrics beyond Dice/Jaccard/HD95/ASD, as extra columns: "aji" (nuclei; instances from case["instances"] or
    # the connected components of the mask).
    # "miou": the dataset-level mIoU from pooled pixel counts (CaDIS, Cityscapes-style); "pooled_f1": Dice of the
    # pixels of all test images pooled (the global F1 of the endoscopy literature).
    extra_metrics: tuple[str, ...] = ()
    # HD95 and ASD per case and class; off where the literature reports overlap only and they would dominate the
    # evaluation time (CaDIS: up to 25 classes on every 960x540 frame).
    surface_metrics: bool = True

    @property
    def scored(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """What the evaluator scores: (name, classes) of each region, by default each foreground class alone."""
        if self.eval_regions is not None:
            return self.eval_regions
        return tuple((name, (c,)) for c, name in enumerate(self.class_names) if c > 0)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
