"""MMS: both contrastive losses and the structure loss by hand, GridMask, gradient routing (intended and faithful),
the labeled halves, presets and smoke fits."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark.cli import main
from benchmark.config import resolve_config
from methods.components.strong_augment import grid_mask
from methods.mms import foreground_logits, structure_loss
from methods.registry import get_method
from tests.method_helpers import build_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# MMS is a binary endoscopy method; its tests run at 32 x 32.
make_mms = functools.partial(build_method, "mms", dataset="synthetic_kvasir", patch=(32, 32))


def batch_for(model, n_labeled=2, n_unlabeled=2):
    shape = tuple(model.config["data"]["patch_size"])
    channels = model.spec.in_channels
    generator = torch.Generator().manual_seed(1)
    labels = torch.zeros(n_labeled, *shape, dtype=torch.long)
    labels[:, 8:20, 10:24] = 1  # a foreground block, so the structure loss has boundaries
    if model.spec.num_classes > 2:
        labels[:, 12:16, 14:18] = model.spec.num_classes - 1
    return {"labeled": {"image": torch.randn(n_labeled, channels, *shape, generator=generator), "label": labels},
            "unlabeled": {"image": torch.randn(n_unlabeled, channels, *shape, generator=generator)}}


# ---- the structure loss by hand ----------------------------------------------------------------------------------
def test_structure_loss_constant_target_by_hand():
    # A 1 x 1 x 2 x 2 all-ones target: the 31 x 31 average (zero padding counted) at every pixel is 4 / 961, so
    # w = 1 + 5 (1 - 4/961) everywhere: a constant weight, wBCE = mean BCE. Logits 0 -> p = 0.5, BCE = ln 2.
    # wIoU = 1 - (w * 2 + 1) / (w * (2 + 4) - w * 2 + 1) = 1 - (2w + 1) / (4w + 1).
    w = 1 + 5 * (1 - 4 / 961)
    value = structure_loss(torch.zeros(1, 1, 2, 2, dtype=torch.float64), torch.ones(1, 1, 2, 2, dtype=torch.float64))
    assert value.item() == pytest.approx(math.log(2) + 1 - (2 * w + 1) / (4 * w + 1), rel=1e-9)


def test_structure_loss_weights_and_faithful_double_sigmoid_by_hand():
    # Target [[1, 0]] in a 1 x 2 image: avg pools = 1/961 at both pixels (one foreground pixel in every window),
    # w = [1 + 5 (1 - 1/961), 1 + 5/961]. Logits [2, -1].
    w1, w0 = 1 + 5 * (1 - 1 / 961), 1 + 5 / 961
    logits = torch.tensor([[[[2.0, -1.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = [-math.log(sig(2.0)), -math.log(1 - sig(-1.0))]
    p = [sig(2.0), sig(-1.0)]
    wbce = (w1 * bce[0] + w0 * bce[1]) / (w1 + w0)
    inter = w1 * p[0]
    union = w1 * (p[0] + 1) + w0 * p[1]
    assert structure_loss(logits, target).item() == pytest.approx(wbce + 1 - (inter + 1) / (union - inter + 1), rel=1e-9)
    # Faithful: the argument is sigmoid(o); BCE of sigmoid(sigmoid(o)) unweighted mean, IoU on sigmoid(o).
    bce_f = (-math.log(sig(p[0])) - math.log(1 - sig(p[1]))) / 2
    faithful = structure_loss(torch.sigmoid(logits), target, faithful=True)
    assert faithful.item() == pytest.approx(bce_f + 1 - (inter + 1) / (union - inter + 1), rel=1e-9)


def test_foreground_logits_binary_and_multiclass():
    logits = torch.tensor([[[[0.5]], [[2.0]]]])
    assert foreground_logits(logits).item() == pytest.approx(1.5)
    three = torch.tensor([[[[0.0]], [[1.0]], [[2.0]]]])
    softmax = torch.softmax(three, dim=1)[0, 1:, 0, 0]
    assert torch.allclose(torch.sigmoid(foreground_logits(three))[0, :, 0, 0], softmax, atol=1e-6)


# ---- GridMask ----------------------------------------------------------------------------------------------------
def test_grid_mask_zeroes_squares_between_kept_stripes():
    images = torch.ones(64, 1, 96, 96)
    masked = grid_mask(images, torch.Generator().manual_seed(0), probability=1.0)
    zeroed = 1 - masked.mean().item()
    assert 0.25 < zeroed < 0.45, zeroed  # ((d - l) / d)^2 ~ 0.36 on average
    assert set(masked.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(grid_mask(images[:4], torch.Generator().manual_seed(0), probability=0.0), images[:4])


# ---- gradient routing ----------------------------------------------------------------------------------------------
def grads(model, term):
    model.zero_grad(set_to_none=True)
    losses = model.compute_losses(batch_for(model))
    if not (isinstance(losses[term], torch.Tensor) and losses[term].requires_grad):
        return set()
    losses[term].backward()
    parts = ("net1", "net2", "projector1", "projector2", "classifier1", "classifier2")
    return {part for part in parts if any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, part).parameters())}


@pytest.mark.parametrize("dataset", ["synthetic_kvasir", "synthetic_acdc"])
def test_intended_mode_reaches_both_networks_and_both_heads(dataset):
    model = make_mms(dataset=dataset)
    model.train()
    assert grads(model, "supervised") == {"net1", "net2"}
    assert grads(model, "consistency") == {"net1", "net2"}
    assert grads(model, "unlabeled_contrast") == {"net1", "net2", "projector1", "projector2"}
    assert grads(model, "labeled_contrast") == {"net1", "net2", "classifier1", "classifier2"}


def test_faithful_mode_matches_the_upstream_asymmetry():
    flags = ["method.faithful_asymmetric=true", "method.faithful_frozen_heads=true", "method.faithful_consistency=true"]
    model = make_mms(overrides=flags)
    model.train()
    assert grads(model, "supervised") == {"net1", "net2"}
    assert grads(model, "consistency") == set()  # a logged constant
    assert grads(model, "unlabeled_contrast") == {"net1"}  # heads frozen, network 2 only on the detached key side
    assert grads(model, "labeled_contrast") == {"net1"}
    frozen = [p for head in ("projector1", "projector2", "classifier1", "classifier2") for p in getattr(model, head).parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    optimizer = model.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in frozen}


def test_labeled_halves_go_to_their_own_network():
    # The first half of the labeled batch (network 1's labeled part) reaches network 1 only, the second half
    # network 2 only; both see the same augmented unlabeled batch.
    model = make_mms()
    seen = {"net1": [], "net2": []}
    for name in seen:
        network = getattr(model, name)
        original = network.forward
        network.forward = lambda x, _name=name, _original=original: (seen[_name].append(x.clone()), _original(x))[1]
    batch = batch_for(model)
    batch["labeled"]["image"][0], batch["labeled"]["image"][1] = 1.0, 2.0
    model.compute_losses(batch)
    (labeled1, unlabeled1), (labeled2, unlabeled2) = seen["net1"], seen["net2"]
    assert torch.equal(labeled1, torch.full_like(labeled1, 1.0)) and torch.equal(labeled2, torch.full_like(labeled2, 2.0))
    assert torch.equal(unlabeled1, unlabeled2) and not torch.equal(unlabeled1, batch["unlabeled"]["image"])


def test_test_time_normalisation_flag():
    model = make_mms(overrides=["method.faithful_test_unnormalised=true"])
    model.eval()
    images = torch.randn(1, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model.spec.image_normalization)
    assert torch.allclose(model.predict_logits(images), model.net1(images * std + mean), atol=1e-6)


@pytest.mark.parametrize("predict_with", ["model1", "average"])
def test_upstreams_train_mode_inference_normalises_each_image_with_its_own_statistics(predict_with):
    # train_mms.py (validation) and test.py never call .eval(), at batch 1: each image gets its own BatchNorm
    # statistics. The reference is torch's own training-mode BatchNorm on a copy of each network, one image at a time.
    from methods.components.ensembles import average_probability_logits
    from tests.method_helpers import upstream_reference

    model = make_mms(overrides=["method.faithful_batch_statistics_at_test=true", f"method.predict_with={predict_with}"])
    model.train()
    model.compute_losses(batch_for(model))  # running statistics away from their initial 0 / 1
    model.eval()
    images = torch.randn(3, 3, 32, 32) * 2 + 1
    with torch.no_grad():
        predicted = model.predict_logits(images)
        networks = [model.net1, model.net2] if predict_with == "average" else [model.net1]
        expected = [upstream_reference(network, images) for network in networks]
        expected = average_probability_logits(expected) if len(expected) > 1 else expected[0]
        eval_mode = make_mms(overrides=[f"method.predict_with={predict_with}"])
        eval_mode.load_state_dict(model.state_dict())
        default = eval_mode.eval().predict_logits(images)
    torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(predicted, default, atol=1e-3)  # the default reads the running statistics


def test_crop_not_divisible_by_eight_is_a_user_error():
    from core.errors import UserError

    with pytest.raises(UserError, match="divisible by 8"):
        make_mms(patch=(36, 32))


def test_missing_smp_encoder_is_a_user_error():
    from core.errors import UserError

    try:  # smp is optional (not installable next to the suite's pinned CPU torch)
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="segmentation-models-pytorch"):
            make_mms(overrides=["method.encoder=resnet18"])
    else:
        with pytest.raises(UserError, match="encoder weights file not found"):
            make_mms(overrides=["method.encoder=resnet18", "method.encoder_weights=/nonexistent/weights.pth"])


def test_labeled_partitions_split_whole_units_in_list_order(acdc_root):
    from datamodules.acdc import ACDC_SPEC, ACDCDataModule

    dm = ACDCDataModule(ACDC_SPEC, acdc_root, patch_size=(32, 32), labeled_batch_size=4, unlabeled_batch_size=2,
                        max_steps=6, seed=0, labeled=3, num_workers=0, labeled_partitions=2)
    patients = [name.split("_")[0] for name in dm.split.labeled]
    first_part = dm.labeled_partition_sizes[0]
    # round(3 / 2) = 2 patients for network 1, 1 for network 2; no patient straddles the parts
    assert len(set(patients[:first_part])) == 2 and set(patients[:first_part]).isdisjoint(patients[first_part:])
    indices = [index for index, _draw in dm._stream(dm.split.labeled, True, 4).sampler]
    for step in range(6):
        batch = indices[step * 4 : step * 4 + 4]
        assert all(i < first_part for i in batch[:2]) and all(i >= first_part for i in batch[2:])


# ---- presets and smoke fits ----------------------------------------------------------------------------------------
def test_kvasir_preset_is_the_mms_protocol():
    config = resolve_config("kvasir_seg", "mms", "paper", [], get_method("mms").defaults, family="kvasir_seg")
    assert config["data"]["patch_size"] == [512, 288] and config["optim"]["name"] == "adam"
    assert config["optim"]["lr"] == 1e-4 and config["data"]["labeled_batch_size"] == 2
    faithful = [k for k in get_method("mms").defaults if k.startswith("faithful")]
    # paper = upstream's arithmetic (pinned by tests/test_golden_fba_mms.py); the other profiles the intended one
    assert config["method"]["temperature"] == 0.07 and all(config["method"][k] is True for k in faithful)
    cpu = resolve_config("kvasir_seg", "mms", "cpu", [], get_method("mms").defaults, family="kvasir_seg")
    assert not any(cpu["method"][k] for k in faithful)


def run_cli(tmp_path: Path, *args: str) -> int:
    return main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), *args])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["synthetic_kvasir", "synthetic_acdc"])
def test_smoke_fit(tmp_path, dataset):
    assert run_cli(tmp_path, "--method", "mms", "--dataset", dataset, "--ratio", "0.5") == 0
    table = pd.read_csv(tmp_path / "lb" / f"{dataset}.csv")
    assert table["checkpoint"].tolist() == ["last", "best"] and (table["status"] == "ok").all()
    if dataset == "synthetic_kvasir":
        assert table["pooled_f1"].between(0, 1).all()


def test_inference_speed_benchmark_reports_ratios():
    # Tiny sizes: the function's contract (three paths, ratios to the plain forward), not a timing.
    from benchmark.perf.mms_inference_speed import measure

    model = make_mms().eval()
    result = measure(model, size=(32, 32), frame=(40, 52), warmup=1, repeats=2)
    assert set(result["images_per_second"]) == {"plain_forward", "predict_logits", "whole_image"}
    assert result["ratio_to_plain_forward"]["plain_forward"] == 1.0
    assert all(v > 0 for v in result["images_per_cpu_second"].values())
