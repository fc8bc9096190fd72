"""Determinism on CPU: the same config and seed give the same metrics and weights; the training data (samples and
their augmentation) do not depend on the number of loader workers or DDP ranks. What differs on a GPU is in
docs/reliability.md."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules.acdc import ACDC_SPEC, ACDCDataModule
from tests.conftest import run_smoke

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def finished(tmp_path: Path) -> tuple[dict, dict]:
    run_dir = next((tmp_path / "runs").rglob("result.json")).parent
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return json.loads((run_dir / "result.json").read_text())["test"], weights


def test_the_same_config_and_seed_twice_give_identical_metrics_and_weights(tmp_path):
    options = ["--dataset", "synthetic_acdc", "--ratio", "0.2", "--seed", "3", "--set", "trainer.deterministic=true",
               "--set", "trainer.max_steps=8", "--set", "model.base_features=8", "--set", "optim.name=adam"]
    for attempt in ("first", "second"):
        assert run_smoke(tmp_path / attempt, *options) == 0
    (metrics, weights), (metrics_again, weights_again) = finished(tmp_path / "first"), finished(tmp_path / "second")
    assert metrics == metrics_again  # every summary value, bit for bit
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)


def batches(root: Path, num_workers: int = 0, rank: int = 0, world_size: int = 1) -> list[dict]:
    datamodule = ACDCDataModule(ACDC_SPEC, root, patch_size=(32, 32), labeled_batch_size=4, unlabeled_batch_size=4,
                                max_steps=3, seed=5, labeled=2, num_workers=num_workers)
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, global_step=0)
    loaded = list(iter(datamodule.train_dataloader()))
    return [batch[0] if isinstance(batch, tuple) else batch for batch in loaded]


def test_training_batches_do_not_depend_on_loader_workers_or_ranks(acdc_root):
    one_process = batches(acdc_root)
    with_workers = batches(acdc_root, num_workers=2)
    two_ranks = [batches(acdc_root, rank=rank, world_size=2) for rank in (0, 1)]
    for step, reference in enumerate(one_process):
        for stream, samples in reference.items():
            for key, tensor in samples.items():
                assert torch.equal(tensor, with_workers[step][stream][key]), (step, stream, key)
                halves = torch.cat([two_ranks[0][step][stream][key], two_ranks[1][step][stream][key]])
                assert torch.equal(tensor, halves), (step, stream, key)
