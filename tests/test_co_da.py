"""Co-DA: alignment and both over-expectation filters through the method, running statistics (updates, checkpoint
round trip, two DDP ranks), gradient routing, presets, inference choice and an end-to-end CLI run. The pieces by
hand: tests/test_pseudo_labels.py (alignment, filters) and tests/test_losses_masked_cross_entropy.py (the CE)."""
from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from benchmark.cli import main
from benchmark.config import resolve_config
from benchmark.run import load_weights
from core.errors import UserError
from methods.components.class_statistics import RunningClassMean, batch_dice_per_class
from methods.registry import get_method
from tests.conftest import run_two_rank_script
from tests.method_helpers import build_method, has_grad, no_grad, random_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def as_logits(probabilities: list[list[float]], spatial=(1,)) -> torch.Tensor:
    """(pixels, classes) probabilities -> logits (1, C, pixels, *spatial) whose softmax gives them back."""
    p = torch.tensor(probabilities, dtype=torch.float64).T  # (C, pixels)
    return torch.log(p).reshape(1, p.shape[0], p.shape[1], *spatial).float()


# ---------------------------------------------------------------------------------------------------------------
# Alignment


def test_method_aligns_with_the_labeled_over_the_unlabeled_marginal_of_the_batch():
    model = build_method("co_da", dataset="synthetic_la", overrides=["method.over_expectation=none"])
    statistics = model.statistics[0]
    statistics.labeled_marginal.value.copy_(torch.tensor([0.5, 0.5]))
    logits = as_logits([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]], spatial=(1, 1))
    labels, keep = model.pseudo_labels(logits, statistics)
    # the first update of pi_U is the batch mean itself (0.75, 0.25), used in the same step
    assert statistics.unlabeled_marginal.value.tolist() == pytest.approx([0.75, 0.25])
    assert labels.flatten().tolist() == [1, 1, 0, 0] and keep.all()
    model.hp = dataclasses.replace(model.hp, align_distribution=False)  # the ablation: raw argmax
    labels, _ = model.pseudo_labels(logits, statistics)
    assert labels.flatten().tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# Over-expectation filters


def test_expected_confidence_through_the_method_uses_the_running_class_means():
    model = build_method("co_da", overrides=["method.align_distribution=false"])  # 4 classes
    statistics = model.statistics[1]
    pixels = [[0.9, 0.05, 0.03, 0.02], [0.6, 0.2, 0.1, 0.1],     # class 0, confidences 0.9 and 0.6: mean 0.75
              [0.2, 0.7, 0.05, 0.05], [0.3, 0.5, 0.1, 0.1],      # class 1, 0.7 and 0.5: mean 0.6
              [0.1, 0.05, 0.8, 0.05], [0.3, 0.1, 0.55, 0.05],    # class 2, 0.8 and 0.55: mean 0.675
              [0.1, 0.1, 0.1, 0.7]]                              # class 3, alone: equal to its mean
    labels, keep = model.pseudo_labels(as_logits(pixels), statistics)
    assert labels.flatten().tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert statistics.expectation.value.tolist() == pytest.approx([0.75, 0.6, 0.675, 0.7], rel=1e-5)
    assert keep.flatten().tolist() == [True, False, True, False, True, False, True]
    # second batch: momentum 0.99 but a true average while n < 100 -> E = (first + second) / 2 per class
    again = [[0.5, 0.2, 0.2, 0.1]]  # class 0 with confidence 0.5 -> E_0 = (0.75 + 0.5) / 2 = 0.625: dropped
    labels, keep = model.pseudo_labels(as_logits(again), statistics)
    assert statistics.expectation.value.tolist() == pytest.approx([0.625, 0.6, 0.675, 0.7], rel=1e-5)
    assert statistics.expectation.updates.tolist() == [2, 1, 1, 1]
    assert keep.flatten().tolist() == [False]


def test_class_quota_through_the_method_uses_the_labeled_marginal():
    model = build_method("co_da", overrides=["method.align_distribution=false", "method.over_expectation=class_quota"])
    statistics = model.statistics[0]
    statistics.labeled_marginal.value.copy_(torch.tensor([0.5, 0.25, 0.25, 0.0]))
    # N = 4 pixels: quotas 2, 1, 1, 0
    pixels = [[0.9, 0.05, 0.03, 0.02], [0.6, 0.2, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1],  # class 0: 3 pixels, 0.6 goes
              [0.2, 0.7, 0.05, 0.05]]                                            # class 1: its one pixel stays
    labels, keep = model.pseudo_labels(as_logits(pixels), statistics)
    assert labels.flatten().tolist() == [0, 0, 0, 1]
    assert keep.flatten().tolist() == [True, False, True, True]


# ---------------------------------------------------------------------------------------------------------------
# Running statistics


def test_running_class_mean_true_average_then_ema_and_absent_classes_keep_their_value():
    stat = RunningClassMean(3, momentum=0.5)
    assert stat.value.tolist() == pytest.approx([1 / 3] * 3)
    stat.update(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([4.0, 0.0, 3.0]))  # means 0.5, -, 1.0
    assert stat.value.tolist() == pytest.approx([0.5, 1 / 3, 1.0]) and stat.updates.tolist() == [1, 0, 1]
    stat.update(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 1.0]))  # means 1.0, 0.25, 0.0
    # alpha = min(1 - 1/2, 0.5) = 0.5 for classes 0 and 2; class 1's first update copies
    assert stat.value.tolist() == pytest.approx([0.75, 0.25, 0.5])
    stat.update(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    # alpha = min(2/3, 0.5) = 0.5 for classes 0, 2; min(1/2, 0.5) for class 1
    assert stat.value.tolist() == pytest.approx([0.375, 0.125, 0.25])
    marginal = RunningClassMean(2, momentum=0.9)
    probabilities = torch.tensor([[0.8, 0.6], [0.2, 0.4]]).view(1, 2, 2)  # (N, C, pixels)
    assert marginal.update_marginal(probabilities).tolist() == pytest.approx([0.7, 0.3])


def test_batch_dice_per_class_by_hand():
    predictions = torch.tensor([[0, 1, 1, 2]])
    labels = torch.tensor([[0, 1, 2, 2]])
    # class 0: 2*1/(1+1); class 1: 2*1/(2+1); class 2: 2*1/(1+2); class 3 absent from both: 1
    assert batch_dice_per_class(predictions, labels, 4).tolist() == pytest.approx([1.0, 2 / 3, 2 / 3, 1.0])


def test_ground_truth_labeled_marginal_is_the_label_frequency():
    model = build_method("co_da", overrides=["method.labeled_marginal=ground_truth"], patch=(16, 16))
    batch = random_batch(model, n_unlabeled=0)
    model.compute_losses(batch)
    frequency = torch.bincount(batch["labeled"]["label"].flatten(), minlength=4).float() / batch["labeled"]["label"].numel()
    for statistics in model.statistics:
        assert torch.allclose(statistics.labeled_marginal.value, frequency)


def test_statistics_are_buffers_that_survive_a_state_dict_round_trip():
    model = build_method("co_da", patch=(32, 32))
    model.train()
    for _ in range(2):
        model.compute_losses(random_batch(model))
    state = model.state_dict()
    names = [f"statistics.{m}.{s}.{b}" for m in (0, 1) for s in ("labeled_marginal", "unlabeled_marginal", "expectation")
             for b in ("value", "updates")]
    assert all(name in state for name in names)
    assert state["statistics.0.unlabeled_marginal.updates"].tolist() == [2, 2, 2, 2]
    fresh = build_method("co_da", patch=(32, 32))
    assert not torch.equal(fresh.statistics[0].unlabeled_marginal.value, model.statistics[0].unlabeled_marginal.value)
    fresh.load_state_dict(state)
    for name in names:
        assert torch.equal(fresh.state_dict()[name], state[name])
    assert not any(p.requires_grad for p in model.statistics.buffers())


# ---------------------------------------------------------------------------------------------------------------
# Gradient routing, options, presets


@pytest.mark.parametrize("over_expectation", ["expected_confidence", "class_quota"])
def test_each_model_learns_from_the_other_and_the_total_reaches_both(over_expectation):
    model = build_method("co_da", overrides=[f"method.over_expectation={over_expectation}"], patch=(32, 32))
    model.train()
    losses = model.compute_losses(random_batch(model))
    assert losses["oce1"].item() > 0 and losses["oce2"].item() > 0
    assert 0 < losses["kept_fraction_model1"].item() < 1 and 0 < losses["kept_fraction_model2"].item() < 1
    for term, reached, untouched in (("oce1", model.net1, model.net2), ("oce2", model.net2, model.net1),
                                     ("supervised1", model.net1, model.net2), ("supervised2", model.net2, model.net1)):
        model.zero_grad(set_to_none=True)
        losses[term].backward(retain_graph=True)
        assert has_grad(reached) and no_grad(untouched), term
    model.zero_grad(set_to_none=True)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_logged_monitors_name_every_class():
    model = build_method("co_da", patch=(16, 16))
    losses = model.compute_losses(random_batch(model))
    for model_index in (1, 2):
        for name in ("RV", "Myo", "LV"):
            assert f"dice_model{model_index}_{name}" in losses
        for name in ("background", "RV", "Myo", "LV"):
            for kind in ("pi_labeled", "pi_unlabeled", "expectation"):
                assert f"{kind}_model{model_index}_{name}" in losses
    marginal = torch.stack([losses[f"pi_unlabeled_model1_{n}"] for n in ("background", "RV", "Myo", "LV")])
    assert marginal.sum().item() == pytest.approx(1.0, rel=1e-5)


def test_full_supervision_trains_both_models_without_pseudo_terms():
    model = build_method("co_da", patch=(16, 16))
    losses = model.compute_losses(random_batch(model, n_unlabeled=0))
    assert losses["oce1"].item() == 0 and losses["oce2"].item() == 0 and "kept_fraction_model1" not in losses
    assert model.statistics[0].unlabeled_marginal.updates.sum().item() == 0
    assert model.statistics[0].labeled_marginal.updates.tolist() == [1, 1, 1, 1]


def test_predict_with_model1_model2_or_average():
    model = build_method("co_da", patch=(32, 32))
    assert model.hp["predict_with"] == "average"
    model.eval()
    images = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        mean = (torch.softmax(model.net1(images), 1) + torch.softmax(model.net2(images), 1)) / 2
        assert torch.allclose(torch.softmax(model.predict_logits(images), 1), mean, atol=1e-6)
        model.hp = dataclasses.replace(model.hp, predict_with="model1")
        assert torch.equal(model.predict_logits(images), model.net1(images))
        model.hp = dataclasses.replace(model.hp, predict_with="model2")
        assert torch.equal(model.predict_logits(images), model.net2(images))


@pytest.mark.parametrize("override", ["method.predict_with=model3", "method.over_expectation=top_k",
                                      "method.labeled_marginal=prior", "method.marginal_momentum=1.0"])
def test_bad_options_are_user_errors(override):
    with pytest.raises(UserError, match=override.split(".")[1].split("=")[0]):
        build_method("co_da", overrides=[override])


def test_paper_presets_per_family_and_an_unknown_family_section_is_inert():
    defaults = get_method("co_da").defaults
    la = resolve_config("la", "co_da", "paper", [], defaults, family="la")
    assert (la["data"]["labeled_batch_size"], la["data"]["unlabeled_batch_size"], la["trainer"]["max_steps"]) == (2, 2, 15000)
    assert la["optim"]["schedule"] == "poly" and la["method"]["consistency"] == 1.0
    acdc = resolve_config("acdc", "co_da", "paper", [], defaults, family="acdc")
    assert (acdc["data"]["labeled_batch_size"], acdc["trainer"]["max_steps"]) == (12, 30000)
    assert acdc["data"]["patch_size"] is None  # the dataset's 256x256, not the cadis section's frames
    # The cadis section applies only to a dataset of that family (none is registered yet).
    cadis = resolve_config("cadis", "co_da", "paper", [], defaults, family="cadis")
    assert cadis["data"]["patch_size"] == [272, 480] and cadis["data"]["labeled_batch_size"] == 8
    # cpu on ACDC: the same budget as cps
    cps = resolve_config("acdc", "cps", "cpu", [], get_method("cps").defaults, family="acdc")
    co_da = resolve_config("acdc", "co_da", "cpu", [], defaults, family="acdc")
    for section in ("data", "model", "trainer", "optim"):
        assert co_da[section] == cps[section], section


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_cli_smoke_run_logs_the_monitors_and_checkpoints_the_statistics(tmp_path):
    code = main(["run", "--method", "co_da", "--ratio", "0.2", "--profile", "smoke", "--no-progress",
                 "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb")])
    assert code == 0
    table = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    assert table["checkpoint"].tolist() == ["last", "best"] and (table["status"] == "ok").all()
    run_dir = next((tmp_path / "runs" / "synthetic_acdc" / "co_da").iterdir())
    logged = pd.read_csv(run_dir / "logs" / "metrics.csv")
    for column in ("train/dice_model1_RV", "train/pi_labeled_model2_LV", "train/pi_unlabeled_model1_Myo",
                   "train/expectation_model2_background", "train/oce1", "train/kept_fraction_model1"):
        assert logged[column].notna().sum() == 4, column  # smoke: 4 steps, logged every step
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"]["statistics.1.unlabeled_marginal.updates"].tolist() == [4, 4, 4, 4]
    model = build_method("co_da")
    load_weights(model, run_dir / "checkpoints" / "last.ckpt")
    saved = checkpoint["state_dict"]["statistics.0.labeled_marginal.value"]
    assert torch.equal(model.statistics[0].labeled_marginal.value, saved)
    assert logged["train/pi_labeled_model1_RV"].dropna().iloc[-1] == pytest.approx(saved[1].item())


@pytest.mark.slow
def test_two_process_ddp_statistics_are_identical_on_every_rank(tmp_path):
    run_two_rank_script("ddp_co_da_check.py", tmp_path, master_port=29541, timeout=300)
    report = json.loads((tmp_path / "ddp_statistics.json").read_text())
    assert report["world_size"] == 2
    # the ranks trained on different unlabeled images ...
    assert report["unlabeled_input_sums"][0] != report["unlabeled_input_sums"][1]
    # ... yet hold the same statistics, moved away from their initial values by the steps
    rank0, rank1 = report["statistics"]
    assert rank0 == rank1
    assert report["updates"] == [[report["steps"]] * 4] * 2
