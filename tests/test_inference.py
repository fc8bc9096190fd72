"""Sliding-window inference equals the published per-window loop; slice-wise prediction keeps the case shape."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmark.inference import count_windows, predict_slicewise, sliding_window_probabilities, window_starts


def reference_test_single_case(net, image, stride_xy, stride_z, patch_size, num_classes):
    """UA-MT's test_single_case (code/test_util.py), transcribed with numpy as published: one window at a time."""
    w, h, d = image.shape
    pads = [max(p - s, 0) for p, s in zip(patch_size, image.shape)]
    add_pad = any(pads)
    lefts = [p // 2 for p in pads]
    if add_pad:
        image = np.pad(image, [(l, p - l) for l, p in zip(lefts, pads)], mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape, dtype=np.float32)
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(sz):
                zs = min(stride_z * z, dd - patch_size[2])
                patch = image[xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]]
                with torch.no_grad():
                    y1 = net(torch.from_numpy(patch[None, None].astype(np.float32)))
                y_soft = torch.softmax(y1, dim=1)[0].numpy()
                score_map[:, xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]] += y_soft
                cnt[xs : xs + patch_size[0], ys : ys + patch_size[1], zs : zs + patch_size[2]] += 1
    score_map = score_map / cnt[None]
    if add_pad:
        score_map = score_map[:, lefts[0] : lefts[0] + w, lefts[1] : lefts[1] + h, lefts[2] : lefts[2] + d]
    return score_map


@pytest.fixture
def toy_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 3, 3, padding=1))
    return net.eval()


@pytest.mark.parametrize("shape", [(30, 27, 21), (14, 30, 9)])  # the second needs padding on two axes
def test_sliding_window_equals_the_published_loop(toy_net, shape):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    expected = reference_test_single_case(toy_net, image, 5, 3, (16, 16, 12), 3)
    got = sliding_window_probabilities(toy_net, image, (16, 16, 12), (5, 5, 3), 3, window_batch=4)
    assert got.shape == (3, *shape)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_window_counting_matches_the_la_protocol():
    # A typical LA test volume, 112x112x80 patch, stride 18/18/4: ceil((dim - patch) / stride) + 1 per axis.
    assert window_starts(200, 112, 18) == [0, 18, 36, 54, 72, 88]
    assert count_windows((200, 150, 88), (112, 112, 80), (18, 18, 4)) == 6 * 4 * 3
    assert count_windows((100, 100, 60), (112, 112, 80), (18, 18, 4)) == 1  # padded up to the patch


def test_slicewise_prediction_keeps_the_case_shape():
    class ArgmaxOfIntensity(torch.nn.Module):
        def forward(self, x):  # class 1 where the slice is bright
            return torch.cat([0.5 - x, x - 0.5], dim=1)

    volume = np.zeros((3, 37, 29), dtype=np.float32)
    volume[:, 10:20, 5:15] = 1.0
    prediction = predict_slicewise(ArgmaxOfIntensity(), volume, (32, 32))
    assert prediction.shape == volume.shape
    assert abs(int(prediction.sum()) - 3 * 100) <= 3 * 25  # nearest-neighbour round trip is close to exact
