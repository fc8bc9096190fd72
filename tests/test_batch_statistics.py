"""Inference with BatchNorm batch statistics (upstream code that never calls .eval()): the same numbers as a copy of
the network with its BatchNorms in training mode run on one sample at a time, with no state changed."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from methods.components.batch_statistics import predict_with_batch_statistics
from tests.method_helpers import upstream_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_network(dims: int) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    torch.manual_seed(0)
    network = nn.Sequential(conv(1, 4, 3, padding=1), norm(4), nn.ReLU(), nn.Dropout(0.5), conv(4, 3, 3, padding=1), norm(3))
    network.train()
    for _ in range(3):  # running statistics away from their initial 0 / 1
        network(torch.randn(4, 1, *[8] * dims) * 2 + 3)
    return network


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("start_in_training_mode", [False, True])
def test_each_sample_is_normalised_with_its_own_statistics_and_nothing_changes(dims, start_in_training_mode):
    network = small_network(dims)
    network.train(start_in_training_mode)  # the BatchNorms' mode is restored afterwards either way
    network[3].eval()  # dropout: the caller's choice, left alone (off, as upstream's networks have none)
    modes = [m.training for m in network.modules()]
    state = copy.deepcopy(network.state_dict())
    images = torch.randn(3, 1, *[8] * dims) * torch.tensor([1.0, 3.0, 0.5]).view(3, *[1] * (dims + 1)) + 2

    with torch.no_grad():
        predicted = predict_with_batch_statistics(network, images)
        expected = upstream_reference(network, images)
    torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-5)
    # batch 1: a sample's prediction does not depend on the others in the batch
    torch.testing.assert_close(predicted[1:2], predict_with_batch_statistics(network, images[1:2]), rtol=0, atol=0)
    # running statistics, num_batches_tracked and every module's mode as they were; no hook left behind
    after = network.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [m.training for m in network.modules()] == modes
    assert not any(m._forward_hooks for m in network.modules())
    # and it is not what eval mode computes (the running statistics differ from each sample's)
    with torch.no_grad():
        assert not torch.allclose(predicted, copy.deepcopy(network).eval()(images), atol=1e-3)


def test_the_hooks_are_removed_when_the_forward_fails():
    network = small_network(2).eval()
    with pytest.raises(RuntimeError):
        predict_with_batch_statistics(network, torch.randn(2, 5, 8, 8))  # wrong channel count
    assert not any(m._forward_hooks for m in network.modules()) and not network.training
