"""Co-DA: co-distribution alignment with a dual-model framework and an over-expectation cross-entropy
(Wang, Huang, Wu, Cai, Li; Bioengineering 2023, 10(7):869). No official code exists: this follows the
reconstruction of docs/methods.md#co-da (ReMixMatch-style alignment); every open choice is a flag.

On top of cross pseudo supervision (:class:`methods.cps.CrossPseudoSupervision`: models A = ``net1`` and B =
``net2``, initialised as SSL4MIS's CPS for the dimensionality - PyTorch's default init in 2-D, Kaiming / Xavier in
3-D, the reconstruction's CPS base having no initialisation of its own; one forward per model over labeled +
unlabeled images; one optimizer):

* Per model m, running class marginals (buffers, checkpointed, all-reduced over DDP ranks;
  :class:`methods.components.class_statistics.RunningClassMean`): ``pi_L^m`` of its softmax on the labeled pixels
  (``labeled_marginal: ground_truth`` uses the labels' class frequencies instead) and ``pi_U^m`` of its softmax on
  the unlabeled pixels. Each step first folds the current batch in, then uses the values (a choice: the first
  step then aligns with real statistics; at momentum 0.99 the order changes the values by about one batch in 100).
* Alignment of the pseudo-label SOURCE only, without gradient: ``p~_m = p_m * pi_L^m / pi_U^m`` renormalised over
  the classes per pixel (labeled over unlabeled: a class the model under-predicts on unlabeled data is raised).
  Pseudo-label ``y_m = argmax p~_m``, confidence ``k_m = max p~_m``. The trained logits are never aligned.
* Over-expectation filter ``M_m`` (``over_expectation``), the two readings of the paper's words:
  - ``expected_confidence`` (default): ``E_m[c]`` = running mean of ``k_m`` over the unlabeled pixels whose pseudo
    label is c (a per-class buffer like the marginals); keep pixel i iff ``k_m,i >= E_m[y_m,i]``, i.e. its
    confidence is OVER the EXPECTATION of its class. A class-adaptive threshold: lower for the hard, rare classes
    the paper is about. Default because it is the literal reading of the name, the reconstruction's
    recommendation, and it does not depend on which classes happen to be in one batch.
  - ``class_quota``: per class c keep the ``round(pi_L^m[c] * N)`` most confident pixels among those labeled c
    (N = unlabeled pixels of the batch on this rank; all of them if fewer), so the kept pseudo-labels have at most
    the labeled class shares (DARS-style).
  - ``none``: keep every pixel (an ablation: alignment without the filter).
* Over-expectation CE: ``L_oce = sum_i M_B,i CE(f_A(x_u)_i, y_B,i) / sum_i M_B,i`` for model A and the mirror term
  for B (zero when nothing is kept). Total ``sum_m [L_sup(f_m) + lambda(t) L_oce(f_m)]`` with the suite's
  ``0.5 (CE + Dice)`` as ``L_sup``; ``lambda(t) = consistency * sigmoid ramp-up`` over the first
  ``consistency_rampup_fraction`` of the steps (the reconstruction: lambda_max 1, about 40 % of training).
* Logged each log step (CSV in the run folder, W&B when on): every loss term, the kept fraction per model,
  per-class training Dice of each model on the labeled batch and, per model and class, ``pi_L``, ``pi_U`` and
  (expected_confidence) ``E``, so a run shows the alignment at work on the rare classes.
* Without unlabeled data (RATIO=1.0) both models train supervised; ``pi_L`` is still tracked.

Hyperparameters: :class:`CoDistributionAlignmentHyperparameters` (their meaning beside each default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from methods.components.class_statistics import RunningClassMean, batch_dice_per_class
from methods.components.pseudo_labels import align_distribution, class_quota_mask, expected_confidence_mask
from methods.cps import CrossPseudoSupervision, CrossPseudoSupervisionHyperparameters
from methods.losses.masked_cross_entropy import cross_entropy_mean_over_kept
from methods.registry import register

class ModelStatistics(nn.Module):
    """One model's running statistics: labeled and unlabeled class marginals, per-class expected confidence."""

    def __init__(self, num_classes: int, marginal_momentum: float, expectation_momentum: float):
        super().__init__()
        self.labeled_marginal = RunningClassMean(num_classes, marginal_momentum)
        self.unlabeled_marginal = RunningClassMean(num_classes, marginal_momentum)
        # 0 before the first update: keep everything (the first update happens before the first use anyway).
        self.expectation = RunningClassMean(num_classes, expectation_momentum, initial=0.0)


@dataclass(frozen=True)
class CoDistributionAlignmentHyperparameters(CrossPseudoSupervisionHyperparameters):
    consistency: float = 1.0  # lambda_max, the weight of the over-expectation CE after the ramp-up
    # the ramp-up's length as a fraction of trainer.max_steps (sigmoid, in steps); null = CPS's consistency_rampup
    # (SSL4MIS's ramp-up over iteration // 150)
    consistency_rampup_fraction: float | None = 0.4
    # model1 = A, model2 = B, average = the mean of both softmax maps. The abstract does not say; both models are
    # trained symmetrically as peers, so neither is preferred and their mean is the steadier prediction (cps keeps
    # model1, as its upstream tests).
    predict_with: Literal["model1", "model2", "average"] = "average"
    align_distribution: bool = True  # false = no alignment (pseudo-labels from the raw softmax): an ablation
    # pi_L from the model's softmax on labeled pixels (the abstract: "marginal predictions on labeled data") or
    # from the labels' class frequencies
    labeled_marginal: Literal["prediction", "ground_truth"] = "prediction"
    marginal_momentum: float = 0.99  # EMA momentum of pi_L and pi_U, in [0, 1) (ReMixMatch averages ~128 batches)
    # the over-expectation filter (above)
    over_expectation: Literal["expected_confidence", "class_quota", "none"] = "expected_confidence"
    expectation_momentum: float = 0.99  # EMA momentum of the per-class expected confidence E, in [0, 1)


@register("co_da")
class CoDistributionAlignment(CrossPseudoSupervision):
    hyperparameters = CoDistributionAlignmentHyperparameters
    hp: CoDistributionAlignmentHyperparameters

    def build(self) -> None:
        for key in ("marginal_momentum", "expectation_momentum"):
            if not 0.0 <= self.hp[key] < 1.0:
                raise UserError(f"method.{key}={self.hp[key]} for co_da is out of range", fix="use a value in [0, 1), e.g. 0.99")
        super().build()
        num_classes = self.spec.num_classes
        self.statistics = nn.ModuleList(
            ModelStatistics(num_classes, self.hp.marginal_momentum, self.hp.expectation_momentum) for _ in range(2)
        )

    @torch.no_grad()
    def pseudo_labels(self, logits: torch.Tensor, statistics: ModelStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned hard pseudo-labels of one model on unlabeled logits and the over-expectation mask to keep."""
        probabilities = torch.softmax(logits.detach(), dim=1)
        statistics.unlabeled_marginal.update_marginal(probabilities)
        if self.hp.align_distribution:
            probabilities = align_distribution(
                probabilities, statistics.labeled_marginal.value, statistics.unlabeled_marginal.value)
        confidence, labels = probabilities.max(dim=1)
        mode = self.hp.over_expectation
        if mode == "expected_confidence":
            expectation = statistics.expectation.update_per_class_mean(confidence, labels)
            return labels, expected_confidence_mask(confidence, labels, expectation)
        if mode == "class_quota":
            return labels, class_quota_mask(confidence, labels, statistics.labeled_marginal.value)
        return labels, torch.ones_like(labels, dtype=torch.bool)

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        labels = batch["labeled"]["label"]
        n_labeled = labels.shape[0]
        logits = self.forward_networks(batch)
        supervised = [self.supervised_loss(model_logits[:n_labeled], labels) for model_logits in logits]

        monitors: dict[str, torch.Tensor] = {}
        num_classes = self.spec.num_classes
        with torch.no_grad():
            for model, (model_logits, statistics) in enumerate(zip(logits, self.statistics), start=1):
                labeled_logits = model_logits[:n_labeled].detach()
                if self.hp.labeled_marginal == "ground_truth":
                    statistics.labeled_marginal.update_marginal(F.one_hot(labels, num_classes).movedim(-1, 1).float())
                else:
                    statistics.labeled_marginal.update_marginal(torch.softmax(labeled_logits, dim=1))
                dice = batch_dice_per_class(labeled_logits.argmax(dim=1), labels, num_classes)
                for index, class_name in enumerate(self.spec.class_names[1:], start=1):
                    monitors[f"dice_model{model}_{class_name}"] = dice[index]

        if logits[0].shape[0] > n_labeled:
            pseudo = [self.pseudo_labels(model_logits[n_labeled:], statistics)
                      for model_logits, statistics in zip(logits, self.statistics)]
            # Each model learns from the OTHER model's aligned, filtered pseudo-labels.
            oce1 = cross_entropy_mean_over_kept(logits[0][n_labeled:], *pseudo[1])
            oce2 = cross_entropy_mean_over_kept(logits[1][n_labeled:], *pseudo[0])
            for model, (_, keep) in enumerate(pseudo, start=1):
                monitors[f"kept_fraction_model{model}"] = keep.float().mean()
        else:  # RATIO=1.0: no unlabeled stream, supervised training of both models
            oce1 = oce2 = logits[0].new_zeros(())

        for model, statistics in enumerate(self.statistics, start=1):
            for index, class_name in enumerate(self.spec.class_names):
                monitors[f"pi_labeled_model{model}_{class_name}"] = statistics.labeled_marginal.value[index].clone()
                monitors[f"pi_unlabeled_model{model}_{class_name}"] = statistics.unlabeled_marginal.value[index].clone()
                if self.hp.over_expectation == "expected_confidence":
                    monitors[f"expectation_model{model}_{class_name}"] = statistics.expectation.value[index].clone()

        weight = self.consistency_weight()
        model1_loss = supervised[0] + weight * oce1
        model2_loss = supervised[1] + weight * oce2
        return {
            "loss": model1_loss + model2_loss, "model1_loss": model1_loss, "model2_loss": model2_loss,
            "supervised1": supervised[0], "supervised2": supervised[1], "oce1": oce1, "oce2": oce2,
            "consistency_weight": weight, **monitors,
        }
