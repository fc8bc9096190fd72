"""The step-indexed samplers: DDP ranks partition one global stream; resuming continues it exactly."""
from __future__ import annotations

from collections import Counter

from datamodules.samplers import StepSampler


def test_two_ranks_see_exactly_the_global_batches_of_one_device():
    single = list(StepSampler(10, 4, total_steps=7, seed=3))
    rank0 = list(StepSampler(10, 2, total_steps=7, seed=3, rank=0, world_size=2))
    rank1 = list(StepSampler(10, 2, total_steps=7, seed=3, rank=1, world_size=2))
    for step in range(7):
        assert single[4 * step : 4 * step + 4] == rank0[2 * step : 2 * step + 2] + rank1[2 * step : 2 * step + 2]


def test_every_pass_is_a_permutation_without_padding_duplicates():
    indices = list(StepSampler(5, 5, total_steps=3, seed=0))
    for p in range(3):
        assert sorted(indices[5 * p : 5 * p + 5]) == list(range(5))
    assert Counter(indices) == {i: 3 for i in range(5)}


def test_resume_continues_the_same_stream():
    full = list(StepSampler(7, 3, total_steps=10, seed=1))
    resumed = list(StepSampler(7, 3, total_steps=10, seed=1, start_step=4))
    assert resumed == full[12:] and len(StepSampler(7, 3, 10, 1, start_step=4)) == 18


def test_seeds_differ():
    assert list(StepSampler(20, 4, 5, seed=0)) != list(StepSampler(20, 4, 5, seed=1))
