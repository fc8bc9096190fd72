"""The contrastive losses of the methods: InfoNCE in four forms and C2AM's rank-weighted similarity losses.

Every InfoNCE form is ``mean over anchors of -log softmax_j(s_j / tau)[positive]`` with ``s`` dot products, the
temperature dividing every logit; they differ in how the embeddings are normalised and where the positive and the
negatives come from:

* :func:`info_nce_all_keys` (MCL-CS patch contrast): embeddings as given (the caller normalises); the positive is
  the key at a given index, the negatives every other key of the batch.
* :func:`info_nce_shared_negatives` (MCL-CS, one class): embeddings as given; one positive vector and one set of
  negatives shared by all anchors.
* :func:`l2_prototype_info_nce` (MCL-CS pixel contrast): L2-normalises every row; per class, the positive is the
  class prototype (the L2-normalised mean of the L2-normalised members), the negatives the class's given rows,
  neither with gradient; the mean over anchors, then over classes.
* :func:`l1_pixel_nce_within_image` (MMS; CUT's PatchNCE): L1-normalises each pixel vector over the channels; the
  positive is the key's same pixel (or the constant 0), the negatives the other pixels of the SAME image, the self
  pair's logit replaced by ``diagonal_logit`` before the division by the temperature.

ACTION's regional contrast (ReCo's sampled queries against a prototype and class-weighted negatives) lives with
its sampling in methods/action.py.

FBA-Net's :func:`sim_max_loss` / :func:`sim_min_loss` (C2AM, Xie et al. CVPR 2022) are not InfoNCE: they pull
together (``-log S``) or push apart (``-log(1 - S)``) every pair of a B x B matrix of clamped cosine similarities,
each entry weighted by its rank in its row (methods/fba_net.py gives the upstream details).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.losses.precision import float32_island

SIMILARITY_MIN, SIMILARITY_MAX = 0.0005, 0.9995


# ---- InfoNCE --------------------------------------------------------------------------------------------
@float32_island
def info_nce_all_keys(
    anchors: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE of (M, D) anchors against all (K, D) keys, the positive of anchor i being key ``positives[i]``:
    ``mean_i -log softmax_j(a_i . k_j / tau)[positives[i]]``."""
    return F.cross_entropy(anchors @ keys.T / temperature, positives)


@float32_island
def info_nce_shared_negatives(
    anchors: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE of (A, D) anchors with one positive (D,) vector and shared (K, D) negatives:
    ``mean_a -log(exp(a.p / tau) / (exp(a.p / tau) + sum_n exp(a.n / tau)))``."""
    logits = torch.cat([(anchors @ positive).unsqueeze(1), anchors @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device))


@float32_island
def l2_prototype_info_nce(
    anchors: list[torch.Tensor],
    prototype_members: list[torch.Tensor],
    negatives: list[torch.Tensor],
    temperature: float = 0.1,
) -> torch.Tensor:
    """Mean over classes of :func:`info_nce_shared_negatives` of the class's anchors (A_c, D); its prototype is the
    L2-normalised mean of the L2-normalised (P_c, D) member embeddings, its negatives the (K_c, D) embeddings.
    All embeddings are normalised here; prototypes and negatives carry no gradient."""
    per_class = []
    for class_anchors, members, class_negatives in zip(anchors, prototype_members, negatives):
        prototype = F.normalize(F.normalize(members.detach(), dim=1).mean(dim=0), dim=0)
        per_class.append(
            info_nce_shared_negatives(
                F.normalize(class_anchors, dim=1), prototype, F.normalize(class_negatives.detach(), dim=1), temperature
            )
        )
    return torch.stack(per_class).mean()


@float32_island
def l1_pixel_nce_within_image(
    query: torch.Tensor, key: torch.Tensor, temperature: float = 0.07, constant_positive: bool = False,
    diagonal_logit: float = -10.0,
) -> torch.Tensor:
    """PatchNCE (CUT) over the pixels of one image, as MMS's contrastive losses.

    q, k (B, C, h, w), every pixel vector L1-normalised over C; l_pos[b, i] = q_bi . k_bi (or the constant 0),
    l_neg[b, i, j] = q_bi . k_bj with the diagonal replaced by ``diagonal_logit``; the mean over (b, i) of the
    cross-entropy of [l_pos, l_neg[b, i, :]] / tau with target 0. Negatives come from the same image only.
    """
    q = F.normalize(query.flatten(2), p=1, dim=1).transpose(1, 2)  # (B, P, C)
    k = F.normalize(key.flatten(2), p=1, dim=1).transpose(1, 2)
    batch, pixels = q.shape[:2]
    negatives = torch.bmm(q, k.transpose(1, 2)).masked_fill(
        torch.eye(pixels, dtype=torch.bool, device=q.device), diagonal_logit
    )
    positives = q.new_zeros(batch, pixels, 1) if constant_positive else (q * k).sum(dim=-1, keepdim=True)
    logits = torch.cat([positives, negatives], dim=-1) / temperature
    return F.cross_entropy(logits.reshape(batch * pixels, pixels + 1), logits.new_zeros(batch * pixels, dtype=torch.long))


# ---- C2AM's rank-weighted similarity losses -------------------------------------------------------------
def clamped_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, B) cosine similarities of the rows of ``a`` and ``b``, clamped to [5e-4, 0.9995] (``cos_simi``)."""
    similarity = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return similarity.clamp(SIMILARITY_MIN, SIMILARITY_MAX)


def rank_weights(similarity: torch.Tensor, alpha: float) -> torch.Tensor:
    """``exp(-alpha (rank - 1))`` with ``rank`` the 0-based position of each entry in its row sorted by
    descending similarity (the top entry gets exp(+alpha)). No gradient."""
    with torch.no_grad():
        order = similarity.argsort(dim=1, descending=True, stable=True)
        rank = order.argsort(dim=1)
        return torch.exp(-alpha * (rank - 1).to(similarity.dtype))


@float32_island
def sim_max_loss(embeddings: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """Pull the (B, D) embeddings of all images together: mean of ``w * -log S`` over the B x B matrix."""
    similarity = clamped_cosine(embeddings, embeddings)
    loss = (-torch.log(similarity)).clamp_min(0)
    return (loss * rank_weights(similarity, alpha)).mean()


@float32_island
def sim_min_loss(embeddings: torch.Tensor, others: torch.Tensor, alpha: float = 2.5) -> torch.Tensor:
    """Push every row of ``embeddings`` away from every row of ``others``: mean of ``w * -log(1 - S)``, ranked
    along the rows of ``embeddings`` (upstream call order SimMin(fg, bg))."""
    similarity = clamped_cosine(embeddings, others)
    loss = (-torch.log(1 - similarity)).clamp_min(0)
    return (loss * rank_weights(similarity, alpha)).mean()
