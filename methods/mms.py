"""MMS: Min-Max Similarity (Lou et al., IEEE TMI 2023), dual-view contrastive semi-supervised segmentation.

Upstream: AngeLouCN/Min_Max_Similarity (train_mms.py, loss.py, contrastive_loss.py, model/projector.py, data.py,
gridmask.py); spec in docs/methods.md#mms.

* **Two segmentation networks, two labeled views.** The labeled units are split into two disjoint halves in list
  order (the first half of the first N ids of train.txt for network 1, the second half for network 2; whole
  patients on ACDC): ``labeled_partitions = 2`` makes the DataModule fill the first half of every labeled batch
  from part 1 and the second half from part 2 (datamodules/samplers.py ``PartitionedStepSampler``, deterministic,
  one pass over each part before repeats). MMS draws its halves from an unsorted ``os.listdir``; here they follow
  the split file, so they are reproducible. Both networks see the same strongly augmented unlabeled batch
  (methods/components/strong_augment.py: rotation, flips, affine, colour jitter, grayscale, blur, GridMask).
* **Heads on logit maps** (not on decoder features): a projector (conv3x3-BN-ReLU 8, pool, conv3x3-BN-ReLU 16,
  pool, conv1x1 16: stride 4) per network on its unlabeled logit map, a classifier (8, 16, 32 with a pool after
  each, conv1x1 32: stride 8) per network on its labeled logit map. The pixel count of the contrast follows the
  crop (upstream hard-codes 2304 = 64 x 36 for 512 x 288); the crop must be divisible by 8.
* **Losses** (each network's foreground logit map f, probability sigma(f)):
  L_sup = S(f1(x_A), y_A) + S(f2(x_B), y_B), S the structure loss (weighted BCE + weighted IoU, PraNet);
  L_diff = S(f1(u), sigma(f2(u))) + S(f2(u), sigma(f1(u))), each target detached (cross-network consistency);
  L_con_unl = pixel InfoNCE between proj1(f1(u)) and proj2(f2(u)) (same pixel = positive, the other pixels of the
  image = negatives, L1-normalised, tau 0.07, diagonal -10; keys detached), both directions averaged;
  L_con_lab = the same with a constant 0 positive logit between cls1(f1(x_A)) and cls2(f2(x_B)) (all pairs are
  negatives: "min similarity" across views), both directions averaged;
  L = 0.25 L_sup + 0.25 L_diff + 0.25 L_con_unl + 0.25 L_con_lab.
  Without unlabeled data (RATIO=1.0) L_diff and L_con_unl are absent.
* **Multi-class (ACDC) and the suite's 2-logit binary networks.** The networks output one logit per class
  (softmax), so the evaluator's argmax works as for every method. MMS's single binary logit is, per foreground
  class c, f_c = l_c - logsumexp_{j != c} l_j (sigmoid(f_c) = softmax_c; for two classes f = l_1 - l_0, exactly
  a binary logit). Structure losses are per foreground class (one-vs-rest targets), averaged; the heads take the
  C - 1 foreground maps as input channels (1 for binary data, as upstream).
* **Encoder.** MMS uses an ImageNet-pretrained Res2Net-101-v1b (layers 1-3) with a wide decoder. Downloads are
  not possible here and the suite compares methods on one backbone, so the default is the suite's 2-D U-Net
  (``model.*``), trained from scratch: absolute numbers are therefore well below the paper's. ``method.encoder``
  takes any segmentation-models-pytorch encoder name (a U-Net with that encoder, random init) and
  ``method.encoder_weights`` a local state-dict file for its encoder (nothing is ever downloaded). smp is an
  optional dependency: on the development machine it could not be installed without replacing the pinned CPU
  torch (it pulls torchvision and a CUDA torch), so this path is untested here.
* **2-D only** (colour augmentation, GridMask and 2-D heads): a 3-D dataset is refused with a UserError.
* Evaluation with network 1 (upstream tests each network separately and reports per network);
  ``predict_with: average`` averages both networks' probabilities.

Upstream bugs, each a ``faithful_*`` flag of :class:`MinMaxSimilarityHyperparameters` (what each reproduces is
said there); the default is the intended behaviour (docs/methods.md#mms-upstream-bugs-and-flags). Not reproducible by
design here: upstream's unsorted os.listdir split, glob order in test.py and hard-coded test paths (the split comes
from the list files, the metrics from the suite's evaluator).
The `paper` profile turns every faithful_* flag on: upstream's arithmetic, pinned to numbers produced by upstream's
code in tests/test_golden_fba_mms.py (cpu and smoke keep the defaults).
Optimisation (dataset preset kvasir_seg: Adam 1e-4, poly per step for every method; MMS's `paper` preset sets the
poly per epoch as train_mms.py does: ``optim.schedule=poly_epoch``, 99 epochs, divisor 100).

Hyperparameters: :class:`MinMaxSimilarityHyperparameters`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from methods.base import SemiSupervisedMethod
from methods.components.batch_statistics import predict_with_batch_statistics
from methods.components.ensembles import average_probability_logits
from methods.components.strong_augment import StrongAugmentation
from methods.hyperparameters import Hyperparameters
from methods.losses.contrastive import l1_pixel_nce_within_image
from methods.losses.precision import float32_island
from methods.registry import register

PROJECTOR_WIDTHS = (8, 16)  # stride 4
CLASSIFIER_WIDTHS = (8, 16, 32)  # stride 8


# ---- losses -----------------------------------------------------------------------------------------------------
BOUNDARY_KERNEL, BOUNDARY_GAIN = 31, 5.0


@float32_island
def structure_loss(logits: torch.Tensor, target: torch.Tensor, faithful: bool = False) -> torch.Tensor:
    """PraNet's structure loss for (B, K, H, W) logits and (soft) binary targets: weighted BCE + weighted IoU.

    ``w = 1 + 5 |AvgPool31x31(y) - y|`` (stride 1, padding 15, zeros counted as F.avg_pool2d does);
    wBCE = sum(w BCE) / sum(w), wIoU = 1 - (sum(w p y) + 1) / (sum(w (p + y)) - sum(w p y) + 1), p = sigmoid(logit),
    per image and channel, then the mean of wBCE + wIoU. ``faithful=True`` treats the first argument as MMS does:
    pass it ``sigmoid(o)``; the BCE then applies a second sigmoid and is the plain mean over all pixels (MMS's legacy
    ``reduce='none'``), and the IoU uses the argument as the probability.
    """
    target = target.to(logits.dtype)
    # The 31 x 31 mean with zero padding counted is separable: a 31 x 1 then a 1 x 31 pass (60 instead of 961 adds).
    pad = BOUNDARY_KERNEL // 2
    local_mean = F.avg_pool2d(target, (BOUNDARY_KERNEL, 1), stride=1, padding=(pad, 0))
    local_mean = F.avg_pool2d(local_mean, (1, BOUNDARY_KERNEL), stride=1, padding=(0, pad))
    weights = 1 + BOUNDARY_GAIN * torch.abs(local_mean - target)
    if faithful:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        probabilities = logits
    else:
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce = (weights * per_pixel).sum(dim=(2, 3)) / weights.sum(dim=(2, 3))
        probabilities = torch.sigmoid(logits)
    intersection = (weights * probabilities * target).sum(dim=(2, 3))
    union = (weights * (probabilities + target)).sum(dim=(2, 3))
    iou = 1 - (intersection + 1) / (union - intersection + 1)
    return (bce + iou).mean()


def foreground_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) class logits -> (B, C - 1, ...) one-vs-rest logits f_c = l_c - logsumexp_{j != c} l_j, so that
    sigmoid(f_c) is the softmax probability of class c (two classes: f = l_1 - l_0)."""
    channels = []
    for c in range(1, logits.shape[1]):
        others = torch.cat([logits[:, :c], logits[:, c + 1 :]], dim=1)
        channels.append(logits[:, c] - torch.logsumexp(others, dim=1))
    return torch.stack(channels, dim=1)


def contrast_head(in_channels: int, widths: tuple[int, ...], out_channels: int) -> nn.Sequential:
    """MMS's projector / classifier: [conv3x3-BN-ReLU, maxpool 2] per width, then a 1x1 conv (stride 2^len)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        in_channels = width
    layers.append(nn.Conv2d(in_channels, out_channels, 1))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class MinMaxSimilarityHyperparameters(Hyperparameters):
    supervised_weight: float = 0.25
    consistency_weight: float = 0.25
    unlabeled_contrast_weight: float = 0.25
    labeled_contrast_weight: float = 0.25
    temperature: float = 0.07  # of both pixel contrasts
    diagonal_logit: float = -10.0  # the self pair's logit among the negatives
    projector_channels: int = 16
    classifier_channels: int = 32
    strong_augmentation: bool = True  # false: both networks see the unlabeled batch as loaded
    gridmask_probability: float = 0.8
    predict_with: Literal["model1", "average"] = "model1"
    encoder: str = "unet"  # unet | the name of a segmentation-models-pytorch encoder
    encoder_weights: str | None = None  # a local state-dict file of that encoder
    # MMS passes sigmoid(o) to binary_cross_entropy_with_logits (double sigmoid) with a legacy reduce='none' that
    # makes it a plain mean (no boundary weights)
    faithful_structure_loss: bool = False
    # L_diff is computed with .item(): logged, but no gradient; divided by the batch size
    faithful_consistency: bool = False
    # projectors and classifiers are not given to the optimizer (random, frozen weights; BN statistics still
    # update; gradients still flow through them)
    faithful_frozen_heads: bool = False
    # one direction only, keys detached: network 2 gets no contrastive gradient, network 1 all of it
    faithful_asymmetric: bool = False
    # the test loader forgets the ImageNet normalisation (the network sees [0, 1] images at test time only); no
    # effect on data without normalisation
    faithful_test_unnormalised: bool = False
    # train_mms.py and test.py never call .eval(): validation and test run the networks in training mode at batch 1,
    # so every BatchNorm normalises each image with its own statistics and the running statistics are never read
    faithful_batch_statistics_at_test: bool = False


@register("mms")
class MinMaxSimilarity(SemiSupervisedMethod):
    spatial_dims = (2,)
    labeled_partitions = 2
    hyperparameters = MinMaxSimilarityHyperparameters
    hp: MinMaxSimilarityHyperparameters

    def build(self) -> None:
        stride = 2 ** len(CLASSIFIER_WIDTHS)
        patch = tuple(self.config["data"]["patch_size"])
        if any(size % stride for size in patch):
            raise UserError(
                f"MMS's classifier heads pool by {stride}: the training size {list(patch)} must be divisible by {stride}",
                fix=f"set data.patch_size to multiples of {stride}, e.g. {[max(stride, size // stride * stride) for size in patch]}",
            )
        self.net1 = self.build_segmentation_network()
        self.net2 = self.build_segmentation_network()
        foreground = self.spec.num_classes - 1
        self.projector1 = contrast_head(foreground, PROJECTOR_WIDTHS, self.hp.projector_channels)
        self.projector2 = contrast_head(foreground, PROJECTOR_WIDTHS, self.hp.projector_channels)
        self.classifier1 = contrast_head(foreground, CLASSIFIER_WIDTHS, self.hp.classifier_channels)
        self.classifier2 = contrast_head(foreground, CLASSIFIER_WIDTHS, self.hp.classifier_channels)
        if self.hp.faithful_frozen_heads:
            for head in (self.projector1, self.projector2, self.classifier1, self.classifier2):
                head.requires_grad_(False)  # outside the optimizer; gradients still pass through to the networks
        self.strong_augmentation = StrongAugmentation(
            self.spec.in_channels, self.spec.image_normalization, self.hp.gridmask_probability
        )

    def build_segmentation_network(self) -> nn.Module:
        encoder = self.hp.encoder
        if encoder == "unet":
            return self.build_network()
        try:
            import segmentation_models_pytorch as smp
        except ImportError as error:
            raise UserError(
                f"method.encoder={encoder} needs the optional package segmentation-models-pytorch",
                fix="pip install segmentation-models-pytorch (it needs torchvision matching your torch), or use method.encoder=unet",
            ) from error
        try:
            network = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=self.spec.in_channels, classes=self.spec.num_classes)
        except (KeyError, ValueError) as error:
            raise UserError(f"segmentation-models-pytorch does not know the encoder '{encoder}' ({error})") from error
        weights = self.hp.encoder_weights
        if weights:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise UserError("encoder weights file not found", where=str(path), fix="give a local state-dict file of the encoder")
            try:
                network.encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except RuntimeError as error:
                raise UserError(f"encoder weights do not fit encoder '{encoder}' ({str(error)[:300]})", where=str(path)) from error
        return network

    def zero_weight_term_modules(self) -> list[nn.Module]:
        hp = self.hp
        return ([self.projector1, self.projector2] if hp.unlabeled_contrast_weight == 0 else []) + (
            [self.classifier1, self.classifier2] if hp.labeled_contrast_weight == 0 else [])

    # ---- the two views -------------------------------------------------------------------------------------
    def augment_unlabeled(self, images: torch.Tensor) -> torch.Tensor:
        if not self.hp.strong_augmentation:
            return images
        seed = int(torch.randint(0, 2**62, (1,), generator=self.step_generator(), device=self.device))
        return self.strong_augmentation(images, torch.Generator().manual_seed(seed))

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """One-vs-rest binary targets of the foreground classes, (B, C - 1, H, W)."""
        return F.one_hot(labels.long(), self.spec.num_classes).movedim(-1, 1)[:, 1:].float()

    def structure(self, foreground: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hp.faithful_structure_loss:
            return structure_loss(torch.sigmoid(foreground), target, faithful=True)
        return structure_loss(foreground, target)

    def contrast(self, query_side: torch.Tensor, key_side: torch.Tensor, constant_positive: bool) -> torch.Tensor:
        """Network 1's embedding as query against network 2's detached one; both directions unless faithful."""
        def nce(query, key):
            return l1_pixel_nce_within_image(query, key.detach(), self.hp.temperature, constant_positive, self.hp.diagonal_logit)

        if self.hp.faithful_asymmetric:
            return nce(query_side, key_side)
        return 0.5 * (nce(query_side, key_side) + nce(key_side, query_side))

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        half = images.shape[0] // 2  # first half: network 1's labeled part, second half: network 2's
        labeled1 = foreground_logits(self.net1(images[:half]))
        labeled2 = foreground_logits(self.net2(images[half:]))
        supervised = self.structure(labeled1, self.targets(labels[:half])) + self.structure(labeled2, self.targets(labels[half:]))
        labeled_contrast = self.contrast(self.classifier1(labeled1), self.classifier2(labeled2), constant_positive=True)

        if "unlabeled" in batch:
            view = self.augment_unlabeled(batch["unlabeled"]["image"])
            unlabeled1, unlabeled2 = foreground_logits(self.net1(view)), foreground_logits(self.net2(view))
            consistency = self.structure(unlabeled1, torch.sigmoid(unlabeled2).detach()) + self.structure(
                unlabeled2, torch.sigmoid(unlabeled1).detach()
            )
            if self.hp.faithful_consistency:  # upstream: (...).item() / batch size, a constant
                consistency = consistency.detach() / view.shape[0]
            unlabeled_contrast = self.contrast(self.projector1(unlabeled1), self.projector2(unlabeled2), constant_positive=False)
        else:  # RATIO=1.0: two supervised networks with the labeled all-negative term
            consistency = unlabeled_contrast = images.new_zeros(())

        hp = self.hp
        loss = (
            hp.supervised_weight * supervised + hp.consistency_weight * consistency
            + hp.unlabeled_contrast_weight * unlabeled_contrast + hp.labeled_contrast_weight * labeled_contrast
        )
        return {
            "loss": loss, "supervised": supervised, "consistency": consistency,
            "unlabeled_contrast": unlabeled_contrast, "labeled_contrast": labeled_contrast,
        }

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.hp.faithful_test_unnormalised:
            images = self.strong_augmentation.to_unit_range(images)
        networks = [self.net1, self.net2] if self.hp.predict_with == "average" else [self.net1]
        if self.hp.faithful_batch_statistics_at_test:
            logits = [predict_with_batch_statistics(network, images) for network in networks]
        else:
            logits = [network(images) for network in networks]
        return average_probability_logits(logits) if len(logits) > 1 else logits[0]
