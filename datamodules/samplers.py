"""Step-indexed samplers for the labeled and unlabeled training streams.

Why not Lightning's defaults: under DDP Lightning replaces a RandomSampler by a DistributedSampler that pads
small labeled sets with duplicates, re-iterates a short loader without `set_epoch` (every rank replays the same
order), and ties the epoch length to the world size (docs/design.md#samplers). Here the training budget is a number of
optimizer steps, and the sample drawn at (step, position in the global batch) is a pure function of the seed:

    global stream = concat(permutation_0, permutation_1, ...) of the dataset indices,
    global batch s = stream[s * B_global : (s + 1) * B_global],
    rank r takes the slice [r * B_local : (r + 1) * B_local] of it.

So N ranks see exactly the batches one device would see with the same global batch, every sample is used once
per pass before any repeats, and resuming at step k continues the very same stream (no replay, no skip).

Each drawn sample also has a draw number, its position in the global stream (``draws()``); the DataModule seeds
the sample's augmentation with it, so augmentations share these guarantees. ``PositionedEpoch`` is what the
DataLoader gets: the whole budget as one epoch, started at the sampler's step.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class StepSampler(Sampler[int]):
    """Yields the dataset indices of this rank's share of global batches ``start_step .. total_steps - 1``."""

    def __init__(
        self,
        dataset_size: int,
        batch_size_per_rank: int,
        total_steps: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        if dataset_size <= 0:
            raise ValueError("StepSampler needs a non-empty dataset")
        self.dataset_size = dataset_size
        self.batch_size = batch_size_per_rank
        self.total_steps = total_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, pass_index: int) -> torch.Tensor:
        if pass_index not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
            # A global batch can straddle two passes; keep the two most recent permutations only.
            recent = max(self._permutations, default=None)
            kept = {recent: self._permutations[recent]} if recent is not None else {}
            self._permutations = {**kept, pass_index: torch.randperm(self.dataset_size, generator=generator)}
        return self._permutations[pass_index]

    def index_at(self, step: int, position: int) -> int:
        """Dataset index at ``position`` of this rank's part of global batch ``step``."""
        pass_index, offset = divmod(self.draw_number(step, position), self.dataset_size)
        return int(self._permutation(pass_index)[offset])

    @property
    def samples_per_step(self) -> int:
        return self.batch_size

    def draw_number(self, step: int, position: int) -> int:
        """The sample's position in the global stream: the same on one device and on any number of ranks."""
        return (step * self.world_size + self.rank) * self.batch_size + position

    def draws(self) -> Iterator[tuple[int, int]]:
        """(dataset index, draw number) of this rank's share of global batches ``start_step .. total_steps - 1``."""
        for step in range(self.start_step, self.total_steps):
            for position in range(self.batch_size):
                yield self.index_at(step, position), self.draw_number(step, position)

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.draws())

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.batch_size


class PartitionedStepSampler(Sampler[int]):
    """Each batch is the concatenation of equal shares drawn from consecutive index ranges (partitions).

    For methods whose networks each own a disjoint part of the labeled set (MMS: the first half of the labeled
    units trains network 1, the second half network 2): position ``[p * B/P, (p + 1) * B/P)`` of every per-rank
    batch comes from partition ``p``, each partition running its own :class:`StepSampler` (same guarantees:
    deterministic, every item once per pass of its partition, DDP-consistent, resumable).
    """

    def __init__(self, partition_sizes: list[int], batch_size_per_rank: int, total_steps: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_step: int = 0):
        parts = len(partition_sizes)
        if batch_size_per_rank % parts:
            raise ValueError(f"batch {batch_size_per_rank} is not divisible into {parts} partitions")
        share = batch_size_per_rank // parts
        self.offsets = [sum(partition_sizes[:p]) for p in range(parts)]
        self.samplers = [
            StepSampler(size, share, total_steps, seed + 104_729 * p, rank, world_size, start_step)
            for p, size in enumerate(partition_sizes)
        ]
        self.share, self.total_steps, self.start_step = share, total_steps, start_step

    @property
    def samples_per_step(self) -> int:
        return self.share * len(self.samplers)

    def draws(self) -> Iterator[tuple[int, int]]:
        """(dataset index, draw number); partition p's draws are its own stream's numbers interleaved (n P + p)."""
        parts = len(self.samplers)
        for step in range(self.start_step, self.total_steps):
            for part, (offset, sampler) in enumerate(zip(self.offsets, self.samplers)):
                for position in range(self.share):
                    yield offset + sampler.index_at(step, position), sampler.draw_number(step, position) * parts + part

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.draws())

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.share * len(self.samplers)


class PositionedEpoch(Sampler[tuple[int, int]]):
    """The whole training budget as one epoch, positioned at the step sampler's ``start_step``.

    Yields the remaining ``(dataset index, draw number)`` pairs, but its length is that of the whole epoch:
    Lightning restores a resumed run's batch counters to the checkpoint's step and ends the epoch when they
    reach the loader's length, so that length must count the batches before the resume too (with the remaining
    count it would end the epoch early and start another one over the same steps)."""

    def __init__(self, sampler: StepSampler | PartitionedStepSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.sampler.draws()

    def __len__(self) -> int:
        return self.sampler.total_steps * self.sampler.samples_per_step
