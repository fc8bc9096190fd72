"""Supervised-only baseline: the labeled stream, CE + Dice. With RATIO=1.0 it is the full-supervision bound.

``method.network_init`` (default ``default``: PyTorch's own init) re-initialises the network with one of CPS's
schemes (``kaiming``, ``xavier``; methods/networks/base.py ``init_weights``). It isolates what an initialisation
does without any cross supervision: the 3-D CPS-family networks get these schemes (upstream's 3-D script), and at
short budgets the Kaiming-initialised one trails (leaderboards/superseded/reading.md, measured in 2-D before the 2-D default
became upstream's PyTorch init).
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import UserError
from methods.base import SemiSupervisedMethod
from methods.hyperparameters import Hyperparameters
from methods.networks import INIT_CHOICES, init_weights
from methods.registry import register


@dataclass(frozen=True)
class SupervisedHyperparameters(Hyperparameters):
    network_init: str = "default"  # default (PyTorch's own) or one of CPS's schemes (INIT_CHOICES)


@register("supervised")
class Supervised(SemiSupervisedMethod):
    uses_unlabeled = False
    hyperparameters = SupervisedHyperparameters
    hp: SupervisedHyperparameters

    def build(self) -> None:
        scheme = self.hp.network_init
        if scheme not in INIT_CHOICES:
            raise UserError(f"unknown method.network_init '{scheme}' for {self.name}", fix=f"give one of: {', '.join(INIT_CHOICES)}")
        self.net = init_weights(self.build_network(), scheme)

    def compute_losses(self, batch):
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        return {"loss": self.supervised_loss(self.net(images), labels)}
