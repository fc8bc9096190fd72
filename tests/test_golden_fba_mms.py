"""FBA-Net, FBA-Net+ and MMS against numbers produced by the official code (tests/golden/*.json).

Each fixture records the upstream repository, commit, files and functions that produced it, and how its inputs and
weights were made: the suite's own model built with a seed (``build_method``), its state_dict loaded into the
upstream network under a key mapping, seeded inputs, and one or two training steps of the upstream script's
arithmetic run around upstream's importable losses, modules and ramps. Here the same model, inputs and dropout
seeds go through the suite's ``training_step`` and its optimizer; every recorded number must agree up to the order
of float32 summation. The fixtures hold numbers only, no upstream code.
"""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.method_helpers import build_method, random_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOLDEN = Path(__file__).parent / "golden"
# Room for float32 arithmetic in another order only (upstream copies the consistency targets into a zero tensor,
# groups sums differently, ...); measured: at most 3e-7 relative for every loss and gradient norm.
LOSS_TOLERANCE = dict(rel=2e-5, abs=1e-6)
GRADIENT_TOLERANCE = dict(rel=2e-4, abs=1e-6)


def load(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def group_of(fixture: dict, name: str) -> str:
    for group in fixture["weight_checksums"]:
        if name == group or name.startswith(group + "."):
            return group
    raise KeyError(f"parameter {name} is in no group of the fixture")


def grouped_norms(fixture: dict, tensors) -> dict[str, float]:
    """Euclidean norm per parameter group of the fixture over (name, tensor) pairs (None tensors skipped)."""
    squares: dict[str, float] = {}
    for name, tensor in tensors:
        if tensor is None:
            continue
        group = group_of(fixture, name)
        squares[group] = squares.get(group, 0.0) + float(tensor.detach().double().pow(2).sum())
    return {group: value**0.5 for group, value in squares.items()}


def build_from(fixture: dict, extra_overrides=()):
    suite = fixture["suite"]
    model = build_method(fixture["method"], suite["dataset"], [*suite["overrides"], *extra_overrides],
                         profile=suite["profile"], patch=suite["patch"], seed=suite["seed"])
    checksums: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        group = group_of(fixture, name)
        weights = parameter.detach().double()
        checksums[f"{group} abs_sum"] = checksums.get(f"{group} abs_sum", 0.0) + float(weights.abs().sum())
        checksums[f"{group} sum"] = checksums.get(f"{group} sum", 0.0) + float(weights.sum())
    recorded = {f"{group} {key}": value
                for group, sums in fixture["weight_checksums"].items() for key, value in sums.items()}
    # Not the arithmetic under test: if this fails, the suite's initialisation changed (order or scheme), and the
    # fixture must be regenerated from upstream with the new weights.
    assert checksums == pytest.approx(recorded, rel=1e-9), "the seeded initialisation differs from the fixture's"
    return model


def run_steps(fixture: dict, model, make_batch, before_forward=lambda index: None):
    """The suite's training_step and optimizer on the fixture's steps; compares every recorded number."""
    optimizer = model.configure_optimizers()["optimizer"]
    logged: dict[str, float] = {}
    model.log_dict = lambda values, **kwargs: logged.update(
        {k.removeprefix("train/"): float(torch.as_tensor(v).detach()) for k, v in values.items()}
    )
    model.train()
    for index, expected in enumerate(fixture["steps"]):
        batch = make_batch(index)
        logged.clear()
        with mock.patch.object(type(model), "global_step", new_callable=mock.PropertyMock, return_value=index):
            before_forward(index)
            optimizer.zero_grad()
            loss = model.training_step(batch, index)
            loss.backward()
        assert float(loss.detach()) == pytest.approx(expected["loss"], **LOSS_TOLERANCE), f"step {index}: total loss"
        assert set(expected["terms"]) <= set(logged), f"step {index}: terms the suite does not log"
        for term, value in expected["terms"].items():
            assert logged[term] == pytest.approx(value, **LOSS_TOLERANCE), f"step {index}: {term}"
        named = list(model.named_parameters())
        if "grad_norms" in expected:
            gradients = grouped_norms(fixture, ((name, p.grad) for name, p in named))
            assert set(gradients) == set(expected["grad_norms"]), f"step {index}: groups that receive gradients"
            for group, value in expected["grad_norms"].items():
                assert gradients[group] == pytest.approx(value, **GRADIENT_TOLERANCE), f"step {index}: grad {group}"
        before = {name: p.detach().clone() for name, p in named}
        optimizer.step()
        if "update_norms" in expected:
            updates = grouped_norms(fixture, ((name, p.detach() - before[name]) for name, p in named))
            for group, value in expected["update_norms"].items():
                assert updates.get(group, 0.0) == pytest.approx(value, **GRADIENT_TOLERANCE), f"step {index}: {group}"


def check_optimizer(fixture: dict, model) -> None:
    optimizer = model.configure_optimizers()["optimizer"]
    expected = fixture["optimizer"]
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__.lower() == expected["name"]
    for key in ("lr", "weight_decay", "momentum", "nesterov", "betas"):
        if key in expected:
            value = group[key]
            assert (list(value) if isinstance(value, tuple) else value) == pytest.approx(expected[key]), key


def schedule_values(model, steps, weight_of):
    optimizer_config = model.configure_optimizers()
    factor = optimizer_config["lr_scheduler"]["scheduler"].lr_lambdas[0]
    base = model.config["optim"]["lr"]
    lrs, weights = [], []
    for step in steps:
        lrs.append(base * factor(step))
        with mock.patch.object(type(model), "global_step", new_callable=mock.PropertyMock, return_value=step):
            weights.append(weight_of(model))
    return lrs, weights


# ---------------------------------------------------------------------------------------------------------------
# FBA-Net+ and FBA-Net (cys1102/FBA-Net: 3-D train_3d.py @ 796398a and train_fba.py @ 6a10956, 2-D train_2d.py @
# 796398a; upstream has no 2-D single-decoder script)


def fba_batches(fixture: dict, model):
    def make(index: int):
        return random_batch(model, 2, 2, generator=torch.Generator().manual_seed(fixture["batch_seeds"][index]))
    return make


def seed_dropout(fixture: dict):
    return lambda index: torch.manual_seed(fixture["dropout_seeds"][index])


FBA_FIXTURES = ["fba_net_plus_3d.json", "fba_net_3d.json", "fba_net_plus_2d.json"]


@pytest.mark.parametrize("fixture_name", FBA_FIXTURES)
def test_fba_net_training_steps_match_upstream(fixture_name):
    fixture = load(fixture_name)
    model = build_from(fixture)
    check_optimizer(fixture, model)
    run_steps(fixture, model, fba_batches(fixture, model), seed_dropout(fixture))


@pytest.mark.parametrize("fixture_name", FBA_FIXTURES)
def test_fba_net_paper_schedule_matches_upstream(fixture_name):
    fixture = load(fixture_name)
    model = build_from(fixture)
    schedule = fixture["schedule"]
    has_consistency = "consistency_weight" in schedule
    lrs, weights = schedule_values(model, schedule["steps"],
                                   lambda m: m.consistency_weight() if has_consistency else None)
    assert lrs == pytest.approx(schedule["lr"], rel=1e-12)
    if has_consistency:
        assert weights == pytest.approx(schedule["consistency_weight"], rel=1e-12)
    assert model.hp["supervised_weight"] == schedule["supervised_weight"]
    assert model.hp["contrastive_weight"] == schedule["contrastive_weight"]


# ---------------------------------------------------------------------------------------------------------------
# MMS, 2-D (AngeLouCN/Min_Max_Similarity train_mms.py @ 07571ea)


def mms_batches(fixture: dict):
    labeled = fixture["suite"]["patch"]
    unlabeled = fixture["unlabeled_size"]

    def make(index: int):
        generator = torch.Generator().manual_seed(fixture["batch_seeds"][index])
        labels = torch.randint(0, 2, (2, *labeled), generator=generator)
        images = torch.randn(2, 3, *labeled, generator=generator)
        view = torch.randn(1, 3, *unlabeled, generator=generator)
        return {"labeled": {"image": images, "label": labels}, "unlabeled": {"image": view}}
    return make


def test_mms_training_steps_match_upstream():
    fixture = load("mms_2d.json")
    model = build_from(fixture)
    check_optimizer(fixture, model)
    run_steps(fixture, model, mms_batches(fixture))


def test_mms_paper_schedule_and_weights_match_upstream():
    fixture = load("mms_2d.json")
    model = build_from(fixture)
    schedule = fixture["schedule"]
    lrs, _ = schedule_values(model, schedule["steps"], lambda m: None)
    assert lrs == pytest.approx(schedule["lr"], rel=1e-12)
    epochs, max_steps = model.config["optim"]["poly_epochs"], model.config["trainer"]["max_steps"]
    assert (epochs + 1, max_steps // epochs) == (schedule["epochs"], schedule["epoch_steps"])
    for key, value in schedule["loss_weights"].items():
        assert model.hp[key] == value, key


def test_poly_epoch_schedule_refuses_an_epoch_count_that_does_not_divide_the_budget():
    from core.errors import UserError

    with pytest.raises(UserError, match="poly_epochs"):
        build_method("mms", "synthetic_kvasir", ["optim.poly_epochs=7"], profile="paper", patch=(32, 32))
    with pytest.raises(UserError, match="poly_epochs"):
        build_method("supervised", "synthetic_kvasir", ["optim.schedule=poly_epoch"], profile="paper", patch=(32, 32))
