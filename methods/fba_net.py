"""FBA-Net / FBA-Net+ (Chung et al., "FBA-Net: Foreground and Background Aware Contrastive Learning for
Semi-Supervised Atrium Segmentation", MICCAI 2023 workshop MILLanD, LNCS 14307; arXiv 2306.15189).

Upstream: cys1102/FBA-Net ``code/train_3d.py`` (FBA-Net+, 3 decoders; = ``train_fba_plus.py`` @ 6a10956),
``code/train_fba.py`` (FBA-Net, 1 decoder), ``code/networks/VNet.py`` (``Decoder`` + ``ContraModule``),
``code/utils/losses.py`` (``SimMaxLoss`` / ``SimMinLoss`` / ``cos_simi``), ``code/train_2d.py`` +
``code/networks/UNet.py`` (``ContraModuleNew``; the 2-D code is an unfinished sketch upstream).

* ``fba_net_plus`` (the 91.31 Dice LA entry of the README): MC-Net+ (:class:`methods.mc_net_plus.MCNetPlus`,
  same network, Dice, mutual consistency and ramp-up) plus one contrastive module per decoder on that decoder's
  OUTPUT LOGITS. Total ``supervised_weight x sum_d Dice_d + w(t) x consistency + contrastive_weight x sum_d C_d``
  (upstream: 0.5, 1.0 x ramp(iter // 150, 40), 1 with no ramp-up).
* ``fba_net`` (ablation, 89.77 on LA): one decoder (V-Net deconv / U-Net bilinear), no consistency,
  ``supervised_weight x Dice + C`` with weight 1 as upstream ``train_fba.py``.

Contrastive module (``contrast: binary``, the 3-D code, the default in 3-D), per decoder:
  ``a = sigmoid(BN(conv_{k3, stride 2, pad 1, no bias}(logits -> 1 channel)))``, flattened to ``N`` voxels;
  ``fg = a / N``, ``bg = (1 - a) / N``; ``z_f = ReLU(Linear_f(fg))``, ``z_b = ReLU(Linear_b(bg))`` (128 dims);
  ``C = SimMax(z_f) + SimMax(z_b) + SimMin(z_f, z_b)`` over ALL samples of the batch (labeled and unlabeled):
  image-level contrast, B x B similarity matrices.
Per-class version (``contrast: per_class``, ``ContraModuleNew`` of the 2-D sketch, the default in 2-D):
  ``a = sigmoid(conv_{k3, s2, no bias}(logits, C -> C channels))`` (no BN), one shared ``ReLU(Linear(N -> 128))``
  applied per class to ``a`` (NOT divided by N) -> (B, C, 128);
  ``C_d = [sum_n SimMax(z_n) + sum_{m != n} SimMin(z_n, z_m)] / (C (C - 1))``.

``N`` is the size of the stride-2 map of the TRAINING patch (``data.patch_size``; LA 56*56*40 = 125,440, so
~16 M weights per Linear, ~96 M for FBA-Net+). The modules live beside the segmentation network and are used
in training only: validation / sliding-window inference runs ``net`` (decoder 1), unaffected by the patch size.

SimMax / SimMin (C^2AM, Xie et al. CVPR 2022, as in ``losses.py``): ``S = clamp(norm(A) norm(B)^T, 5e-4, 0.9995)``
(diagonal included); SimMax ``l = -log S`` with alpha 0.25, SimMin ``l = -log(1 - S)`` with alpha 2.5; per row the
entries are ranked by descending similarity and weighted ``exp(-alpha (rank - 1))`` (rank 0-based, so the most
similar entry gets exp(+alpha)); loss = mean over all B x B entries. The weights carry no gradient. Ties (e.g.
several entries clamped at 0.9995) are broken by column index (stable sort); upstream's unstable CUDA sort leaves
that unspecified.

Note (measured, faithful behaviour; test ``test_contrast_stops_sending_gradient_after_the_first_sgd_steps``):
the term is live at initialisation only. In the binary module ``a / N`` is ~1/N per entry, so each Linear's output is
dominated by its bias: the SimMax entries already sit at the 0.9995 clamp, and the first SGD step at lr 0.01 gives
the two Linears disjoint ReLU supports, so fg and bg become orthogonal (SimMin at the 5e-4 clamp: 0.0026 per decoder
with B = 4, the floor). The per-class module (not divided by N, as upstream) starts with class embeddings at cosine ~0.99
and one or two steps make them parallel (every SimMin entry at 0.9995: the loss reads 6.3049 with B = 16). Either
way the clamp then passes no gradient (LA patch 112x112x80 and ACDC 128x128 / 256x256 measured alike). Only the
other losses, by moving the logits, can bring entries off the clamp: on real ACDC (7 patients, cpu preset) fba_net's
term read 6.3049 for all 2500 steps of seed 0; in seed 1 it jumped at step ~200 to its floor (0.0005: every entry at
the clamp the loss wants, again no gradient) and stayed there; fba_net_plus's three terms (3 x 6.3049 at first)
partly came off it from step ~200 (9.46 at steps 400-1700, 4.2 from step 2000; leaderboards/superseded/reading.md). When it
does move, it can hurt: fba_net's seed 2 left the ceiling at step ~350 and fell to the floor at ~750, each jump with
a rise of the Dice loss, and scored test Dice 45.1 against 68.0 for the same seed with ``contrastive_weight=0``.

Upstream choices exposed as flags (the intended behaviour is the default, the `paper` profile sets upstream's):
* ``detach_sharpened_targets`` (from MC-Net+): true = soft pseudo-labels; upstream false (gradient through them),
  which the `paper` presets of fba_net_plus set (tests/test_golden_fba_mms.py pins one step to upstream's numbers).
* constant learning rate: upstream never decays it; the `paper` presets set ``optim.schedule: constant``.
* ``predict_with: decoder1`` (upstream) | average.
* Upstream picks the best checkpoint on the 20 TEST cases every 200 iterations; the suite's "best" checkpoint is
  selected on val/dice (LA: cases held out of training, ``data.val_holdout``), never on test; no flag to do otherwise.
* ``fba_net`` has no consistency keys (one decoder): ``method.consistency=...`` is rejected for it.

Hyperparameters: :class:`FBANetPlusHyperparameters` (MC-Net+'s with upstream FBA-Net's consistency defaults, plus
the contrastive module's) and :class:`FBANetHyperparameters` (``fba_net``: the same without the consistency keys);
their meaning beside each default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from methods.hyperparameters import Hyperparameters
from methods.losses.contrastive import sim_max_loss, sim_min_loss
from methods.mc_net_plus import DecoderPrediction, MCNetPlus, MCNetPlusHyperparameters, SupervisedLossChoice
from methods.registry import register


# ---- the contrastive module -----------------------------------------------------------------------------
def downsampled_size(patch_size) -> int:
    """Voxels of the stride-2, kernel-3, padding-1 map of a patch: prod(ceil(s / 2))."""
    return math.prod((int(s) + 1) // 2 for s in patch_size)


class ContrastiveModule(nn.Module):
    """FBA-Net's module on one decoder's logits; ``per_class`` False gives (z_fg, z_bg) of shape (B, dim) each,
    True gives one (B, C, dim) tensor (one embedding per class)."""

    def __init__(self, spatial_dims: int, num_classes: int, patch_size, dim: int = 128, per_class: bool = False):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
        self.per_class = per_class
        self.num_voxels = downsampled_size(patch_size)
        if per_class:
            self.head = conv(num_classes, num_classes, 3, stride=2, padding=1, bias=False)
            self.norm = nn.Identity()
            self.projection = nn.Sequential(nn.Linear(self.num_voxels, dim), nn.ReLU())
        else:
            self.head = conv(num_classes, 1, 3, stride=2, padding=1, bias=False)
            self.norm = norm(1)
            self.fg_projection = nn.Sequential(nn.Linear(self.num_voxels, dim), nn.ReLU())
            self.bg_projection = nn.Sequential(nn.Linear(self.num_voxels, dim), nn.ReLU())

    def forward(self, logits: torch.Tensor):
        activation = torch.sigmoid(self.norm(self.head(logits))).flatten(2)  # (B, C' , N)
        if activation.shape[-1] != self.num_voxels:
            raise ValueError(
                f"the contrastive module was built for {self.num_voxels} voxels (the training patch) but got "
                f"{activation.shape[-1]}: it only runs on training patches"
            )
        if self.per_class:
            return self.projection(activation)
        size = activation.shape[-1]
        foreground = activation.flatten(1) / size
        background = (1 - activation).flatten(1) / size
        return self.fg_projection(foreground), self.bg_projection(background)


# ---- the hyperparameters --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FBANetHyperparameters(Hyperparameters):
    """FBA-Net's own keys (one decoder): MC-Net+'s supervised and prediction keys and the contrastive module's,
    none of the consistency's. Declared here rather than derived from FBA-Net+'s dataclass, which would bring the
    consistency keys along only for this class to remove them."""

    # lambda on the Dice (upstream train_fba.py: 1). A number: MC-Net+'s null (its per-dimensionality lamda) is
    # not upstream FBA's and is refused.
    supervised_weight: float = 1.0
    supervised_loss: SupervisedLossChoice = "upstream"  # as MC-Net+'s: upstream (MC-Net's Dice) | ce_dice
    predict_with: DecoderPrediction = "decoder1"  # as MC-Net+'s: decoder1 (upstream) | average
    projection_dim: int = 128  # embedding size (upstream --dim)
    sim_max_alpha: float = 0.25  # rank-weight alpha of the pull terms (SimMax)
    sim_min_alpha: float = 2.5  # rank-weight alpha of the push terms (SimMin)
    contrastive_weight: float = 1.0  # weight of the summed contrastive terms (upstream: none, i.e. 1)
    contrast: Literal["auto", "binary", "per_class"] = "auto"  # auto = binary in 3-D, per_class in 2-D


@dataclass(frozen=True)
class FBANetPlusHyperparameters(FBANetHyperparameters, MCNetPlusHyperparameters):
    """FBA-Net's keys plus MC-Net+'s consistency keys, in MC-Net+'s order followed by the contrastive ones (a
    dataclass takes its bases' fields from the last base to the first: a key both declare keeps MC-Net+'s place
    and FBA-Net's declaration)."""

    supervised_weight: float = 0.5  # upstream train_3d.py's lamda (LA); train_2d.py has none (the ACDC preset: 1)
    consistency: float = 1.0  # upstream FBA-Net's (both scripts)
    consistency_rampup: float = 40.0  # in units of 150 iterations: full weight at iteration 6000 (both scripts)


# ---- the methods ----------------------------------------------------------------------------------------
@register("fba_net_plus")
class FBANetPlus(MCNetPlus):
    hyperparameters = FBANetPlusHyperparameters
    hp: FBANetPlusHyperparameters
    num_decoders = 3

    def build(self) -> None:
        super().build()  # MC-Net+'s network; in 2-D its decoders 2/3 are (deconv, nearest), upstream FBA's
        # UNet_FBA2d has (nearest, deconv): every loss is symmetric in the decoders, decoder 1 (bilinear) is the same.
        mode = self.hp.contrast
        self.per_class = mode == "per_class" or (mode == "auto" and self.spec.spatial_dims == 2)
        patch_size = self.config["data"]["patch_size"] or self.spec.patch_size
        self.contrastive_modules = nn.ModuleList(
            ContrastiveModule(
                self.spec.spatial_dims, self.spec.num_classes, patch_size, self.hp.projection_dim, self.per_class
            )
            for _ in range(self.num_decoders)
        )

    # ---- contrast -------------------------------------------------------------------------------------
    def contrastive_loss(self, module: ContrastiveModule, logits: torch.Tensor) -> torch.Tensor:
        """One decoder's contrastive term on all samples of the batch (no labels)."""
        pull, push = self.hp.sim_max_alpha, self.hp.sim_min_alpha
        if not self.per_class:
            foreground, background = module(logits)
            return (
                sim_max_loss(foreground, pull) + sim_max_loss(background, pull)
                + sim_min_loss(foreground, background, push)
            )
        embeddings = module(logits)  # (B, C, dim)
        classes = embeddings.shape[1]
        total = embeddings.new_zeros(())
        for n in range(classes):
            total = total + sim_max_loss(embeddings[:, n], pull)
            for m in range(classes):
                if m != n:
                    total = total + sim_min_loss(embeddings[:, n], embeddings[:, m], push)
        return total / (classes * (classes - 1))

    def zero_weight_term_modules(self) -> list[nn.Module]:
        return [self.contrastive_modules] if self.hp.contrastive_weight == 0 else []

    def contrastive_terms(self, logits_list: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.contrastive_loss(m, x) for m, x in zip(self.contrastive_modules, logits_list)]

    # ---- training -------------------------------------------------------------------------------------
    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        if "unlabeled" in batch:
            images = torch.cat([images, batch["unlabeled"]["image"]])
        logits_list = self.net.forward_all(images)
        contrastive = sum(self.contrastive_terms(logits_list))
        losses: dict[str, torch.Tensor] = {}
        if self.num_decoders > 1:
            supervised, consistency = self.mcnet_losses(logits_list, labels)
            weight = self.consistency_weight()
            losses.update(consistency=consistency, consistency_weight=weight)
            unsupervised = weight * consistency
        else:
            supervised = self.decoder_supervised_loss(logits_list[0][: labels.shape[0]], labels)
            unsupervised = 0.0
        loss = self.hp.supervised_weight * supervised + unsupervised + self.hp.contrastive_weight * contrastive
        return {"loss": loss, "supervised": supervised, "contrastive": contrastive, **losses}


@register("fba_net")
class FBANet(FBANetPlus):
    """Single-decoder ablation (upstream ``train_fba.py``): Dice with weight 1 + contrast, no consistency."""

    hyperparameters = FBANetHyperparameters
    hp: FBANetHyperparameters
    num_decoders = 1
