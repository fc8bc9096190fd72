"""A term switched off by its weight (an ablation flag) leaves its heads out of training without changing anything
else: the network trains bit for bit as it would with the heads in the optimizer (where coupled weight decay alone
would shrink them into denormal floats and slow every step)."""
from __future__ import annotations

import pytest
import torch

from tests.method_helpers import build_method, random_batch

# (method, stage, the flag at 0, the heads only that term uses)
ABLATIONS = [
    ("action", "finetune", "method.reco_weight=0", ["representation_head"]),
    ("fba_net", None, "method.contrastive_weight=0", ["contrastive_modules"]),
    ("fba_net_plus", None, "method.contrastive_weight=0", ["contrastive_modules"]),
    ("mcl_cs", None, "method.contrastive_weight=0", ["pixel_heads", "patch_heads"]),
    ("mms", None, "method.unlabeled_contrast_weight=0", ["projector1", "projector2"]),
    ("mms", None, "method.labeled_contrast_weight=0", ["classifier1", "classifier2"]),
]


def head_parameters(model, heads: list[str]) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.split(".")[0] in heads}


def optimizer_parameter_ids(model) -> set[int]:
    optimizer = model.configure_optimizers()["optimizer"]
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("name, stage, flag, heads", ABLATIONS)
def test_heads_of_a_zero_weight_term_are_left_out_of_the_optimizer(name, stage, flag, heads):
    ablated = build_method(name, stage=stage, overrides=[flag])
    idle = head_parameters(ablated, heads)
    assert idle, f"{name} has no parameters under {heads}"
    assert not any(p.requires_grad for p in idle.values())
    assert not {id(p) for p in idle.values()} & optimizer_parameter_ids(ablated)

    default = build_method(name, stage=stage)
    trained = head_parameters(default, heads)
    assert all(p.requires_grad for p in trained.values())
    assert {id(p) for p in trained.values()} <= optimizer_parameter_ids(default)


def train(model, steps: int) -> dict[str, torch.Tensor]:
    optimizer = model.configure_optimizers()["optimizer"]
    model.train()
    torch.manual_seed(1)  # the same dropout masks, augmentations and samples in both runs
    for step in range(steps):
        batch = random_batch(model, generator=torch.Generator().manual_seed(step))
        loss = model.compute_losses(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("name, stage, flag, heads", ABLATIONS)
def test_leaving_the_heads_out_trains_the_network_identically(name, stage, flag, heads):
    ablated = build_method(name, stage=stage, overrides=[flag])
    initial = {name: p.detach().clone() for name, p in head_parameters(ablated, heads).items()}
    after = train(ablated, steps=2)

    # the same ablation with the heads trained as before: in the optimizer, with their zero gradients
    reference = build_method(name, stage=stage, overrides=[flag])
    for module in reference.zero_weight_term_modules():
        module.requires_grad_(True)
    expected = train(reference, steps=2)

    for key, value in expected.items():
        if key.split(".")[0] in heads:
            continue
        assert torch.equal(after[key], value), key
    for key, value in initial.items():  # the heads stay as initialised (weight decay no longer reaches them)
        assert torch.equal(after[key], value), key
    moved = [key for key in initial if not torch.equal(expected[key], initial[key])]
    assert moved, "weight decay should move the heads when they are in the optimizer (else this test shows nothing)"
