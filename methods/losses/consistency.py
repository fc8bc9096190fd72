"""The mutual-consistency loss of MC-Net / MC-Net+, with its sharpening (Wu et al., MICCAI 2021 / MedIA 2022).

Upstream: ycwu1997/MC-Net ``code/train_mcnet_3d.py`` and ``code/train_mcnet_2d.py`` (``sharpening`` and the
double loop over decoders with ``losses.mse_loss``); FBA-Net+ (cys1102/FBA-Net ``code/train_3d.py``) reuses both.

* ``sharpen`` (methods/components/pseudo_labels.py) is element-wise, ``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))``,
  applied to every channel on its own: it is not renormalised over the classes (for two classes it equals the
  renormalised form, for more it does not).
* ``mutual_consistency_loss`` sums, over all ordered pairs (i, j) with i != j, ``mean((P_i - sharpen(P_j))^2)``,
  the mean running over every element (samples, channels, voxels) of the batch it is given. Upstream gives it
  the whole batch (labeled and unlabeled samples).
* Upstream does not stop the gradient through the sharpened targets: they are written into a ``torch.zeros``
  buffer by slice assignment, which autograd tracks, so decoder j also receives the gradient of
  ``(P_i - S_j)^2`` through ``S_j``. ``detach_targets=True`` (the default here) treats the sharpened
  probabilities as soft pseudo-labels, as the papers describe them; ``False`` reproduces the code (MC-Net+'s
  ``paper`` profile).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from methods.components.pseudo_labels import sharpen
from methods.losses.precision import float32_island


@float32_island
def mutual_consistency_loss(
    probabilities_list: Sequence[torch.Tensor], temperature: float, detach_targets: bool = True
) -> torch.Tensor:
    """``sum_{i != j} mean((P_i - sharpen(P_j))^2)`` over the decoders' probability maps (same shapes).

    With three decoders that is six MSE terms, not averaged over the pairs (as upstream). With
    ``detach_targets`` the sharpened maps carry no gradient (pseudo-labels); upstream they do.
    """
    if len(probabilities_list) < 2:
        raise ValueError(f"mutual consistency needs at least two probability maps, got {len(probabilities_list)}")
    shape = probabilities_list[0].shape
    if any(p.shape != shape for p in probabilities_list):
        raise ValueError(f"probability maps differ in shape: {[tuple(p.shape) for p in probabilities_list]}")
    targets = [sharpen(p, temperature) for p in probabilities_list]
    if detach_targets:
        targets = [t.detach() for t in targets]
    loss = probabilities_list[0].new_zeros(())
    for i, prediction in enumerate(probabilities_list):
        for j, target in enumerate(targets):
            if i != j:
                loss = loss + torch.mean((prediction - target) ** 2)
    return loss
