"""UA-MT (Yu et al., MICCAI 2019): Mean Teacher whose consistency counts only where the teacher is certain.

Uncertainty is the entropy of the mean of T stochastic teacher passes (input noise; the teacher is in train mode,
so its dropout is active too, as in UA-MT and SSL4MIS). Pixels whose entropy is below a threshold ramped from 0.75
to 1.0 of the maximum entropy over the whole training budget enter the consistency
``sum(mask * (p_student - p_teacher)^2) / (2 * sum(mask))``.

Upstream uses ``ln 2`` as the maximum entropy even for SSL4MIS's 4-class ACDC script; the maximum entropy of C
classes is ``ln C`` (the intended threshold, the class default, so the cpu and smoke profiles).
``entropy_of_two_classes: true`` reproduces the code and is the `paper` profile's value (configs/methods/ua_mt.yaml).

Unlike SSL4MIS's Mean Teacher 2D script, its UA-MT 2D script has no 1000-iteration delay before the consistency:
``consistency_start_step`` is 0 here on every dataset and profile. The consistency pass and each of the T/2
uncertainty passes draw their own input noise, as upstream's fresh ``randn_like`` per pass does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.components.ramps import sigmoid_rampup
from methods.mean_teacher import MeanTeacher, MeanTeacherHyperparameters
from methods.registry import register


@dataclass(frozen=True)
class UncertaintyAwareMeanTeacherHyperparameters(MeanTeacherHyperparameters):
    consistency_start_step: int = 0  # SSL4MIS train_uncertainty_aware_mean_teacher_2D.py has no delay
    uncertainty_passes: int = 8  # T noisy teacher passes (even: T/2 forwards of a doubled batch)
    threshold_start: float = 0.75  # the entropy threshold, as a share of the maximum entropy, ramped from ...
    threshold_end: float = 1.0  # ... to this over the whole budget
    entropy_of_two_classes: bool = False  # faithful flag: SSL4MIS/UA-MT use ln 2 for any number of classes


@register("ua_mt")
class UncertaintyAwareMeanTeacher(MeanTeacher):
    hyperparameters = UncertaintyAwareMeanTeacherHyperparameters
    hp: UncertaintyAwareMeanTeacherHyperparameters

    def uncertainty_threshold(self) -> float:
        classes = 2 if self.hp.entropy_of_two_classes else self.spec.num_classes
        ramp = sigmoid_rampup(self.global_step, self.config["trainer"]["max_steps"])
        start, end = self.hp.threshold_start, self.hp.threshold_end
        return (start + (end - start) * ramp) * math.log(classes)

    @torch.no_grad()
    def teacher_uncertainty(self, unlabeled: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Entropy (B, 1, *S) of the mean softmax over T noisy passes, two copies per forward as upstream; every pass
        draws new noise from ``generator``."""
        passes = self.hp.uncertainty_passes
        if passes % 2:
            raise ValueError("uncertainty_passes must be even (UA-MT runs T/2 forwards of a doubled batch)")
        doubled = unlabeled.repeat(2, *([1] * (unlabeled.ndim - 1)))
        mean_probabilities = 0
        for _ in range(passes // 2):
            probabilities = torch.softmax(self.teacher(self.teacher_input(doubled, generator)), dim=1)
            mean_probabilities = mean_probabilities + probabilities.reshape(2, *unlabeled.shape[:1], *probabilities.shape[1:]).sum(0)
        mean_probabilities = mean_probabilities / passes
        return -(mean_probabilities * torch.log(mean_probabilities + 1e-6)).sum(dim=1, keepdim=True)

    def consistency_loss(self, student_logits: torch.Tensor, unlabeled: torch.Tensor) -> torch.Tensor:
        generator = self.step_generator()  # one stream for the step: the T/2 + 1 teacher inputs differ
        with torch.no_grad():
            teacher_probabilities = torch.softmax(self.teacher(self.teacher_input(unlabeled, generator)), dim=1)
            mask = (self.teacher_uncertainty(unlabeled, generator) < self.uncertainty_threshold()).float()
        distance = (torch.softmax(student_logits, dim=1) - teacher_probabilities) ** 2
        self._certain_fraction = float(mask.mean())
        return torch.sum(mask * distance) / (2 * torch.sum(mask) + 1e-16)

    def compute_losses(self, batch):
        losses = super().compute_losses(batch)
        if "unlabeled" in batch:
            losses["certain_fraction"] = self._certain_fraction
        return losses
