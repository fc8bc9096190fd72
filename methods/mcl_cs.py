"""MCL-CS: multiscale (patch- and pixel-level) contrastive learning with perturbations and cross-supervision
(Wu, Yan, Liang, Zhang, Li; EMBC 2023, DOI 10.1109/EMBC40787.2023.10341018). A RECONSTRUCTION.

No official code exists; only the abstract is known. docs/methods.md#mcl-cs reconstructs the method from CPS (two
networks, SSL4MIS) and UniMatch (input and feature perturbations, medical version), and this module follows it.

From the abstract:
  * perturbations of the input image and of the encoded features;
  * cross-supervision making the outputs under those perturbations consistent;
  * patch-level and pixel-level contrastive learning, for intra-class compactness and inter-class separability;
  * evaluation on BraTS, LA and cell nuclei (the `paper` presets below).
Reconstructed (docs/methods.md#mcl-cs, each a hyperparameter below):
  * two networks of one architecture, initialised as SSL4MIS CPS for the dimensionality (PyTorch's default init
    in 2-D, Kaiming / Xavier in 3-D; ``method.network_inits`` as CPS's): this class extends
    :class:`methods.cps.CrossPseudoSupervision`, whose networks, ramp-up and evaluation it reuses,
    trained by one optimizer on the sum of their losses;
  * the weak view is the loader's image; the strong view adds Gaussian noise, intensity jitter and blur and is
    then CutMixed with another unlabeled sample of the batch (the next one, cyclically), boxes as UniMatch
    (rectangles in 2-D, cuboids in 3-D; :func:`methods.components.mixing.cutmix_box_masks`); one strong view
    shared by both networks. Jitter and blur are the suite's shared photometric helpers (the blur acts in the
    image plane, slice by slice in 3-D);
  * feature perturbation = UniMatch FP: channel dropout (p 0.5) on every encoder feature of the unlabeled
    images, decoded in the same decoder pass as the clean batch (batch norm sees both, as UniMatch);
  * pseudo-labels: hard argmax of the OTHER network's clean (weak-view) prediction, kept where its confidence
    is >= ``pseudo_label_threshold`` (UniMatch 0.95; 0 gives CPS's unthresholded labels), CutMixed like the image;
    the masked CE is divided by all pixels (UniMatch's normalisation);
  * cross-supervision of network m: ``strong_weight x CE(f_m(x_s), mix(y_o)) + fp_weight x CE(f_m^FP(x_w), y_o)``;
  * patch-level contrast: the bottleneck feature pooled to a grid (8x8 in 2-D, 4x4x4 in 3-D), projection head
    Conv1x1 -> ReLU -> Conv1x1 (128), L2-normalised; InfoNCE (tau 0.1) with anchors = cells of network m on the
    strong view, keys = cells of the other network on the weak view (no gradient), positive = the same cell of
    the image that is visible there (for a cell at least half inside the CutMix box: the partner image's cell),
    negatives = every other cell of every unlabeled image; both directions summed;
  * pixel-level contrast: a pixel head Conv1x1 -> BN -> ReLU -> Conv1x1 (64), L2-normalised, on the last decoder
    feature (clean weak-view pass: labeled and unlabeled images). Labels: ground truth on labeled images, the
    other network's pseudo-labels where its confidence >= ``pixel_confidence`` on unlabeled ones (the rest is
    ignored); the same labels for both sides of a direction. Per class, up to ``pixel_anchors_per_class``
    anchors of network m, hard ones first (own probability of the label < ``pixel_hard_threshold``, ReCo), in
    random order; positive = the class prototype (mean of the other network's normalised embeddings over the
    class's pixels, L2-normalised, no gradient); ``pixel_negatives`` negatives sampled among the other classes'
    pixels of the other network (no gradient); InfoNCE (tau 0.1), mean over anchors, then over the classes
    present; both directions summed.
    Cost: the head (1x1 convolutions = a per-pixel MLP) runs on the sampled pixels only, not on the whole map;
    the prototype averages up to ``pixel_prototype_samples`` random pixels of the class (null: all of them, as
    ReCo). Both are estimates of the full-map computation, except that the head's batch norm takes its
    statistics over the sampled pixels (on the ACDC cpu setting the full-map head cost as much as the U-Net);
  * total ``sum_m supervised_m + w_u(t) x sum_m cross_m + w_c(t) x (patch + pixel)``, ``w_u = consistency x r(t)``
    (max 1.0), ``w_c = contrastive_weight x r(t)`` (max 0.1), ``r`` CPS's sigmoid ramp-up (200 x 150 iterations).
  * evaluation with network 1 (``predict_with: average`` for both), as CPS.

The two readings of "multiscale" (``multiscale``):
  * ``patch_pixel`` (default): a patch-level contrast of pooled grid embeddings plus a pixel-level contrast at full
    resolution, as above. It is the literal reading of the abstract, which names the two scales as patch and
    pixel, i.e. two granularities of the contrasted unit; the two terms then do different work (the patch term
    needs no labels and ties the two networks' regions together across perturbations, the class-aware pixel term
    is what gives intra-class compactness / inter-class separability), and it guesses fewer numbers.
  * ``decoder_scales``: the pixel-level contrast at several decoder resolutions (``scale_strides``, default
    1/4, 1/2 and full resolution, one pixel head per scale and network, on the decoder maps of
    ``forward_features`` (U-Net: the up blocks' outputs; V-Net: upsampled + skip sums, and the last stage at full
    resolution); labels, confidences and probabilities down-sampled by nearest neighbour), weighted by ``scale_weights`` (1.0 / 0.7 / 0.4 in that order, borrowed
    from the ECCV'22 multi-/cross-scale contrastive segmentation work), "patch-level" being the coarsest scale.
    No pooled patch term.

Without unlabeled data (RATIO=1.0) the cross-supervision and patch terms are zero (kept connected to the heads so
DDP sees every parameter used) and the pixel contrast runs on the labeled images.

Hyperparameters: :class:`MultiscaleContrastCrossSupervisionHyperparameters` (CPS's and its own).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from methods.components.mixing import cutmix_box_masks, mix_with_next
from methods.components.perturbations import channel_dropout, gaussian_noise
from methods.components.photometric import random_blur, random_intensity_jitter
from methods.cps import CrossPseudoSupervision, CrossPseudoSupervisionHyperparameters
from methods.losses.contrastive import info_nce_all_keys, l2_prototype_info_nce
from methods.losses.masked_cross_entropy import cross_entropy_mean_over_all
from methods.registry import register

#: Decoder strides whose maps the pixel contrast can use (``decoder.forward_features`` of both backbones).
LEVEL_STRIDES = (8, 4, 2, 1)
#: Patch grid cells per axis when ``patch_grid`` is null (docs/methods.md#mcl-cs-what-is-reconstructed).
DEFAULT_PATCH_GRID = {2: 8, 3: 4}


# ---- pixel sampling -------------------------------------------------------------------------------------
def priority_sample(candidates: torch.Tensor, preferred: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of up to ``count`` candidates (1-D masks), preferred ones first, in random order within each group."""
    keys = torch.rand(candidates.shape, generator=generator, device=generator.device) + (~preferred).float()
    keys = keys.masked_fill(~candidates, float("inf"))
    return keys.topk(min(count, int(candidates.sum())), largest=False).indices


@dataclass
class PixelSamples:
    """Flat pixel indices (into ``(N, *spatial)``) sampled for one contrast direction, per contrasted class."""

    classes: list[int]
    anchors: list[torch.Tensor]
    negatives: list[torch.Tensor]
    prototype_pixels: list[torch.Tensor]


def sample_pixels(
    labels: torch.Tensor,
    valid: torch.Tensor,
    own_probability: torch.Tensor,
    generator: torch.Generator,
    num_classes: int,
    anchors_per_class: int = 256,
    negatives: int = 512,
    prototype_samples: int | None = 1024,
    hard_threshold: float = 0.97,
) -> PixelSamples:
    """Pixels of one direction of the pixel contrast, for every class with valid pixels and valid pixels of
    other classes: up to ``anchors_per_class`` anchors (own probability of the class below ``hard_threshold``
    first), up to ``negatives`` among the other classes' valid pixels, up to ``prototype_samples`` of the class
    (all of them for None) to average into its prototype. ``labels`` / ``valid`` / ``own_probability`` are
    ``(N, *spatial)``."""
    labels, valid, own_probability = labels.reshape(-1), valid.reshape(-1), own_probability.reshape(-1)
    hard = own_probability < hard_threshold
    samples = PixelSamples([], [], [], [])
    for cls in range(num_classes):
        members = valid & (labels == cls)
        others = valid & (labels != cls)
        if not members.any() or not others.any():
            continue
        samples.classes.append(cls)
        samples.anchors.append(priority_sample(members, hard, anchors_per_class, generator))
        samples.negatives.append(priority_sample(others, others, negatives, generator))
        samples.prototype_pixels.append(
            members.nonzero().squeeze(1) if prototype_samples is None
            else priority_sample(members, members, prototype_samples, generator)
        )
    return samples


def gather_pixels(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of the ``(N, C, *spatial)`` map at flat pixel indices: ``(len(index), C)``."""
    flat = features.flatten(2)
    pixels = flat.shape[2]
    return flat[index // pixels, :, index % pixels]


# ---- projection heads -----------------------------------------------------------------------------------
def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


class PixelProjectionHead(nn.Sequential):
    """Conv1x1 -> BN -> ReLU -> Conv1x1 applied to SAMPLED pixels: ``(M, C)`` feature rows -> ``(M, dim)``.

    A 1x1 convolution is a linear map per pixel, so running it on the pixels the loss uses gives their
    embeddings without projecting the whole full-resolution map (on a 2-core CPU the full-map head cost about
    as much as the U-Net itself). The one difference: batch norm takes its statistics over the sampled pixels of
    the step instead of over every pixel. L2 normalisation happens in the loss."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__(nn.Linear(in_channels, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


class PatchProjectionHead(nn.Module):
    """Adaptive average pooling to a grid of patches, Conv1x1 -> ReLU -> Conv1x1, L2-normalised per cell."""

    def __init__(self, spatial_dims: int, in_channels: int, dim: int):
        super().__init__()
        conv = _conv(spatial_dims)
        self.project = nn.Sequential(conv(in_channels, dim, 1), nn.ReLU(inplace=True), conv(dim, dim, 1))

    def forward(self, features: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        pooled = F.adaptive_avg_pool3d(features, grid) if features.dim() == 5 else F.adaptive_avg_pool2d(features, grid)
        return F.normalize(self.project(pooled), dim=1)


def zero_through(*modules: nn.Module | None) -> torch.Tensor:
    """0, computed from every parameter of the modules (a zero gradient for each)."""
    parameters = [p for module in modules if module is not None for p in module.parameters()]
    return sum(p.sum() for p in parameters) * 0.0


def _flatten_cells(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D, *grid) -> (N * cells, D), sample-major then row-major cells."""
    return embeddings.movedim(1, -1).reshape(-1, embeddings.shape[1])


def _resize_nearest(tensor: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(N, *spatial) map of any dtype resized by nearest neighbour."""
    if tuple(tensor.shape[1:]) == tuple(size):
        return tensor
    return F.interpolate(tensor.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).to(tensor.dtype)


# ---- the method -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MultiscaleContrastCrossSupervisionHyperparameters(CrossPseudoSupervisionHyperparameters):
    consistency: float = 1.0  # w_u after the ramp-up (spec: max 1.0)
    contrastive_weight: float = 0.1  # w_c after the ramp-up (spec: max 0.1)
    pseudo_label_threshold: float = 0.95  # confidence for a pseudo-label to supervise (0 = every pixel, CPS)
    strong_weight: float = 1.0  # weight of the strong-view cross-supervision term of each network
    fp_weight: float = 1.0  # weight of the feature-perturbation cross-supervision term
    feature_dropout: float = 0.5  # channel-dropout probability of the feature perturbation (UniMatch), in [0, 1)
    noise_max_std: float = 0.1  # strong view: noise std drawn from U(0, this) per sample ...
    noise_clamp: float = 0.2  # ... noise clipped to +-this
    jitter_probability: float = 0.8  # strong view: intensity jitter probability (UniMatch's colour jitter) ...
    jitter_strength: float = 0.5  # ... brightness and contrast factors U(1 - s, 1 + s)
    blur_probability: float = 0.5  # strong view: Gaussian blur probability ...
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # ... sigma range in pixels (in-plane)
    cutmix_probability: float = 0.5  # CutMix box probability per sample
    cutmix_area: list[float] = field(default_factory=lambda: [0.02, 0.4])  # box share of the image
    cutmix_aspect: list[float] = field(default_factory=lambda: [0.3, 1 / 0.3])  # box aspect ratio range
    multiscale: Literal["patch_pixel", "decoder_scales"] = "patch_pixel"  # the two readings (above)
    # cells per axis of the patch grid; null = 8 in 2-D, 4 in 3-D (clipped to the bottleneck size)
    patch_grid: int | None = None
    patch_dim: int = 128  # patch embedding size
    patch_temperature: float = 0.1
    pixel_dim: int = 64  # pixel embedding size
    pixel_temperature: float = 0.1
    pixel_anchors_per_class: int = 256
    pixel_negatives: int = 512  # negatives per class
    pixel_prototype_samples: int | None = 1024  # class pixels averaged into a prototype (null = all)
    pixel_confidence: float = 0.9  # unlabeled pixels enter the pixel contrast above this confidence
    pixel_hard_threshold: float = 0.97  # anchors with own probability below this are hard (preferred)
    # decoder_scales: the decoder strides to contrast at (of 8, 4, 2, 1) and the weight of each
    scale_strides: list[int] = field(default_factory=lambda: [4, 2, 1])
    scale_weights: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.4])


@register("mcl_cs")
class MultiscaleContrastCrossSupervision(CrossPseudoSupervision):
    hyperparameters = MultiscaleContrastCrossSupervisionHyperparameters
    hp: MultiscaleContrastCrossSupervisionHyperparameters

    def build(self) -> None:
        self._check_hyperparameters()
        super().build()  # CPS's two networks, initialised as upstream CPS for the dimensionality
        dims = self.spec.spatial_dims
        channels = self.net1.encoder.channels  # per level, shallow to deep (stride 1, 2, 4, 8, 16); a decoder map
        # at stride s has the channels of encoder level log2(s) in both backbones
        self.pixel_strides = [1] if self.hp.multiscale == "patch_pixel" else list(self.hp.scale_strides)
        self.pixel_heads = nn.ModuleList(
            nn.ModuleDict({
                str(stride): PixelProjectionHead(channels[stride.bit_length() - 1], self.hp.pixel_dim)
                for stride in self.pixel_strides
            })
            for _ in range(2)
        )
        self.patch_heads = None
        if self.hp.multiscale == "patch_pixel":
            self.patch_heads = nn.ModuleList(PatchProjectionHead(dims, channels[-1], self.hp.patch_dim) for _ in range(2))

    def zero_weight_term_modules(self) -> list[nn.Module]:
        if self.hp.contrastive_weight != 0:
            return []
        return [heads for heads in (self.pixel_heads, self.patch_heads) if heads is not None]

    def _check_hyperparameters(self) -> None:
        hp = self.hp

        def fail(key: str, problem: str, fix: str) -> None:
            raise UserError(f"method.{key}={hp[key]!r} for mcl_cs: {problem}", fix=fix)

        for key in ("pseudo_label_threshold", "pixel_confidence", "pixel_hard_threshold", "jitter_probability",
                    "blur_probability", "cutmix_probability"):
            if not 0.0 <= hp[key] <= 1.0:
                fail(key, "must lie in [0, 1]", "e.g. 0.95")
        if not 0.0 <= hp.feature_dropout < 1.0:
            fail("feature_dropout", "must lie in [0, 1)", "e.g. 0.5 (UniMatch)")
        for key in ("blur_sigma", "cutmix_area", "cutmix_aspect"):
            if not (len(hp[key]) == 2 and 0 < hp[key][0] <= hp[key][1]):
                fail(key, "must be a range [low, high] with 0 < low <= high", "e.g. [0.1, 2.0]")
        if hp.cutmix_area[1] > 1.0:
            fail("cutmix_area", "a box cannot cover more than the image", "e.g. [0.02, 0.4]")
        strides, weights = hp.scale_strides, hp.scale_weights
        if not strides or any(s not in LEVEL_STRIDES for s in strides) or len(set(strides)) != len(strides):
            fail("scale_strides", f"must be distinct decoder strides of {list(LEVEL_STRIDES)}", "e.g. [4, 2, 1]")
        if len(weights) != len(strides):
            fail("scale_weights", f"needs one weight per stride of scale_strides={strides}", "e.g. [1.0, 0.7, 0.4]")
        grid = hp.patch_grid
        if grid is not None and grid < 1:
            fail("patch_grid", "must be a whole number >= 1 or null", "e.g. 8 (2-D) or 4 (3-D); null picks those")
        for key in ("patch_dim", "pixel_dim", "pixel_anchors_per_class", "pixel_negatives", "pixel_prototype_samples"):
            if hp[key] is not None and hp[key] < 1:  # None: all pixels of the class (pixel_prototype_samples)
                fail(key, "must be a whole number >= 1", f"e.g. the default, {self.hyperparameters.defaults()[key]}")

    # ---- perturbations ----------------------------------------------------------------------------------
    def strong_view(self, images: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise, jitter, blur, then CutMix: inside its box a sample shows the next one (cyclically)."""
        hp = self.hp
        view = gaussian_noise(images, generator, hp.noise_max_std, hp.noise_clamp)
        view = random_intensity_jitter(view, generator, hp.jitter_strength, hp.jitter_probability)
        view = random_blur(view, generator, tuple(hp.blur_sigma), hp.blur_probability)
        return mix_with_next(~boxes, view)[0]

    def forward_network(
        self, net: nn.Module, labeled: torch.Tensor, unlabeled: torch.Tensor | None, strong: torch.Tensor | None,
        generator: torch.Generator,
    ) -> dict[str, Any]:
        """One network on the clean batch (labeled + unlabeled) with the feature-perturbed unlabeled copy decoded
        in the same pass, then on the strong view."""
        n_labeled = labeled.shape[0]
        images = labeled if unlabeled is None else torch.cat([labeled, unlabeled])
        n_clean = images.shape[0]
        features = net.encoder(images)
        if unlabeled is not None:
            p = self.hp.feature_dropout
            features = [torch.cat([f, channel_dropout(f[n_labeled:], p, generator)]) for f in features]
        logits, levels = net.decoders[0].forward_features(features)
        by_stride = {}  # the decoder's maps by stride; where a stride has two, the later (more refined) one
        for level in levels:
            by_stride[images.shape[-1] // level.shape[-1]] = level[:n_clean]
        out = {
            "logits": logits[:n_clean],
            "fp_logits": logits[n_clean:],
            "levels": by_stride,
            "bottleneck": features[-1][:n_clean],
        }
        if strong is not None:
            strong_features = net.encoder(strong)
            out["strong_logits"] = net.decoders[0](strong_features)
            out["strong_bottleneck"] = strong_features[-1]
        return out

    def patch_grid(self, bottleneck: torch.Tensor) -> tuple[int, ...]:
        cells = self.hp.patch_grid or DEFAULT_PATCH_GRID[self.spec.spatial_dims]
        return tuple(min(cells, size) for size in bottleneck.shape[2:])

    # ---- contrast ---------------------------------------------------------------------------------------
    def patch_contrast(self, anchor_side: int, outputs: list[dict], boxes: torch.Tensor, n_labeled: int) -> torch.Tensor:
        """Network ``anchor_side`` on the strong view against the other network on the weak view (cells)."""
        other = 1 - anchor_side
        strong = outputs[anchor_side]["strong_bottleneck"]
        grid = self.patch_grid(strong)
        anchors = _flatten_cells(self.patch_heads[anchor_side](strong, grid))
        with torch.no_grad():
            # detach(): the same values; a view of a grad-requiring tensor made under no_grad would still say
            # requires_grad without a grad_fn, which torch's FlopCounterMode (make perf's paper_cost) rejects.
            keys = _flatten_cells(self.patch_heads[other](outputs[other]["bottleneck"][n_labeled:].detach(), grid))
        n_unlabeled = strong.shape[0]
        cells = torch.arange(anchors.shape[0], device=anchors.device).view(n_unlabeled, *grid)
        # A cell mostly inside the CutMix box shows the partner image there: its positive is the partner's cell.
        pool = F.adaptive_avg_pool3d if boxes.dim() == 4 else F.adaptive_avg_pool2d
        mostly_pasted = pool(boxes.unsqueeze(1).float(), grid).squeeze(1) >= 0.5
        (positives,) = mix_with_next(~mostly_pasted, cells)
        return info_nce_all_keys(anchors, keys, positives.reshape(-1), self.hp.patch_temperature)

    def pixel_contrast(
        self, outputs: list[dict], probabilities: list[torch.Tensor], labels: list[torch.Tensor],
        valid: list[torch.Tensor], generator: torch.Generator,
    ) -> torch.Tensor:
        """Both directions of the pixel contrast, summed, at every contrasted decoder stride (weighted).

        Direction m: anchors of network m; prototypes and negatives of the other network; ``labels[m]`` /
        ``valid[m]`` (full resolution: ground truth, then the other network's pseudo-labels) label both sides;
        ``probabilities[m]`` (network m's detached softmax) tells hard anchors. Each network's head runs once per
        stride, on its anchors and on the keys it provides to the other direction."""
        hp = self.hp
        weights = [1.0] if hp.multiscale == "patch_pixel" else hp.scale_weights
        total = probabilities[0].new_zeros(())
        for stride, weight in zip(self.pixel_strides, weights):
            features = [out["levels"][stride] for out in outputs]
            size = tuple(features[0].shape[2:])
            samples = [
                sample_pixels(
                    _resize_nearest(labels[side], size), _resize_nearest(valid[side], size),
                    _resize_nearest(probabilities[side].gather(1, labels[side].unsqueeze(1)).squeeze(1), size),
                    generator, self.spec.num_classes, hp.pixel_anchors_per_class, hp.pixel_negatives,
                    hp.pixel_prototype_samples, hp.pixel_hard_threshold,
                )
                for side in range(2)
            ]
            anchors, keys = [None, None], [None, None]
            for side in range(2):
                mine, theirs = samples[side], samples[1 - side]
                groups = [*mine.anchors, *theirs.prototype_pixels, *theirs.negatives]
                head = self.pixel_heads[side][str(stride)]
                if sum(len(group) for group in groups) < 2:  # batch norm needs two rows: nothing to contrast
                    continue
                embedded = head(gather_pixels(features[side], torch.cat(groups))).split([len(g) for g in groups])
                n_mine, n_theirs = len(mine.anchors), len(theirs.prototype_pixels)
                anchors[side] = embedded[:n_mine]
                keys[1 - side] = (embedded[n_mine:n_mine + n_theirs], embedded[n_mine + n_theirs:])
            for side in range(2):
                if samples[side].classes and anchors[side] is not None and keys[side] is not None:
                    total = total + weight * l2_prototype_info_nce(anchors[side], *keys[side], hp.pixel_temperature)
        return total

    # ---- training ---------------------------------------------------------------------------------------
    def compute_losses(self, batch) -> dict[str, torch.Tensor | float]:
        labeled, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        n_labeled = labeled.shape[0]
        unlabeled = batch["unlabeled"]["image"] if "unlabeled" in batch else None
        generator = self.step_generator()
        boxes = strong = None
        if unlabeled is not None:
            boxes = cutmix_box_masks(
                unlabeled.shape[0], unlabeled.shape[2:], generator, self.hp.cutmix_probability,
                tuple(self.hp.cutmix_area), tuple(self.hp.cutmix_aspect),
            )
            strong = self.strong_view(unlabeled, boxes, generator)
        networks = (self.net1, self.net2)
        outputs = [self.forward_network(net, labeled, unlabeled, strong, generator) for net in networks]
        probabilities = [torch.softmax(out["logits"].detach(), dim=1) for out in outputs]

        losses: dict[str, torch.Tensor | float] = {}
        for index, out in enumerate(outputs, start=1):
            losses[f"supervised{index}"] = self.supervised_loss(out["logits"][:n_labeled], labels)

        # Cross-supervision by the other network's weak-view pseudo-labels (and the pixel contrast's labels).
        cross = labeled.new_zeros(())
        pixel_labels = [labels, labels]
        pixel_valid = [torch.ones_like(labels, dtype=torch.bool)] * 2
        threshold = self.hp.pseudo_label_threshold
        for side in range(2):
            other = 1 - side
            if unlabeled is None:
                strong_term = fp_term = labeled.new_zeros(())
            else:
                confidence, pseudo = probabilities[other][n_labeled:].max(dim=1)
                fp_term = cross_entropy_mean_over_all(outputs[side]["fp_logits"], pseudo, confidence >= threshold)
                mixed_pseudo, mixed_confidence = mix_with_next(~boxes, pseudo, confidence)
                strong_term = cross_entropy_mean_over_all(outputs[side]["strong_logits"], mixed_pseudo, mixed_confidence >= threshold)
                pixel_labels[side] = torch.cat([labels, pseudo])
                pixel_valid[side] = torch.cat([pixel_valid[side], confidence >= self.hp.pixel_confidence])
            losses[f"cross_strong{side + 1}"], losses[f"cross_fp{side + 1}"] = strong_term, fp_term
            cross = cross + self.hp.strong_weight * strong_term + self.hp.fp_weight * fp_term

        pixel = self.pixel_contrast(outputs, probabilities, pixel_labels, pixel_valid, generator)
        losses["pixel_contrast"] = pixel
        contrast = pixel
        if self.patch_heads is not None:
            patch = labeled.new_zeros(())
            if unlabeled is not None:  # the patch contrast needs the strong view
                patch = sum(self.patch_contrast(side, outputs, boxes, n_labeled) for side in range(2))
            losses["patch_contrast"] = patch
            contrast = contrast + patch
        # A head whose loss had nothing to contrast this step (no unlabeled stream, no class with pixels of
        # another class) must still be in the graph: DDP (find_unused_parameters=False) stops otherwise.
        contrast = contrast + zero_through(self.pixel_heads, self.patch_heads)

        ramp = self.unsupervised_ramp()
        consistency_weight = self.hp.consistency * ramp
        contrastive_weight = self.hp.contrastive_weight * ramp
        losses["loss"] = (
            losses["supervised1"] + losses["supervised2"] + consistency_weight * cross + contrastive_weight * contrast
        )
        losses.update(consistency_weight=consistency_weight, contrastive_weight=contrastive_weight)
        return losses
