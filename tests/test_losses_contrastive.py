"""The contrastive losses (methods/losses/contrastive.py) against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from methods.losses.contrastive import (
    info_nce_all_keys,
    info_nce_shared_negatives,
    l1_pixel_nce_within_image,
    l2_prototype_info_nce,
    sim_max_loss,
    sim_min_loss,
)


# ---------------------------------------------------------------------------------------------------------------
# InfoNCE of MCL-CS: given embeddings against all keys / one shared positive; L2-normalised class prototypes


def test_info_nce_all_keys_by_hand():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # tau 0.5: similarities / tau = [2, 0, -2] for anchor 1 and [0, 2, 0] for anchor 2
    e = math.e
    first = -math.log(e**2 / (e**2 + 1 + e**-2))
    second = -math.log(e**2 / (e**2 + 2))
    same_cell = info_nce_all_keys(anchors, keys, torch.tensor([0, 1]), 0.5)
    assert same_cell.item() == pytest.approx((first + second) / 2, rel=1e-6)
    # a pasted cell takes another key as positive: anchor 1's positive is key 2 (similarity 0)
    pasted = info_nce_all_keys(anchors, keys, torch.tensor([1, 1]), 0.5)
    assert pasted.item() == pytest.approx((-math.log(1 / (e**2 + 1 + e**-2)) + second) / 2, rel=1e-6)


def test_info_nce_shared_negatives_by_hand():
    anchors = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    prototype = torch.tensor([1.0, 0.0])
    negatives = torch.tensor([[0.0, 1.0]])
    expected = (-math.log(math.e / (math.e + 1)) - math.log(math.exp(0.6) / (math.exp(0.6) + math.exp(0.8)))) / 2
    assert info_nce_shared_negatives(anchors, prototype, negatives, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # temperature 0.5 doubles every logit
    expected_half = (
        -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
    ) / 2
    assert info_nce_shared_negatives(anchors, prototype, negatives, 0.5).item() == pytest.approx(expected_half, rel=1e-6)


def test_l2_prototype_info_nce_normalises_averages_classes_and_stops_key_gradients():
    # class 0: anchor (5, 0) -> (1, 0); members (2, 0), (0, 3) -> (1, 0), (0, 1) -> prototype (1, 1)/sqrt 2;
    #          negative (0, -2) -> (0, -1).  logits (tau 1): [1/sqrt 2, 0]
    # class 1: anchor (0, 1); member (0, 4) -> (0, 1); negative (3, 0) -> (1, 0). logits [1, 0]
    anchors = [torch.tensor([[5.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 1.0]], requires_grad=True)]
    members = [torch.tensor([[2.0, 0.0], [0.0, 3.0]], requires_grad=True), torch.tensor([[0.0, 4.0]], requires_grad=True)]
    negatives = [torch.tensor([[0.0, -2.0]], requires_grad=True), torch.tensor([[3.0, 0.0]], requires_grad=True)]
    r = 1 / math.sqrt(2)
    expected = (-math.log(math.exp(r) / (math.exp(r) + 1)) - math.log(math.e / (math.e + 1))) / 2
    loss = l2_prototype_info_nce(anchors, members, negatives, temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert all(a.grad is not None for a in anchors)
    assert all(t.grad is None for t in members + negatives)  # prototypes and negatives are targets


# ---------------------------------------------------------------------------------------------------------------
# MMS's L1-normalised pixel NCE within one image

# One image, 2 channels, 1 x 3 pixels. L1-normalised vectors (by hand):
#   q = [(1, 0), (0.5, 0.5), (0, 1)]       from raw (2, 0), (1, 1), (0, -3) -> the last is (0, -1)
#   k = [(1, 0), (0, 1), (0.25, -0.75)]    from raw (1, 0), (0, 4), (1, -3)
Q_RAW = torch.tensor([[[[2.0, 1.0, 0.0]], [[0.0, 1.0, -3.0]]]])  # (B=1, C=2, h=1, w=3)
K_RAW = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 4.0, -3.0]]]])
Q = [(1.0, 0.0), (0.5, 0.5), (0.0, -1.0)]
K = [(1.0, 0.0), (0.0, 1.0), (0.25, -0.75)]


def dot(a, b):
    return a[0] * b[0] + a[1] * b[1]


def expected_nce(tau, constant_positive, diagonal=-10.0):
    total = 0.0
    for i in range(3):
        positive = 0.0 if constant_positive else dot(Q[i], K[i])
        negatives = [diagonal if j == i else dot(Q[i], K[j]) for j in range(3)]
        logits = [positive / tau] + [n / tau for n in negatives]
        total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    return total / 3


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_l1_pixel_nce_by_hand(tau):
    # e.g. pixel 0, tau 0.5: logits [q0.k0 = 1, -10, q0.k1 = 0, q0.k2 = 0.25] / 0.5 = [2, -20, 0, 0.5]
    value = l1_pixel_nce_within_image(Q_RAW.double(), K_RAW.double(), temperature=tau)
    assert value.item() == pytest.approx(expected_nce(tau, False), rel=1e-9)


def test_l1_pixel_nce_one_pixel_spelled_out():
    # tau 0.5, pixel 0 only (1 x 1 image): no negatives but the masked diagonal: CE([2, -20], 0)
    q, k = torch.tensor([[[[3.0]], [[0.0]]]], dtype=torch.float64), torch.tensor([[[[5.0]], [[0.0]]]], dtype=torch.float64)
    value = l1_pixel_nce_within_image(q, k, temperature=0.5)
    assert value.item() == pytest.approx(-2 + math.log(math.exp(2) + math.exp(-20)), rel=1e-9)


def test_l1_pixel_nce_constant_positive_by_hand():
    # constant 0 positive: log(1 + sum_j exp(s_ij / tau)) with s_ii = -10
    value = l1_pixel_nce_within_image(Q_RAW.double(), K_RAW.double(), temperature=0.07, constant_positive=True)
    expected = sum(
        math.log(1 + sum(math.exp((-10.0 if j == i else dot(Q[i], K[j])) / 0.07) for j in range(3))) for i in range(3)
    ) / 3
    assert value.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(expected_nce(0.07, True), rel=1e-12)


def test_l1_pixel_nce_diagonal_mask_matters_and_negatives_stay_in_the_image():
    # A different diagonal value changes the loss (the mask is applied); a second image does not change the first
    # image's anchors (negatives come from the same image only).
    a = l1_pixel_nce_within_image(Q_RAW, K_RAW, 0.5, diagonal_logit=-10.0)
    b = l1_pixel_nce_within_image(Q_RAW, K_RAW, 0.5, diagonal_logit=0.0)
    assert a.item() != pytest.approx(b.item())
    doubled = l1_pixel_nce_within_image(torch.cat([Q_RAW, Q_RAW]), torch.cat([K_RAW, 7 * K_RAW.flip(-1)]), 0.5)
    second = l1_pixel_nce_within_image(Q_RAW, 7 * K_RAW.flip(-1), 0.5)
    assert doubled.item() == pytest.approx((a.item() + second.item()) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# FBA-Net's SimMax / SimMin (C2AM) on a 4 x 4 example


def planar(degrees, radii):
    rows = [[r * math.cos(math.radians(d)), r * math.sin(math.radians(d))] for d, r in zip(degrees, radii)]
    return torch.tensor(rows, dtype=torch.float64)


def clamp(value):
    return min(max(value, 0.0005), 0.9995)


def expected_loss(angle_differences, ranks, alpha, term):
    total = 0.0
    for row_angles, row_ranks in zip(angle_differences, ranks):
        for angle, rank in zip(row_angles, row_ranks):
            similarity = clamp(math.cos(math.radians(angle)))
            total += math.exp(-alpha * (rank - 1)) * term(similarity)
    return total / 16


def test_sim_max_by_hand_with_rank_weights_and_clamping():
    # embeddings at 0, 30, 75, 100 degrees with different norms (cosine ignores them)
    z = planar([0, 30, 75, 100], [1.0, 2.0, 0.5, 3.0])
    differences = [[0, 30, 75, 100], [30, 0, 45, 70], [75, 45, 0, 25], [100, 70, 25, 0]]
    # cos: 1 -> 0.9995 on the diagonal, cos 100 < 0 -> 0.0005; ranks = positions in each row sorted descending
    ranks = [[0, 1, 2, 3], [1, 0, 2, 3], [3, 2, 0, 1], [3, 2, 1, 0]]
    expected = expected_loss(differences, ranks, 0.25, lambda s: -math.log(s))
    assert sim_max_loss(z, 0.25).item() == pytest.approx(expected, rel=1e-9)
    # the diagonal (top rank) weighs exp(+0.25); its clamped -log(0.9995) is in the mean
    assert math.exp(0.25) * -math.log(0.9995) / 16 < expected


def test_sim_min_by_hand_with_rank_weights_and_clamping():
    fg = planar([0, 30, 75, 100], [1.0, 2.0, 0.5, 3.0])
    bg = planar([0, 45, 80, 20], [4.0, 1.0, 1.0, 0.2])
    differences = [[0, 45, 80, 20], [30, 15, 50, 10], [75, 30, 5, 55], [100, 55, 20, 80]]
    # (0, 0): cos 1 -> 0.9995, the top rank: weight exp(2.5) x -log(0.0005) dominates; (3, 0): cos 100 -> 0.0005
    ranks = [[0, 2, 3, 1], [2, 1, 3, 0], [3, 1, 0, 2], [3, 1, 0, 2]]
    expected = expected_loss(differences, ranks, 2.5, lambda s: -math.log(1 - s))
    assert sim_min_loss(fg, bg, 2.5).item() == pytest.approx(expected, rel=1e-9)
    assert expected > math.exp(2.5) * -math.log(0.0005) / 16
    # ranked along the rows of the first argument: not symmetric
    assert sim_min_loss(bg, fg, 2.5).item() != pytest.approx(expected, rel=1e-3)


def test_rank_weights_carry_no_gradient_and_clamped_entries_none_either():
    z = planar([0, 30, 75, 100], [1.0, 2.0, 0.5, 3.0]).requires_grad_()
    sim_max_loss(z, 0.25).backward()
    assert z.grad.abs().sum() > 0
    same = torch.ones(3, 4, requires_grad=True)  # identical embeddings: every similarity clamped at 0.9995
    sim_max_loss(same).backward()
    assert same.grad.abs().sum() == 0
