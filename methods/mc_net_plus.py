"""MC-Net+ (Wu et al., "Mutual consistency learning for semi-supervised medical image segmentation", MedIA 2022).

Upstream: ycwu1997/MC-Net ``code/train_mcnet_3d.py`` (LA, ``mcnet3d_v2``), ``code/train_mcnet_2d.py`` (ACDC,
``mcnet2d_v2``), ``code/utils/losses.py``, ``code/utils/test_patch.py`` (commit fee453c).

* One encoder, three decoders differing only in up-sampling (``build_network(num_decoders=3)`` gives
  MC-Net's order: V-Net deconv/trilinear/nearest, U-Net bilinear/deconv/nearest); one forward pass over the
  concatenated batch (labeled first, then unlabeled), as upstream's TwoStreamBatchSampler batch.
* Supervised loss, summed over the three decoders on the labeled samples, times ``supervised_weight`` (upstream
  ``--lamda``: 1 in the 2-D script, 0.5 in the 3-D one; the .sh files do not override it; 0.5 in 2-D was only the
  first upload's value). Upstream uses Dice ONLY (the cross-entropy it computes is only logged):
    - 3-D: ``Binary_dice_loss`` on the foreground probability, ``1 - (2 sum(p y) + eps) / (sum p + sum y + eps)``
      (no squares, eps 1e-8); with more than two classes here: the mean of it over the foreground classes;
    - 2-D: MC-Net's ``DiceLoss(n_classes=4)`` on the softmax: per class ``1 - sum(p y) / (sum p^2 + sum y^2 +
      1e-10)`` averaged over ALL classes (background included). Note the numerator lacks the usual factor 2, so the
      value is ``1 - Dice/2`` = 0.5 + 0.5 x (Dice loss): half the gradient of the SSL4MIS Dice. Reproduced as is.
  ``supervised_loss: ce_dice`` uses the suite's 0.5 * (CE + Dice) per decoder instead.
* Mutual consistency (:func:`methods.losses.consistency.mutual_consistency_loss`): softmax of each decoder on the
  WHOLE batch (labeled and unlabeled), each against the sharpened (T = 0.1) probabilities of every other decoder,
  MSE, summed over the 6 ordered pairs; weight w(t) = consistency * sigmoid_rampup(t // 150, consistency_rampup)
  with upstream's t counted from 1 (the iteration counter is incremented before the weight is computed).
  Upstream values: LA consistency 1.0, ramp-up 40 (full weight at iteration 6000 of 15000); ACDC consistency 0.1,
  ramp-up 200 (full weight at iteration 30000 = the end). Set per dataset family in configs/methods/mc_net_plus.yaml.
* Upstream keeps the gradient through the sharpened targets (``detach_sharpened_targets: false``, the `paper`
  profile); ``true`` (the class default, so the cpu and smoke profiles) stops it, treating them as the soft
  pseudo-labels the paper describes.
* Optimisation upstream: SGD 0.01, momentum 0.9, wd 1e-4, CONSTANT learning rate (no decay in either script).
* Evaluation upstream: decoder 1 only (``test_single_case_first_output``; the 2-D test takes ``output[0]``).
  ``predict_with: average`` averages the three decoders' softmax probabilities. (Upstream's "average" output,
  reported besides, averages raw logits and thresholds the foreground logit at 0.5; not reproduced.)
* Without unlabeled data (RATIO=1.0) the consistency runs on the labeled samples only, as it would upstream.

Hyperparameters: :class:`MCNetPlusHyperparameters` (their meaning beside each default; the LA and ACDC
values are set per dataset family in configs/methods/mc_net_plus.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from core.errors import UserError
from methods.base import SemiSupervisedMethod
from methods.components.ensembles import average_probability_logits
from methods.hyperparameters import Hyperparameters
from methods.losses.consistency import mutual_consistency_loss
from methods.losses.precision import float32_island
from methods.registry import register

#: The choices of ``supervised_loss`` and ``predict_with`` (FBA-Net's hyperparameters share them).
SupervisedLossChoice = Literal["upstream", "ce_dice"]
DecoderPrediction = Literal["decoder1", "average"]
#: Upstream ``--lamda`` per dimensionality (train_mcnet_2d.py: 1, train_mcnet_3d.py: 0.5).
UPSTREAM_SUPERVISED_WEIGHT = {2: 1.0, 3: 0.5}


@float32_island
def binary_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """MC-Net's ``Binary_dice_loss``: ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)`` over the whole batch."""
    target = target.to(probabilities.dtype)
    intersection = 2 * torch.sum(probabilities * target) + eps
    union = torch.sum(probabilities) + torch.sum(target) + eps
    return 1 - intersection / union


@float32_island
def foreground_dice_loss(probabilities: torch.Tensor, labels: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean of :func:`binary_dice_loss` over the foreground classes (for two classes: channel 1, as upstream 3-D)."""
    losses = [binary_dice_loss(probabilities[:, c], labels == c, eps) for c in range(1, probabilities.shape[1])]
    return torch.stack(losses).mean()


@float32_island
def mcnet_dice_loss(probabilities: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-10) -> torch.Tensor:
    """MC-Net's 2-D ``DiceLoss``: per class ``1 - sum(p y) / (sum p^2 + sum y^2 + smooth)``, mean over all classes.

    The numerator has no factor 2 (upstream as published), so a perfect prediction scores 0.5, not 0.
    """
    num_classes = probabilities.shape[1]
    onehot = F.one_hot(labels.long(), num_classes).movedim(-1, 1).to(probabilities.dtype)
    dims = (0, *range(2, probabilities.dim()))
    intersection = (probabilities * onehot).sum(dims)
    union = (probabilities * probabilities).sum(dims) + (onehot * onehot).sum(dims) + smooth
    return (1 - intersection / union).mean()


@dataclass(frozen=True)
class MCNetPlusHyperparameters(Hyperparameters):
    # lambda on the summed supervised loss (a number >= 0); null = upstream's for the dimensionality
    # (UPSTREAM_SUPERVISED_WEIGHT: 2-D 1.0, 3-D 0.5)
    supervised_weight: float | None = None
    # per decoder: upstream (MC-Net's Dice by dimensionality, see above) | ce_dice (the suite's 0.5 * (CE + Dice))
    supervised_loss: SupervisedLossChoice = "upstream"
    consistency: float = 0.1  # weight of the mutual consistency after the ramp-up (LA preset: 1.0)
    consistency_rampup: float = 200.0  # ramp-up length in units of 150 iterations (LA preset: 40)
    # if set, the ramp-up instead lasts this fraction of trainer.max_steps, counted in steps
    consistency_rampup_fraction: float | None = None
    temperature: float = 0.1  # sharpening temperature of the consistency targets
    # false = upstream (gradient also through the sharpened targets; the `paper` profile's value)
    detach_sharpened_targets: bool = True
    predict_with: DecoderPrediction = "decoder1"  # decoder1 (upstream) | average (the decoders' mean softmax)


@register("mc_net_plus")
class MCNetPlus(SemiSupervisedMethod):
    hyperparameters = MCNetPlusHyperparameters
    hp: MCNetPlusHyperparameters
    num_decoders = 3
    handles_ignore_index = False  # its upstream supervised losses one-hot the labels themselves

    def build(self) -> None:
        weight = self.hp.supervised_weight
        if weight is not None and weight < 0:
            raise UserError(f"method.supervised_weight={weight!r} for {self.name}",
                            fix="give a number >= 0, or null for upstream's (2-D 1.0, 3-D 0.5)")
        self.net = self.build_network(num_decoders=self.num_decoders)

    def supervised_weight(self) -> float:
        """lambda of the supervised loss: ``method.supervised_weight``, or upstream's for the dimensionality."""
        weight = self.hp.supervised_weight
        return UPSTREAM_SUPERVISED_WEIGHT[self.spec.spatial_dims] if weight is None else float(weight)

    # ---- the pieces (FBA-Net+ reuses them) --------------------------------------------------------
    def consistency_weight(self) -> float:
        # upstream increments iter_num before computing the weight: (iteration + 1) // 150
        return self.hp.consistency * self.rampup(self.hp.consistency_rampup, step_offset=1,
                                                 fraction=self.hp.consistency_rampup_fraction)

    def decoder_supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The supervised loss of one decoder on labeled logits (before ``supervised_weight``)."""
        if self.hp.supervised_loss == "ce_dice":
            return self.supervised_loss(logits, labels)
        probabilities = torch.softmax(logits, dim=1)
        if self.spec.spatial_dims == 2:
            return mcnet_dice_loss(probabilities, labels)
        return foreground_dice_loss(probabilities, labels)

    def mcnet_losses(self, logits_list: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(supervised, consistency): summed supervised loss of the decoders on the first ``len(labels)`` samples,
        and the mutual consistency over all samples (both unweighted)."""
        n_labeled = labels.shape[0]
        supervised = sum(self.decoder_supervised_loss(logits[:n_labeled], labels) for logits in logits_list)
        probabilities = [torch.softmax(logits, dim=1) for logits in logits_list]
        consistency = mutual_consistency_loss(
            probabilities, self.hp.temperature, detach_targets=self.hp.detach_sharpened_targets
        )
        return supervised, consistency

    # ---- training / inference ---------------------------------------------------------------------
    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        """Every term of one step (unweighted terms, the weight and the total), from one forward pass."""
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        if "unlabeled" in batch:
            images = torch.cat([images, batch["unlabeled"]["image"]])
        supervised, consistency = self.mcnet_losses(self.net.forward_all(images), labels)
        weight = self.consistency_weight()
        loss = self.supervised_weight() * supervised + weight * consistency
        return {"loss": loss, "supervised": supervised, "consistency": consistency, "consistency_weight": weight}

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.hp.predict_with == "average":
            return average_probability_logits(self.net.forward_all(images))
        return self.net(images)
