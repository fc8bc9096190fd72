"""A FIFO memory bank of keys (MoCo / ISD / ACTION queues), kept as buffers.

The keys and the write pointer are registered buffers, so the bank is saved in checkpoints, restored with them,
moved with the module and carried from one training stage to the next. Under DDP every rank enqueues the keys of
the whole global batch, gathered across ranks first (as MoCo does), so all ranks hold the same bank; the bank's
size must then be a multiple of the global number of keys per step, so that a batch never wraps around the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.distributed import gather_across_ranks
from core.errors import UserError


class MemoryQueue(nn.Module):
    """``size`` keys of shape ``entry_shape``, initialised as L2-normalised (over the last axis) Gaussian noise.

    ``enqueue(keys)`` overwrites the oldest entries with ``keys`` (gathered across ranks) and advances the pointer.
    ``name`` and ``size_key`` only make the error message point at the config key to change.
    """

    def __init__(self, size: int, entry_shape: tuple[int, ...], name: str = "memory queue", size_key: str = ""):
        super().__init__()
        if size < 1:
            raise UserError(f"{name} needs at least one entry, got size {size}", fix=f"set {size_key or 'its size'} >= 1")
        self.name, self.size_key = name, size_key
        self.register_buffer("keys", F.normalize(torch.randn(size, *entry_shape), dim=-1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = gather_across_ranks(keys.detach())
        count = keys.shape[0]
        if self.size % count:
            raise UserError(
                f"{self.name} of {self.size} entries cannot take {count} keys per step (the global batch): "
                "a batch would wrap around its end",
                fix=f"set {self.size_key or 'its size'} to a multiple of {count}",
            )
        if tuple(keys.shape[1:]) != tuple(self.keys.shape[1:]):
            raise ValueError(f"{self.name} holds keys of shape {tuple(self.keys.shape[1:])}, got {tuple(keys.shape[1:])}")
        start = int(self.pointer)
        self.keys[start:start + count] = keys.to(self.keys.dtype)
        self.pointer.fill_((start + count) % self.size)
