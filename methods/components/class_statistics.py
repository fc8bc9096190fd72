"""Running per-class statistics of predictions (class marginals, per-class mean confidence), DDP-synchronised.

Used by distribution alignment (ReMixMatch's moving average of the model's class marginal; Co-DA keeps one on
labeled and one on unlabeled predictions per model) and by class-adaptive thresholds. The values are
``register_buffer``s, so they are saved in checkpoints, restored on resume and moved with the module.

Averaging: each update brings per-class sums and counts of one batch. Under ``torch.distributed`` both are
all-reduced (summed) over the ranks first, so the batch value is the exact mean over the global batch and every
rank applies the same update: the buffers stay identical on all ranks without relying on DDP's broadcast of rank
0's buffers (which would silently drop the other ranks' data). Classes absent from the (global) batch keep their
value. The running value follows SSL4MIS's EMA rule (methods/components/ema.py),
``alpha = min(1 - 1 / (n + 1), momentum)`` with ``n`` the number of updates the class has had: a true average
of the first ``1 / (1 - momentum)`` batches, then an exponential moving average (no bias towards the initial
value, which only matters before the first update).
"""
from __future__ import annotations

import torch
from torch import nn

from core.distributed import all_reduce_sum


class RunningClassMean(nn.Module):
    """Per-class running mean ``value`` (shape ``(num_classes,)``), updated from per-class sums and counts."""

    def __init__(self, num_classes: int, momentum: float, initial: float | None = None):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        start = 1.0 / num_classes if initial is None else initial
        self.register_buffer("value", torch.full((num_classes,), float(start)))
        self.register_buffer("updates", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Fold in one batch given per-class ``sums`` and ``counts``; returns the new value."""
        totals = all_reduce_sum(torch.stack([sums.detach().to(self.value), counts.detach().to(self.value)]))
        present = totals[1] > 0
        batch_mean = totals[0] / totals[1].clamp_min(1.0)
        alpha = (1.0 - 1.0 / (self.updates.to(self.value) + 1.0)).clamp(max=self.momentum)
        blended = alpha * self.value + (1.0 - alpha) * batch_mean
        self.value.copy_(torch.where(present, blended, self.value))
        self.updates.add_(present.long())
        return self.value

    @torch.no_grad()
    def update_marginal(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Class marginal: the mean over all pixels of ``probabilities`` (N, C, *spatial), or one-hot labels."""
        channels_last = probabilities.detach().movedim(1, -1).reshape(-1, probabilities.shape[1])
        counts = torch.full_like(channels_last[0], float(channels_last.shape[0]))
        return self.update(channels_last.sum(dim=0), counts)

    @torch.no_grad()
    def update_per_class_mean(self, values: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Mean of ``values`` over the pixels assigned to each class (``classes``: same shape, integer labels)."""
        num_classes = self.value.shape[0]
        flat_classes = classes.detach().reshape(-1)
        sums = torch.zeros(num_classes, dtype=self.value.dtype, device=self.value.device)
        sums.index_add_(0, flat_classes, values.detach().reshape(-1).to(self.value))
        counts = torch.bincount(flat_classes, minlength=num_classes).to(self.value)
        return self.update(sums, counts)


@torch.no_grad()
def batch_dice_per_class(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard Dice per class over a whole batch of label maps (pixels of all samples pooled), for training logs.

    A class absent from both the prediction and the labels scores 1 (the suite's `penalty` rule for two empty
    masks), so a logged curve never holds NaN.
    """
    flat_predictions, flat_labels = predictions.reshape(-1), labels.reshape(-1)
    intersection = torch.bincount(flat_labels[flat_predictions == flat_labels], minlength=num_classes).double()
    sizes = (torch.bincount(flat_predictions, minlength=num_classes) + torch.bincount(flat_labels, minlength=num_classes)).double()
    return torch.where(sizes > 0, 2.0 * intersection / sizes.clamp_min(1.0), torch.ones_like(sizes))
