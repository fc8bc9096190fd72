"""Cross pseudo supervision (CPS; Chen et al., CVPR 2021) as in SSL4MIS.

Upstream: HiLab-git/SSL4MIS ``code/train_cross_pseudo_supervision_2D.py`` (ACDC) and ``..._3D.py`` (BraTS).

* Two networks of the same architecture, initialised per dimensionality as upstream: the 3-D script re-initialises
  network 1 Kaiming-normal and network 2 Xavier-normal (``init_weights`` mirrors its ``kaiming_normal_init_weight``
  / ``xavier_normal_init_weight``); the 2-D script defines the same functions but does not call them (since
  SSL4MIS commit 9a74d15, "fixed a bug for CPS"), so both 2-D networks keep PyTorch's default layer init.
* Each network makes ONE forward pass over the concatenated batch (labeled first, then unlabeled), so batch norm
  sees the mixed batch as upstream (TwoStreamBatchSampler batches).
* Loss of network k: the supervised loss on its labeled logits (the suite's 0.5 * (CE + Dice), upstream's
  ``0.5 * (ce_loss + dice_loss)``; upstream's ``DiceLoss(num_classes)`` averages over all classes, background
  included, in 2-D and 3-D, which ``dice_include_background`` sets where the dataset's convention differs, e.g.
  LA's foreground-only Dice) + w(t) * CE(its logits on the UNLABELED part, argmax of the other network on
  the same part, detached). Upstream slices ``[labeled_bs:]`` for the pseudo-label term in both the 2-D and the
  3-D script: labeled samples do not enter it.
* The total is the sum of both networks' losses, minimised by ONE optimizer over both networks (upstream steps
  two identical SGD optimizers after one backward pass of the sum, which is the same update).
* w(t) = consistency * sigmoid_rampup(iteration // 150, consistency_rampup), consistency 0.1, ramp-up 200 (so
  the ramp-up spans 30000 iterations, upstream's whole run); iteration counted from 0 as upstream.
* Evaluation with network 1 (upstream tests ``model1``); ``predict_with: average`` averages both networks'
  probabilities instead, ``model2`` uses network 2.
* Without unlabeled data (RATIO=1.0) the pseudo-label terms are absent: both networks train supervised.

Hyperparameters: :class:`CrossPseudoSupervisionHyperparameters`.
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
from methods.losses import SupervisedSegmentationLoss
from methods.losses.precision import float32_island
from methods.networks import INIT_CHOICES, init_weights
from methods.registry import register

#: Upstream's initialisation of (network 1, network 2) per dimensionality (``network_inits: null``).
UPSTREAM_NETWORK_INITS = {2: ("default", "default"), 3: ("kaiming", "xavier")}


@float32_island
def cross_pseudo_loss(logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """CE of ``logits`` against the hard pseudo-labels ``argmax(other_logits)`` (no gradient to the other side)."""
    pseudo_labels = other_logits.detach().argmax(dim=1)
    return F.cross_entropy(logits, pseudo_labels)


@dataclass(frozen=True)
class CrossPseudoSupervisionHyperparameters(Hyperparameters):
    consistency: float = 0.1  # weight of the pseudo-label terms after the ramp-up
    consistency_rampup: float = 200.0  # ramp-up length in units of 150 iterations (upstream)
    # If set, the ramp-up instead lasts this fraction of trainer.max_steps, counted in steps (the cpu/smoke
    # presets: upstream lengths never finish there).
    consistency_rampup_fraction: float | None = None
    # model1 (upstream) | model2 | average (the mean of both networks' softmax)
    predict_with: Literal["model1", "model2", "average"] = "model1"
    # Initialisation of network 1 and network 2, two of kaiming | xavier | default (``default`` keeps PyTorch's
    # layer init, what single-network methods get); null = upstream's for the dimensionality
    # (UPSTREAM_NETWORK_INITS: [default, default] in 2-D, [kaiming, xavier] in 3-D). The re-initialisations draw
    # conv weights 2.4x (Kaiming) and 1.7x (Xavier) larger than the defaults; behind batch norm that divides the
    # effective learning rate by about their square, which a short run does not absorb
    # (leaderboards/superseded/reading.md: the CPS investigation of the first cpu protocol).
    network_inits: list[str] | None = None
    # null = the dataset's Dice convention (DatasetSpec.dice_include_background); true/false = with / without the
    # background class (SSL4MIS: true; the LA `paper` preset sets it, configs/methods/cps.yaml)
    dice_include_background: bool | None = None


@register("cps")
class CrossPseudoSupervision(SemiSupervisedMethod):
    hyperparameters = CrossPseudoSupervisionHyperparameters
    hp: CrossPseudoSupervisionHyperparameters

    def build(self) -> None:
        include_background = self.hp.dice_include_background
        if include_background is not None:
            self.supervised_criterion = SupervisedSegmentationLoss(include_background=include_background,
                                                                   ignore_index=self.spec.ignore_index)
        self.net1, self.net2 = (init_weights(self.build_network(), scheme) for scheme in self.network_inits())

    def network_inits(self) -> tuple[str, str]:
        """The initialisation scheme of each network: ``method.network_inits``, or upstream's for the data's
        dimensionality when it is null."""
        inits = self.hp.network_inits
        if inits is None:
            return UPSTREAM_NETWORK_INITS[self.spec.spatial_dims]
        if not isinstance(inits, (list, tuple)) or len(inits) != 2 or not set(inits) <= set(INIT_CHOICES):
            raise UserError(f"method.network_inits={inits} for {self.name}",
                            fix=f"give two of: {', '.join(INIT_CHOICES)}, e.g. [kaiming, xavier], or null for "
                                "upstream's (2-D [default, default], 3-D [kaiming, xavier])")
        return tuple(inits)

    def unsupervised_ramp(self) -> float:
        """The sigmoid ramp-up factor in [0, 1] of this step (upstream's per-150-iteration one, or a fraction
        of the run)."""
        return self.rampup(self.hp.consistency_rampup, fraction=self.hp.consistency_rampup_fraction)

    def consistency_weight(self) -> float:
        return self.hp.consistency * self.unsupervised_ramp()

    def forward_networks(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Both networks' logits on the labeled images followed by the unlabeled ones: one forward per network
        over the concatenated batch, so batch norm sees the mixed batch as upstream."""
        images = batch["labeled"]["image"]
        if "unlabeled" in batch:
            images = torch.cat([images, batch["unlabeled"]["image"]])
        return self.net1(images), self.net2(images)

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        """Every term of one step (unweighted terms, the weight and the total), from one forward per network."""
        labels = batch["labeled"]["label"]
        n_labeled = labels.shape[0]
        logits1, logits2 = self.forward_networks(batch)

        supervised1 = self.supervised_loss(logits1[:n_labeled], labels)
        supervised2 = self.supervised_loss(logits2[:n_labeled], labels)
        if logits1.shape[0] > n_labeled:
            pseudo1 = cross_pseudo_loss(logits1[n_labeled:], logits2[n_labeled:])
            pseudo2 = cross_pseudo_loss(logits2[n_labeled:], logits1[n_labeled:])
        else:  # RATIO=1.0: no unlabeled stream, supervised training of both networks
            pseudo1 = pseudo2 = logits1.new_zeros(())
        weight = self.consistency_weight()
        model1_loss = supervised1 + weight * pseudo1
        model2_loss = supervised2 + weight * pseudo2
        return {
            "loss": model1_loss + model2_loss, "model1_loss": model1_loss, "model2_loss": model2_loss,
            "supervised1": supervised1, "supervised2": supervised2, "pseudo1": pseudo1, "pseudo2": pseudo2,
            "consistency_weight": weight,
        }

    def monitored_predictors(self) -> dict:
        # Each network's own validation Dice (cheap next to training): shows when one network lags the other.
        return {"net1": self.net1, "net2": self.net2}

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.hp.predict_with == "average":
            return average_probability_logits([self.net1(images), self.net2(images)])
        if self.hp.predict_with == "model2":
            return self.net2(images)
        return self.net1(images)
