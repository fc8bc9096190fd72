"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) as SSL4MIS trains it for segmentation.

The student sees one batch of labeled + unlabeled images (one forward, so BatchNorm sees the mixed batch;
``joint_student_pass: false`` runs one pass per stream instead); the EMA teacher sees the unlabeled images with
clamped Gaussian noise. Consistency is the MSE between the two softmax maps, weighted by ``consistency *
sigmoid_rampup(step // 150, consistency_rampup)`` (or over ``consistency_rampup_fraction`` of the run's steps) and
switched on at ``consistency_start_step`` (SSL4MIS's 2D scripts: ``if iter_num < 1000: consistency_loss = 0``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import SemiSupervisedMethod
from methods.components.ema import make_ema_teacher
from methods.hyperparameters import Hyperparameters
from methods.registry import register


@dataclass(frozen=True)
class MeanTeacherHyperparameters(Hyperparameters):
    ema_decay: float = 0.99
    consistency: float = 0.1  # weight of the consistency after the ramp-up
    consistency_rampup: float = 200.0  # in units of 150 iterations (SSL4MIS passes iteration // 150)
    # If set, the ramp-up instead lasts this fraction of trainer.max_steps (counted in steps), for families whose
    # budgets differ per data set (the endoscopy sets' paper runs are 11 682 to 27 819 steps).
    consistency_rampup_fraction: float | None = None
    consistency_start_step: int = 1000  # no consistency before this step (SSL4MIS's 2D scripts)
    noise_std: float = 0.1  # the teacher's input noise ...
    noise_clamp: float = 0.2  # ... clamped to +-this
    # true (SSL4MIS): the student runs once over labeled + unlabeled images, so BatchNorm normalises both with one
    # set of batch statistics; false runs it once per stream (isolates what that shared normalisation does)
    joint_student_pass: bool = True


@register("mean_teacher")
class MeanTeacher(SemiSupervisedMethod):
    hyperparameters = MeanTeacherHyperparameters
    hp: MeanTeacherHyperparameters

    def build(self) -> None:
        self.net = self.build_network()
        self.teacher = make_ema_teacher(self.net, self.hp.ema_decay)

    def teacher_input(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``images`` + clamped Gaussian noise. Without ``generator``, this step's own stream (the same noise on every
        call within a step); a method that needs several different draws in one step passes one generator."""
        generator = self.step_generator() if generator is None else generator
        noise = torch.randn(images.shape, generator=generator, device=images.device) * self.hp.noise_std
        return images + noise.clamp(-self.hp.noise_clamp, self.hp.noise_clamp)

    def consistency_weight(self) -> float:
        if self.global_step < self.hp.consistency_start_step:
            return 0.0
        return self.hp.consistency * self.rampup(self.hp.consistency_rampup,
                                                    fraction=self.hp.consistency_rampup_fraction)

    def consistency_loss(self, student_logits: torch.Tensor, unlabeled: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_probabilities = torch.softmax(self.teacher(self.teacher_input(unlabeled)), dim=1)
        return torch.mean((torch.softmax(student_logits, dim=1) - teacher_probabilities) ** 2)

    def compute_losses(self, batch):
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        n_labeled = images.shape[0]
        if "unlabeled" not in batch:  # RATIO=1.0: nothing to be consistent on
            supervised = self.supervised_loss(self.net(images), labels)
            return {"loss": supervised, "supervised": supervised}
        unlabeled = batch["unlabeled"]["image"]
        if self.hp.joint_student_pass:
            logits = self.net(torch.cat([images, unlabeled]))
            labeled_logits, unlabeled_logits = logits[:n_labeled], logits[n_labeled:]
        else:
            labeled_logits, unlabeled_logits = self.net(images), self.net(unlabeled)
        supervised = self.supervised_loss(labeled_logits, labels)
        consistency = self.consistency_loss(unlabeled_logits, unlabeled)
        weight = self.consistency_weight()
        return {"loss": supervised + weight * consistency, "supervised": supervised, "consistency": consistency,
                "consistency_weight": weight}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # After the optimizer step: the teacher follows the updated student.
        self.teacher.update_parameters(self.net)
