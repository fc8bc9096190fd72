"""Sliding-window inference equals the published per-window loop; slice-wise prediction keeps the case shape."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.perf.sliding_window import published_per_window_loop, vnet
from core.inference import count_windows, predict_slicewise, sliding_window_probabilities, window_starts


@pytest.fixture
def toy_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 3, 3, padding=1))
    return net.eval()


@pytest.mark.parametrize("shape", [(30, 27, 21), (14, 30, 9)])  # the second needs padding on two axes
def test_sliding_window_equals_the_published_loop(toy_net, shape):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    expected = published_per_window_loop(toy_net, image, 5, 3, (16, 16, 12), 3)
    got = sliding_window_probabilities(toy_net, image, (16, 16, 12), (5, 5, 3), 3, window_batch=4)
    assert got.shape == (3, *shape)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("window_batch", [1, 3, 8])
def test_batched_windows_of_a_suite_vnet_equal_the_published_loop(one_torch_thread, window_batch):
    """The real V-Net (batch norm in eval mode, dropout off): batching windows changes nothing but the speed."""
    net = vnet(width=2)
    image = np.random.default_rng(1).normal(size=(40, 37, 20)).astype(np.float32)
    expected = published_per_window_loop(net, image, 6, 4, (32, 32, 16), 2)
    got = sliding_window_probabilities(net, image, (32, 32, 16), (6, 6, 4), 2, window_batch=window_batch)
    assert count_windows(image.shape, (32, 32, 16), (6, 6, 4)) == 3 * 2 * 2
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert (got.numpy().argmax(0) == expected.argmax(0)).all()


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
