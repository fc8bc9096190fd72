"""Supervised-only baseline: the labeled stream, CE + Dice. With RATIO=1.0 it is the full-supervision bound."""
from __future__ import annotations

from methods.base import SemiSupervisedMethod
from methods.registry import register


@register("supervised")
class Supervised(SemiSupervisedMethod):
    uses_unlabeled = False

    def build(self) -> None:
        self.net = self.build_network()

    def compute_losses(self, batch):
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        return {"loss": self.supervised_loss(self.net(images), labels)}
