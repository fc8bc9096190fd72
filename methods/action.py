"""ACTION (You et al., "Bootstrapping Semi-supervised Medical Image Segmentation with Anatomical-aware
Contrastive Distillation", IPMI 2023; arXiv 2206.02307): three training stages in one run.

Upstream: charlesyou999648/ACTION ``code/model_3D.py`` (``ISD_3d``), ``code/model.py`` (``ISD``),
``train_{3D,2D}_pretrain.py`` (stages 1-2), ``train_{3D,2D}_action.py`` (stage 3), ``train_{3D,2D}.sh``.
Spec: docs/methods.md#action.

Stages (``stages`` below; benchmark/run.py trains them in order, each from the previous stage's weights):

1. ``pretrain_global`` - contrastive distillation of the global (latent) embedding, unsupervised.
   Student on the student view, EMA teacher (decay 0.99, constant, updated BEFORE its pass of the step, as
   upstream) on the teacher view. ``q = latent_predictor(q_latent_head(latent_s))``, ``k = k_latent_head(latent_t)``
   (head = global average pool -> Linear(C, C) -> Linear(C, D), predictor = Linear(D, D) -> Linear(D, D), no
   non-linearity). Against a memory bank of K keys: ``s = norm(x) norm(bank)^T / T``, student temperature T_s,
   teacher T_t, ``L_latent = KL(softmax(s_t) || softmax(s_s))`` with reduction "batchmean". No positive pair:
   every memory entry is a negative whose target weight is the teacher's softmax similarity ("softly labelled
   negatives"). Then k is enqueued. The latent is the decoder's deepest map of ``forward_features``: the U-Net
   bottleneck in 2D, the V-Net ``x5_up`` (first upsampling + skip) in 3D. Only what the latent loss reaches is
   trained: the encoder and the heads, and in 3D also the decoder's first up-convolution that ``x5_up`` passes
   through (upstream's 2D U-Net freezes its decoder, its 3D V-Net factory ignores the freeze flags).
2. ``pretrain_local`` - ``0.5 (CE + Dice)`` (Dice over all classes, background included) on the labeled part + ``k1 L_latent + k2 L_output``. The local term
   slides a window (3D: cube 20, stride 10, every full window -> 700 on 112x112x80; 2D: 64 / 32 with
   ``range(0, size - window, stride)`` -> 36 on 256x256) over the OUTPUT LOGITS, embeds each window with
   ``AdaptiveAvgPool(s) -> Conv1x1(C, 2C) -> Conv1x1(2C, C)`` (student: then ``Conv1x1 -> Conv1x1`` predictor)
   into C * s^dims values, and distils against its own bank of K entries of P window embeddings.
3. ``finetune`` - student AND teacher start from the stage-2 student; the heads of stages 1-2 are not used.
   Teacher (train mode, dropout on) pseudo-labels the unlabeled batch (``conf, y = max softmax``); images, pseudo
   labels and confidences are mixed (``cutmix`` / ``classmix`` with the next sample, ReCo's
   ``generate_unsup_data``), photometrically augmented, and the student runs twice, on the labeled and on the
   augmented unlabeled batch (each pass normalised by its own BatchNorm batch statistics).
   ``L = 0.5 (CE + Dice) + L_unsup + 0.01 L_reco``:
   * ``L_unsup``: per unlabeled sample weight ``w_b = #(conf >= 0.97) / #valid``, mean of ``w_b CE`` over the
     pixels whose loss is > 0 (ReCo ``compute_unsupervised_loss``);
   * ``L_reco`` (anatomical contrast, ReCo ``compute_reco_loss``) on a full-resolution representation: every
     decoder map of ``forward_features`` upsampled (align_corners) and concatenated, then
     ``Conv(k3, no bias) -> Conv1x1`` to R channels. Its keys carry no gradient, so the head runs at full
     resolution without gradient (coarse decoder maps projected to R channels before they are interpolated, the
     hypercolumn never built) and, with gradient, only at the query pixels (their 3x3 neighbourhoods of the
     hypercolumn interpolated from the decoder maps; methods/components/hypercolumn_head.py): the same values
     and gradients as the dense head with gradient (``dense_representation``), without its backward. Valid pixels: all labeled ones, unlabeled ones with
     conf >= 0.7. Per present class c: prototype = mean valid representation; 256 hard queries drawn (with
     replacement) from valid class-c pixels whose student probability of c is < 0.97; per query 512 negatives:
     a class m != c drawn from softmax_m(cos(r_c, r_m) / 0.5), then a uniformly random valid pixel of m; logits
     ``cos(query, [r_c, negatives]) / 0.5``, CE with target 0. Keys carry no gradient. The sum over classes is
     divided by the number of present classes (a class without hard queries adds 0); fewer than two present
     classes give 0.
   SGD with Nesterov momentum (``per_stage.finetune.optim.nesterov`` in the presets), EMA after every step.

Upstream behaviours exposed as flags (the intended behaviour is the default; ``true`` reproduces the code):
* ``literal_local_reshape``: upstream concatenates the windows along the batch axis and builds the anchor
  ``(B C s^d, P)`` and key ``(K C s^d, P)`` matrices with plain reshapes, so the compared vectors are scrambled
  chunks of the (window, batch, channel, cell) tensor. Default: one embedding per window, compared with every
  window embedding in the bank.
* ``shared_augmented_view``: upstream's 3D transforms write into the shared batch in place, so teacher and
  student get the identical augmented volume. Default: the view named by ``augment_view`` is augmented, the
  other stays clean.
* ``undetached_teacher_targets``: upstream applies the k-heads outside ``no_grad``, so the KL's target
  distribution back-propagates into them (2D: they are trained only that way; 3D: also EMA-updated). Default:
  targets carry no gradient and the k-heads are the EMA of the q-heads in both dimensions (ISD/MoCo).
* ``batch_statistics_at_test`` (true in the LA ``paper`` preset): upstream's 3D test (``code/test_3D.py``) never
  calls ``net.eval()``, so every sliding-window patch (batch 1) is normalised with its own BatchNorm statistics
  and the running statistics are never read. Default: eval mode. The 2D test (``test_2D.py``) calls ``eval()``.
Upstream behaviours that are the default, with the alternative as a flag:
* ``dice_include_background`` (true): upstream's Dice (SSL4MIS ``DiceLoss(num_classes)``) averages over all
  classes, background included, in 2D and 3D; false scores the foreground classes only (UA-MT's LA convention).
* ``freeze_whole_decoder_in_stage_one`` (false): 3D stage 1 trains the decoder's first up-convolution, as
  upstream; true freezes the whole decoder (the ``--train_decoder 0`` the script asks for).
* ``finetune_joint_pass`` (false): stage 3 runs the student once per stream; true runs it once over labeled +
  unlabeled (cheaper; BatchNorm then mixes the two streams' statistics).
* ``finetune_isd_call`` (false; true in the ACDC preset): upstream's 2D fine-tuning calls the ISD module once per
  step and discards its outputs; its side effects are an extra student pass on the raw unlabeled batch (BatchNorm
  running statistics) and a second teacher EMA update, before backward. The 3D script does not call it.
* ``key_heads_copy_query`` (false): the key heads start from their own random initialisation, as upstream;
  true starts them as copies of the query heads (MoCo's choice).
Other differences, not flags: shuffle-BN of the teacher pass is omitted (no effect on one device, and each
DDP rank's BN sees its own batch anyway); in stage 2 upstream re-initialises the heads and banks (it reloads
only the two networks), here they carry over from stage 1; jitter is brightness/contrast only (saturation and
hue do nothing to one channel) and is not clamped to [0, 1]; 2D AdvMorph (missing upstream) is not applied.

Hyperparameters (``method.<key>=...``): :class:`ActionHyperparameters`, their meaning beside each default; the
defaults are the 3D/LA paper values, the 2D/ACDC ones are in benchmark/configs/methods/action.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from methods.base import SemiSupervisedMethod
from methods.components.batch_statistics import predict_with_batch_statistics
from methods.components.ema import make_ema_teacher
from methods.components.hypercolumn_head import HypercolumnHead
from methods.components.memory_bank import MemoryQueue
from methods.components.mixing import MixMode, classmix_keep_masks, cutmix_keep_masks, mix_with_next
from methods.components.photometric import random_blur, random_intensity_jitter
from methods.hyperparameters import Hyperparameters
from methods.losses import SupervisedSegmentationLoss
from methods.losses.precision import float32_island
from methods.registry import register


# ---- distillation -----------------------------------------------------------------------------------------
@float32_island
def similarity_logits(anchors: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine similarities of every row of ``anchors`` (N, E) with every row of ``bank`` (M, E), / temperature."""
    return F.normalize(anchors, dim=-1) @ F.normalize(bank, dim=-1).T / temperature


@float32_island
def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) summed over the bank, averaged over the rows ("batchmean")."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="batchmean")


def window_starts(size: int, window: int, stride: int, include_last: bool) -> list[int]:
    """Start offsets along one axis: every full window (``include_last``, the 3D code), or
    ``range(0, size - window, stride)``, which drops the last full window (the 2D code)."""
    return list(range(0, size - window + (1 if include_last else 0), stride))


def extract_windows(tensor: torch.Tensor, window: int, stride: int, include_last: bool) -> tuple[torch.Tensor, int]:
    """All windows of a (B, C, *spatial) tensor concatenated window-major along the batch axis
    (P * B, C, window, ...) as upstream's ``torch.cat`` of the window list, and P."""
    starts = [window_starts(size, window, stride, include_last) for size in tensor.shape[2:]]
    crops = []
    for corner in torch.cartesian_prod(*[torch.tensor(s) for s in starts]).reshape(-1, len(starts)).tolist():
        crops.append(tensor[(slice(None), slice(None), *(slice(c, c + window) for c in corner))])
    return torch.cat(crops), len(crops)


class LatentHead(nn.Sequential):
    """Global average pool -> Linear(C, C) -> Linear(C, D) (upstream ``MLP``/``MLP_3d``; no non-linearity)."""

    def __init__(self, spatial_dims: int, channels: int, dim: int):
        pool = nn.AdaptiveAvgPool3d(1) if spatial_dims == 3 else nn.AdaptiveAvgPool2d(1)
        super().__init__(pool, nn.Flatten(), nn.Linear(channels, channels), nn.Linear(channels, dim))


def window_head(spatial_dims: int, classes: int, pooling: int) -> nn.Sequential:
    """AdaptiveAvgPool(s) -> Conv1x1(C, 2C) -> Conv1x1(2C, C) (upstream ``ProjectionHead`` 'convmlp')."""
    pool = nn.AdaptiveAvgPool3d(pooling) if spatial_dims == 3 else nn.AdaptiveAvgPool2d(pooling)
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return nn.Sequential(pool, conv(classes, 2 * classes, 1), conv(2 * classes, classes, 1))


def one_by_one_pair(spatial_dims: int, channels: int) -> nn.Sequential:
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return nn.Sequential(conv(channels, channels, 1), conv(channels, channels, 1))


# ---- fine-tuning losses -----------------------------------------------------------------------------------
@float32_island
def confidence_weighted_ce(logits: torch.Tensor, pseudo_labels: torch.Tensor, confidence: torch.Tensor,
                           strong_threshold: float) -> torch.Tensor:
    """ReCo's unsupervised loss: CE to the pseudo labels (-1 ignored), each sample weighted by its fraction of
    pixels with confidence >= ``strong_threshold``, averaged over the pixels whose loss is > 0."""
    count = logits.shape[0]
    valid = (pseudo_labels >= 0).reshape(count, -1).sum(1).clamp_min(1)
    weight = (confidence.reshape(count, -1) >= strong_threshold).sum(1) / valid
    loss = F.cross_entropy(logits, pseudo_labels, reduction="none", ignore_index=-1)
    weighted = weight.view(-1, *([1] * (loss.dim() - 1))) * loss
    positive = loss > 0
    return weighted[positive].mean() if positive.any() else logits.sum() * 0


def sample_anatomical_contrast(labels: torch.Tensor, valid: torch.Tensor, probabilities: torch.Tensor,
                               representation: torch.Tensor, strong_threshold: float, temperature: float,
                               num_queries: int, num_negatives: int, generator: torch.Generator):
    """ReCo's sampling on flattened pixels. Returns (prototypes (n, R), present classes, and per class with hard
    pixels a tuple (class position, query pixel indices (Q,), negative pixel indices (Q, N))). No gradient."""
    device = representation.device
    masks = [valid & (labels == c) for c in range(probabilities.shape[1])]
    members = [torch.nonzero(mask).squeeze(1) for mask in masks]
    present = [c for c, idx in enumerate(members) if idx.numel() > 0]
    with torch.no_grad():  # class means as one (classes, pixels) x (pixels, R) product instead of per-class gathers
        membership = torch.stack([masks[c] for c in present]).to(representation.dtype) if present else None
        prototypes = (membership @ representation.detach()) / membership.sum(1, keepdim=True) if present else None
    draws = []
    if len(present) < 2:
        return prototypes, present, draws
    for position, c in enumerate(present):
        hard = members[c][probabilities[members[c], c] < strong_threshold]
        if hard.numel() == 0:
            continue
        queries = hard[torch.randint(hard.numel(), (num_queries,), generator=generator, device=generator.device).to(device)]
        others = [p for p in range(len(present)) if p != position]
        with torch.no_grad():
            relation = F.cosine_similarity(prototypes[position].unsqueeze(0), prototypes[others], dim=1) / temperature
            classes = torch.multinomial(torch.softmax(relation, 0).to(generator.device), num_queries * num_negatives,
                                        replacement=True, generator=generator).to(device)
            sizes = torch.tensor([members[present[p]].numel() for p in others], device=device)
            offsets = torch.cumsum(sizes, 0) - sizes
            pool = torch.cat([members[present[p]] for p in others])
            uniform = torch.rand(classes.shape, generator=generator, device=generator.device).to(device)
            # index_select rather than advanced indexing: the same values, several times faster on 131 072 draws
            drawn_sizes = sizes.index_select(0, classes)
            picks = offsets.index_select(0, classes) + (uniform * drawn_sizes).long().clamp_max(drawn_sizes - 1)
        draws.append((position, queries, pool.index_select(0, picks).view(num_queries, num_negatives)))
    return prototypes, present, draws


class NegativeProducts(torch.autograd.Function):
    """(Q, N): anchors[q] . keys[negatives[q, j]], with gradient to the anchors only (keys carry none).

    Forward gathers the keys a block of queries at a time into one reused buffer of at most ``chunk_bytes``: a
    fresh (Q, N, R) gather (32 MB at Q=256, N=512, R=64) would be page-faulted in afresh on every step (glibc maps
    blocks that large anew), and autograd would keep every block alive for backward. Backward needs no gathered
    keys: d anchors[q] = sum_j grad[q, j] keys[negatives[q, j]] is one weighted ``embedding_bag`` sum."""

    @staticmethod
    def forward(ctx, keys: torch.Tensor, negatives: torch.Tensor, anchors: torch.Tensor, chunk_bytes: int = 8 << 20):
        queries, per_query = negatives.shape
        step = max(1, chunk_bytes // (per_query * keys.shape[1] * keys.element_size()))
        buffer = keys.new_empty(min(step, queries) * per_query, keys.shape[1])
        products = anchors.new_empty(queries, per_query)
        for start in range(0, queries, step):
            rows = negatives[start:start + step].reshape(-1)
            gathered = torch.index_select(keys, 0, rows, out=buffer[:rows.numel()]).view(-1, per_query, keys.shape[1])
            torch.bmm(gathered, anchors[start:start + step].unsqueeze(2), out=products[start:start + step].unsqueeze(2))
        ctx.save_for_backward(keys, negatives)
        return products

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keys, negatives = ctx.saved_tensors
        grad_anchors = F.embedding_bag(negatives, keys, per_sample_weights=grad.contiguous(), mode="sum")
        return None, None, grad_anchors, None


def negative_products(keys: torch.Tensor, negatives: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(Q, N): anchors[q] . keys[negatives[q, j]] (see :class:`NegativeProducts`); keys must carry no gradient."""
    if keys.requires_grad:
        raise ValueError("negative_products differentiates through the anchors only; detach the keys")
    return NegativeProducts.apply(keys, negatives, anchors)


@float32_island
def anatomical_contrast_loss(representation: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                             probabilities: torch.Tensor, generator: torch.Generator, strong_threshold: float = 0.97,
                             temperature: float = 0.5, num_queries: int = 256, num_negatives: int = 512,
                             query_representation=None) -> torch.Tensor:
    """ReCo's regional contrast on a (B, R, *spatial) representation with (B, *spatial) labels and validity and
    (B, C, *spatial) student probabilities (see the module docstring). The keys (prototypes, negatives) carry no
    gradient; with ``query_representation`` (flat pixel indices -> (n, R) with gradient) ``representation`` is
    only read for them and may be computed without gradient."""
    channels = representation.shape[1]
    features = representation.movedim(1, -1).reshape(-1, channels)
    probabilities = probabilities.detach().movedim(1, -1).reshape(-1, probabilities.shape[1])
    prototypes, present, draws = sample_anatomical_contrast(
        labels.reshape(-1), valid.reshape(-1), probabilities, features, strong_threshold, temperature,
        num_queries, num_negatives, generator)
    total = representation.sum() * 0 if representation.requires_grad else representation.new_zeros(())
    # cos(query, key) = (unit query . key) / |key|: keys carry no gradient, so every pixel's inverse norm is computed
    # once (a pixel is drawn as a negative many times over) and applied to the (Q, N) products, not to the keys
    keys = features.detach()
    inverse_norms = 1 / torch.linalg.vector_norm(keys, dim=1).clamp_min(1e-8)
    if not draws:
        return total
    # every class's queries in one call: one gather (and one scatter in backward) of the hypercolumn neighbourhoods
    all_queries = torch.cat([queries for _, queries, _ in draws])
    all_anchors = features[all_queries] if query_representation is None else query_representation(all_queries)
    for (position, _, negatives), anchors in zip(draws, all_anchors.split(num_queries)):
        unit_prototype = F.normalize(prototypes[position], dim=0, eps=1e-8)
        unit_anchors = F.normalize(anchors, dim=1, eps=1e-8)
        positive = unit_anchors @ unit_prototype  # (Q,): the prototype is key 0 of every query
        negative = negative_products(keys, negatives, unit_anchors) * inverse_norms[negatives]  # (Q, N)
        logits = torch.cat([positive.unsqueeze(1), negative], dim=1) / temperature
        total = total + F.cross_entropy(logits, torch.zeros(num_queries, dtype=torch.long, device=logits.device))
    return total / len(present) if len(present) > 1 else total


# ---- the hyperparameters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActionHyperparameters(Hyperparameters):
    ema_decay: float = 0.99  # teacher (and k-head) EMA decay, constant
    queue_size: int = 36  # K, entries of each memory bank; a multiple of the global batch
    latent_dim: int = 128  # D of the global embedding (2D: 512)
    output_pooling: int = 4  # s, the pooled size of each window (2D: 8)
    window: int = 20  # local window side (2D: 64)
    window_stride: int = 10  # local window stride (2D: 32)
    # true: every full window (3D code); false: range(0, size - window, stride) (2D code)
    window_include_last: bool = True
    student_temperature: float = 0.1  # T_s
    teacher_temperature: float = 0.6  # T_t (2D: 0.01)
    latent_weight: float = 1.0  # k1
    output_weight: float = 1.0  # k2
    # which view of stages 1-2 is augmented (student = 3D --combinations 1, teacher = 2D --combinations 2)
    augment_view: Literal["student", "teacher"] = "student"
    pretrain_jitter: float = 0.02  # jitter strength of stages 1-2 (2D: 0.2)
    finetune_jitter: float = 0.02  # jitter strength of stage 3 (2D: 0.25)
    jitter_probability: float = 0.5
    blur_probability: float = 0.5  # in-plane Gaussian blur, sigma ~ U(0.15, 1.15) (the blur_sigma range)
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    mix: MixMode = "classmix"  # of the unlabeled batch in stage 3: cutmix | classmix | none (2D: cutmix)
    cutmix_depth: int = 20  # slices of the 3D cutmix box
    representation_dim: int = 128  # R (2D: 512)
    strong_threshold: float = 0.97  # hard-query probability bound and the confident-pixel bound of w_b
    weak_threshold: float = 0.7  # confidence for an unlabeled pixel to take part in L_reco
    reco_temperature: float = 0.5
    num_queries: int = 256
    num_negatives: int = 512
    reco_weight: float = 0.01
    pseudo_label_weight: float = 1.0  # stage 3's confidence-weighted pseudo-label cross-entropy (upstream: 1)
    # Upstream behaviours as flags, the intended behaviour the default (module docstring):
    literal_local_reshape: bool = False
    shared_augmented_view: bool = False
    undetached_teacher_targets: bool = False
    batch_statistics_at_test: bool = False
    # Upstream behaviours that are the default, with the alternative as a flag (module docstring):
    dice_include_background: bool = True
    freeze_whole_decoder_in_stage_one: bool = False
    finetune_joint_pass: bool = False
    finetune_isd_call: bool = False
    key_heads_copy_query: bool = False
    dense_representation: bool = False  # true: stage 3 builds the full-resolution representation with gradient


# ---- the method -------------------------------------------------------------------------------------------
@register("action")
class ACTION(SemiSupervisedMethod):
    stages = ("pretrain_global", "pretrain_local", "finetune")
    hyperparameters = ActionHyperparameters
    hp: ActionHyperparameters

    def build(self) -> None:
        hp, dims, classes = self.hp, self.spec.spatial_dims, self.spec.num_classes
        # Upstream's supervised term is SSL4MIS DiceLoss(num_classes) in every stage and dimension: background included.
        self.supervised_criterion = SupervisedSegmentationLoss(
            include_background=hp.dice_include_background, ignore_index=self.spec.ignore_index)
        self.net = self.build_network()
        self.teacher = make_ema_teacher(self.net, hp.ema_decay, warmup=False)
        channels = self.net.decoders[0].feature_channels
        # Stages 1-2: global and local distillation heads and their memory banks.
        self.q_latent_head = LatentHead(dims, channels[0], hp.latent_dim)
        self.latent_predictor = nn.Sequential(nn.Linear(hp.latent_dim, hp.latent_dim), nn.Linear(hp.latent_dim, hp.latent_dim))
        self.q_outputs_head = window_head(dims, classes, hp.output_pooling)
        self.outputs_predictor = one_by_one_pair(dims, classes)
        self.k_latent_head = self._key_head(self.q_latent_head, lambda: LatentHead(dims, channels[0], hp.latent_dim))
        self.k_outputs_head = self._key_head(self.q_outputs_head, lambda: window_head(dims, classes, hp.output_pooling))
        self.num_windows = self._count_windows()
        window_dim = classes * hp.output_pooling ** dims
        self.latent_queue = MemoryQueue(hp.queue_size, (hp.latent_dim,), "the latent memory bank", "method.queue_size")
        self.window_queue = MemoryQueue(hp.queue_size, (self.num_windows, window_dim), "the window memory bank", "method.queue_size")
        # Stage 3: the representation head of the anatomical contrast.
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.representation_head = nn.Sequential(
            conv(sum(channels), hp.representation_dim, 3, padding=1, bias=False),
            conv(hp.representation_dim, hp.representation_dim, 1),
        )
        self._freeze_what_this_stage_does_not_train()

    def _key_head(self, query_head: nn.Module, fresh_head) -> nn.Module:
        """The teacher-side twin of ``query_head``, an EMA of it: upstream builds it with its own random
        initialisation; ``key_heads_copy_query`` starts it as a copy (MoCo). AveragedModel copies on its first
        update, so a separately initialised head counts as already averaged once, and its first update is an EMA."""
        if self.hp.key_heads_copy_query:
            return make_ema_teacher(query_head, self.hp.ema_decay, warmup=False)
        head = make_ema_teacher(fresh_head(), self.hp.ema_decay, warmup=False)
        head.n_averaged.fill_(1)
        return head

    def _count_windows(self) -> int:
        hp = self.hp
        patch = self.config["data"]["patch_size"] or self.spec.patch_size
        counts = [len(window_starts(int(size), hp.window, hp.window_stride, hp.window_include_last)) for size in patch]
        if min(counts) < 1:
            raise UserError(
                f"method.window={hp.window} (stride {hp.window_stride}) leaves no local window in the training patch {list(patch)}",
                fix="choose a smaller method.window / method.window_stride (the presets scale them with the patch)")
        total = 1
        for count in counts:
            total *= count
        return total

    def _freeze_what_this_stage_does_not_train(self) -> None:
        """Only what the stage's loss reaches keeps requires_grad (the optimizer and DDP then ignore the rest)."""
        # 3D: the latent x5_up passes through the decoder's first up-convolution, which upstream's V-Net factory
        # leaves trainable (it ignores the freeze flags).
        first_up = [self.net.decoders[0].ups[0]] if self.spec.spatial_dims == 3 and not self.hp.freeze_whole_decoder_in_stage_one else []
        trained = {
            "pretrain_global": [self.net.encoder, self.q_latent_head, self.latent_predictor, *first_up],
            "pretrain_local": [self.net, self.q_latent_head, self.latent_predictor, self.q_outputs_head, self.outputs_predictor],
            "finetune": [self.net, self.representation_head],
        }[self.stage]
        if self.hp.undetached_teacher_targets and self.stage != "finetune":
            trained += [self.k_latent_head] + ([self.k_outputs_head] if self.stage == "pretrain_local" else [])
        self.requires_grad_(False)
        for module in trained:
            module.requires_grad_(True)

    def on_stage_start(self, previous_stage: str | None) -> None:
        if self.stage == "finetune":  # upstream: student and teacher both load the stage-2 student
            self.teacher.module.load_state_dict(self.net.state_dict())
            # Its first update is then an EMA step, not AveragedModel's copy of the updated student.
            self.teacher.n_averaged.clamp_(min=1)

    # ---- views -------------------------------------------------------------------------------------------
    def photometric(self, images: torch.Tensor, jitter: float, generator: torch.Generator) -> torch.Tensor:
        hp = self.hp
        images = random_intensity_jitter(images, generator, jitter, hp.jitter_probability)
        return random_blur(images, generator, tuple(hp.blur_sigma), hp.blur_probability)

    def distillation_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student view, teacher view) of stages 1-2."""
        augmented = self.photometric(images, self.hp.pretrain_jitter, self.step_generator())
        if self.hp.shared_augmented_view:
            return augmented, augmented
        return (augmented, images) if self.hp.augment_view == "student" else (images, augmented)

    # ---- stages 1-2 --------------------------------------------------------------------------------------
    def update_teacher(self) -> None:
        self.teacher.update_parameters(self.net)
        if not (self.hp.undetached_teacher_targets and self.spec.spatial_dims == 2):  # 2D code: k-heads by gradient only
            self.k_latent_head.update_parameters(self.q_latent_head)
            self.k_outputs_head.update_parameters(self.q_outputs_head)

    def window_embeddings(self, logits: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """(P * B, C, s, ...) embeddings of all windows, window-major (upstream's concatenation order)."""
        windows, _ = extract_windows(logits, self.hp.window, self.hp.window_stride, self.hp.window_include_last)
        return head(windows)

    def local_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_output, the teacher's window keys to enqueue (B, P, C s^d))."""
        hp, count, windows = self.hp, student_logits.shape[0], self.num_windows
        student = self.window_embeddings(student_logits, lambda x: self.outputs_predictor(self.q_outputs_head(x)))
        teacher = self.window_embeddings(teacher_logits, self.k_outputs_head)
        if not hp.undetached_teacher_targets:
            teacher = teacher.detach()
        bank = self.window_queue.keys.clone()  # (K, P, E)
        if hp.literal_local_reshape:
            # Upstream: (P*B, C, s..) -> reshape (B, P, ...) -> reshape (P, B, -1) -> reshape (-1, P) for anchors;
            # bank (K, P, E) -> transpose (P, K, E) -> reshape (-1, P); keys = reshape (B, P, -1).
            keys = teacher.reshape(count, windows, -1)
            student_rows = student.reshape(count, windows, -1).reshape(windows, count, -1).reshape(-1, windows)
            teacher_rows = keys.reshape(windows, count, -1).reshape(-1, windows)
            bank_rows = bank.transpose(0, 1).reshape(-1, windows)
        else:
            student_rows = student.flatten(1).view(windows, count, -1).transpose(0, 1).reshape(count * windows, -1)
            keys = teacher.flatten(1).view(windows, count, -1).transpose(0, 1)
            teacher_rows = keys.reshape(count * windows, -1)
            bank_rows = bank.reshape(-1, bank.shape[-1])
        loss = distillation_kl(similarity_logits(student_rows, bank_rows, hp.student_temperature),
                               similarity_logits(teacher_rows, bank_rows, hp.teacher_temperature))
        return loss, keys

    def distillation_losses(self, batch) -> dict[str, torch.Tensor]:
        hp = self.hp
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        n_labeled = images.shape[0]
        if "unlabeled" in batch:
            images = torch.cat([images, batch["unlabeled"]["image"]])
        student_view, teacher_view = self.distillation_views(images)
        logits, levels = self.net.forward_features(student_view)
        with torch.no_grad():
            self.update_teacher()  # upstream updates the teacher inside the forward, before its pass
            teacher_logits, teacher_levels = self.teacher.module.forward_features(teacher_view)
        query = self.latent_predictor(self.q_latent_head(levels[0]))
        key = self.k_latent_head(teacher_levels[0])
        if not hp.undetached_teacher_targets:
            key = key.detach()
        bank = self.latent_queue.keys.clone()
        latent = distillation_kl(similarity_logits(query, bank, hp.student_temperature),
                                 similarity_logits(key, bank, hp.teacher_temperature))
        losses = {"latent": latent}
        if self.stage == "pretrain_global":
            losses["loss"] = hp.latent_weight * latent
            window_keys = None
        else:
            output, window_keys = self.local_loss(logits, teacher_logits)
            supervised = self.supervised_loss(logits[:n_labeled], labels)
            losses.update(output=output, supervised=supervised,
                          loss=supervised + hp.latent_weight * latent + hp.output_weight * output)
        self.latent_queue.enqueue(key)
        if window_keys is not None:
            self.window_queue.enqueue(window_keys)
        return losses

    # ---- stage 3 -----------------------------------------------------------------------------------------
    def representation(self, levels: list[torch.Tensor], size) -> torch.Tensor:
        """The full-resolution representation: every decoder map upsampled (align_corners) and concatenated, then
        the representation head."""
        mode = "trilinear" if self.spec.spatial_dims == 3 else "bilinear"
        upsampled = [F.interpolate(level, size=size, mode=mode, align_corners=True) for level in levels]
        return self.representation_head(torch.cat(upsampled, dim=1))

    def mix_unlabeled(self, images, pseudo_labels, confidence, generator):
        hp = self.hp
        if hp.mix == "cutmix":
            keep = cutmix_keep_masks(tuple(pseudo_labels.shape), generator, hp.cutmix_depth, images.device)
        elif hp.mix == "classmix":
            keep = classmix_keep_masks(pseudo_labels, generator)
        else:
            return images, pseudo_labels, confidence
        return mix_with_next(keep, images, pseudo_labels, confidence)

    def contrast_inputs(self, levels: list[torch.Tensor], size):
        """(representation for the keys, query function or None) of ``anatomical_contrast_loss``: by default the
        full-resolution head runs without gradient (keys carry none) and, with gradient, only at the query pixels,
        the only place the loss's gradient reaches; ``dense_representation`` runs it with gradient everywhere."""
        if self.hp.dense_representation:
            return self.representation(levels, size), None
        head = HypercolumnHead(levels, size, self.representation_head)
        return head.dense(), head.at

    def finetune_losses(self, batch) -> dict[str, torch.Tensor]:
        hp = self.hp
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        n_labeled = images.shape[0]
        generator = self.step_generator()
        target_labels, valid = labels, torch.ones_like(labels, dtype=torch.bool)
        unlabeled = None
        if "unlabeled" in batch:
            raw_unlabeled = batch["unlabeled"]["image"]
            with torch.no_grad():
                confidence, pseudo_labels = torch.softmax(self.teacher(raw_unlabeled), dim=1).max(dim=1)
            unlabeled, pseudo_labels, confidence = self.mix_unlabeled(raw_unlabeled, pseudo_labels, confidence, generator)
            unlabeled = self.photometric(unlabeled, hp.finetune_jitter, generator)
            target_labels = torch.cat([labels, pseudo_labels])
            valid = torch.cat([valid, confidence >= hp.weak_threshold])
        if unlabeled is None:
            logits, levels = self.net.forward_features(images)
        elif hp.finetune_joint_pass:
            logits, levels = self.net.forward_features(torch.cat([images, unlabeled]))
        else:  # upstream: one pass per stream, so BatchNorm normalises each with its own batch statistics
            (labeled_logits, labeled_levels), (unlabeled_logits, unlabeled_levels) = (
                self.net.forward_features(images), self.net.forward_features(unlabeled))
            logits = torch.cat([labeled_logits, unlabeled_logits])
            levels = [torch.cat(pair) for pair in zip(labeled_levels, unlabeled_levels)]
        supervised = self.supervised_loss(logits[:n_labeled], labels)
        losses = {"supervised": supervised}
        total = supervised
        if unlabeled is not None:
            unsupervised = confidence_weighted_ce(logits[n_labeled:], pseudo_labels, confidence, hp.strong_threshold)
            losses["unsupervised"] = unsupervised
            total = total + hp.pseudo_label_weight * unsupervised
        representation, query_representation = self.contrast_inputs(levels, logits.shape[2:])
        reco = anatomical_contrast_loss(
            representation, target_labels, valid, torch.softmax(logits, dim=1), generator, hp.strong_threshold,
            hp.reco_temperature, hp.num_queries, hp.num_negatives, query_representation)
        losses.update(reco=reco, loss=total + hp.reco_weight * reco)
        if hp.finetune_isd_call and unlabeled is not None:
            self.isd_call_side_effects(raw_unlabeled)
        return losses

    def zero_weight_term_modules(self) -> list[nn.Module]:
        return [self.representation_head] if self.hp.reco_weight == 0 else []

    @torch.no_grad()
    def isd_call_side_effects(self, raw_unlabeled: torch.Tensor) -> None:
        """What upstream's 2D fine-tuning gets from the ISD forward it calls once per step and whose outputs it
        discards: the student runs on the raw unlabeled batch (its BatchNorm running statistics move) and the
        teacher takes an EMA step towards the not yet updated student, before backward."""
        self.net(raw_unlabeled)
        self.teacher.update_parameters(self.net)

    # ---- Lightning -------------------------------------------------------------------------------------
    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        return self.finetune_losses(batch) if self.stage == "finetune" else self.distillation_losses(batch)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.hp.batch_statistics_at_test:
            return predict_with_batch_statistics(self.net, images)
        return self.net(images)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.stage == "finetune":  # stages 1-2 update before the teacher pass (inside compute_losses)
            self.teacher.update_parameters(self.net)
