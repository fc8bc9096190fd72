"""Inference with BatchNorm in training mode, as upstream code that never calls ``model.eval()`` does.

A network left in training mode normalises every batch with that batch's own mean and variance; the running
statistics are updated but never read. At upstream's test batch size of one image (or one sliding-window patch),
each input is normalised with its own statistics. :func:`predict_with_batch_statistics` reproduces that result
without the side effects: each sample runs alone, every BatchNorm normalises with the sample's statistics, the
running statistics and ``num_batches_tracked`` are left as they are, and every other layer (dropout) stays in the
mode the caller set (upstream's networks that test this way have no dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _normalise_with_batch_statistics(module: nn.modules.batchnorm._BatchNorm, inputs, output) -> torch.Tensor:
    # Replaces the module's (eval-mode) output; a forward hook leaves the module's state and mode untouched, and a
    # SyncBatchNorm in eval mode does not communicate, so ranks evaluating different cases cannot block each other.
    return F.batch_norm(inputs[0], None, None, module.weight, module.bias, training=True, momentum=0.0, eps=module.eps)


def predict_with_batch_statistics(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``network(images)`` one sample at a time, every BatchNorm normalising with that sample's own statistics."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.eval()  # the module's own forward (whose output the hook replaces) then reads, never writes, its buffers
    handles = [m.register_forward_hook(_normalise_with_batch_statistics) for m in norms]
    try:
        return torch.cat([network(images[i:i + 1]) for i in range(images.shape[0])])
    finally:
        for handle in handles:
            handle.remove()
        for m, training in zip(norms, modes):
            m.train(training)
