"""Seed k of every method draws the same labeled batches as seed k of supervised-only, and a method built on
supervised-only's single network starts from its weights: the leaderboard's seed-paired test
(report.seed_paired_test) rests on this."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from benchmark.config import resolve_config
from benchmark.finalize import finalize
from benchmark.run import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start_of_run(method: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the first network's initial parameters by name; the first labeled batch's images) as a run builds them
    (benchmark/run.py: prepare, seed, build the method)."""
    config = finalize(resolve_config("synthetic_acdc", method, "smoke", [f"run.seed={seed}", "data.ratio=0.2"], family="acdc"))
    entry, method_cls, datamodule = prepare(config)
    pl.seed_everything(seed, workers=True, verbose=False)
    model = method_cls(entry.spec, config)
    network = next(module for module in model.children() if any(True for _ in module.parameters()))
    weights = {name: p.detach().clone() for name, p in network.named_parameters()}
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    batch = batch[0] if isinstance(batch, (list, tuple)) else batch
    return weights, batch["labeled"]["image"]


def same(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    """The same parameter names with identical values."""
    return weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)


@pytest.mark.parametrize("seed", [0, 1])
def test_seed_k_pairs_the_labeled_batches_and_a_shared_networks_start(seed):
    supervised_weights, supervised_batch = start_of_run("supervised", seed)
    for method in ("mean_teacher", "ua_mt"):  # their student is supervised-only's network
        student_weights, student_batch = start_of_run(method, seed)
        assert same(student_weights, supervised_weights), method
        assert torch.equal(student_batch, supervised_batch), method
    # MC-Net+: supervised-only's encoder and decoder, then two more decoders.
    three_decoders, three_decoder_batch = start_of_run("mc_net_plus", seed)
    assert same({k: three_decoders[k] for k in supervised_weights}, supervised_weights)
    assert len(three_decoders) > len(supervised_weights) and torch.equal(three_decoder_batch, supervised_batch)
    # FBA-Net+: MC-Net+'s network (its contrastive modules are built after it), so the two pair at a seed too.
    fba_plus, fba_plus_batch = start_of_run("fba_net_plus", seed)
    assert same(fba_plus, three_decoders) and torch.equal(fba_plus_batch, supervised_batch)
    _, two_network_batch = start_of_run("cps", seed)
    assert torch.equal(two_network_batch, supervised_batch)
    other_weights, other_batch = start_of_run("supervised", seed + 1)
    assert not same(other_weights, supervised_weights) and not torch.equal(other_batch, supervised_batch)
