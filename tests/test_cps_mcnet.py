"""CPS and MC-Net+: each loss term by hand, gradient routing, ramp-ups, presets and smoke fits (2D, 3D, RATIO=1)."""
from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest
import torch

from benchmark.config import resolve_config
from core.errors import UserError
from methods.cps import CrossPseudoSupervision, cross_pseudo_loss
from methods.losses.consistency import mutual_consistency_loss
from methods.mc_net_plus import MCNetPlus, binary_dice_loss, foreground_dice_loss, mcnet_dice_loss
from methods.networks import build_network
from methods.registry import get_method
from tests.method_helpers import build_method, has_grad, no_grad, random_batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------
# Loss terms by hand


def test_cps_cross_pseudo_loss_on_a_2x2_example():
    log3 = math.log(3.0)
    # pixel logits: [log 3, 0] -> p = (3/4, 1/4); [0, 0] -> (1/2, 1/2); [0, log 3] -> (1/4, 3/4)
    logits = torch.tensor([[[[log3, log3], [0.0, 0.0]], [[0.0, 0.0], [0.0, log3]]]], requires_grad=True)
    other = torch.tensor([[[[2.0, -1.0], [5.0, 0.0]], [[1.0, 3.0], [-5.0, 1.0]]]], requires_grad=True)
    # argmax of other: [[0, 1], [0, 1]]
    expected = (math.log(4 / 3) + math.log(4) + math.log(2) + math.log(4 / 3)) / 4
    loss = cross_pseudo_loss(logits, other)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None and other.grad is None  # hard pseudo-labels carry no gradient


def test_mutual_consistency_by_hand_and_target_gradient():
    p1 = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).requires_grad_()
    p2 = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1).requires_grad_()
    # S(p1) = (0.5, 0.5), S(p2) = (9/13, 4/13) at T = 0.5
    expected = 6.25 / 169 + 0.01  # mean((p1 - S2)^2) + mean((p2 - S1)^2)
    loss = mutual_consistency_loss([p1, p2], 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # detached targets: d/dp2 = (p2 - S1) only
    assert torch.allclose(p2.grad.flatten(), torch.tensor([0.1, -0.1]), atol=1e-6)
    p1.grad = p2.grad = None
    upstream = mutual_consistency_loss([p1, p2], 0.5, detach_targets=False)
    assert upstream.item() == pytest.approx(expected, rel=1e-6)
    upstream.backward()
    assert not torch.allclose(p2.grad.flatten(), torch.tensor([0.1, -0.1]), atol=1e-4)  # gradient through S(p2)
    # three maps: the six ordered pairs are summed
    p = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)
    assert mutual_consistency_loss([p, p, p], 0.5).item() == pytest.approx(6 * 1.44 / 169, rel=1e-6)


def test_mcnet_dice_losses_by_hand():
    assert binary_dice_loss(torch.tensor([0.5, 1.0]), torch.tensor([1, 1])).item() == pytest.approx(1 / 7, rel=1e-6)
    # two pixels: (1, 0) labeled 0, (0.5, 0.5) labeled 1
    probabilities = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).view(1, 2, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    # class 0: 1 - 1 / (1.25 + 1); class 1: 1 - 0.5 / (0.25 + 1)   (no factor 2, upstream)
    assert mcnet_dice_loss(probabilities, labels).item() == pytest.approx((5 / 9 + 0.6) / 2, rel=1e-6)
    assert mcnet_dice_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2), labels).item() == pytest.approx(0.5)
    # two classes: the foreground channel only = upstream 3-D
    assert foreground_dice_loss(probabilities, labels).item() == pytest.approx(1 - 2 * 0.5 / (0.5 + 1), rel=1e-6)


def test_rampups_follow_upstream_and_the_budget_fraction():
    cps = build_method("cps", overrides=["method.consistency_rampup_fraction=null"])
    mc = build_method("mc_net_plus", dataset="synthetic_la", overrides=["method.consistency_rampup_fraction=null"])
    with mock.patch.object(type(cps), "global_step", new_callable=mock.PropertyMock) as step:
        step.return_value = 3000  # SSL4MIS: 0.1 * ramp(3000 // 150 = 20, 200)
        assert cps.consistency_weight() == pytest.approx(0.1 * math.exp(-5 * (1 - 20 / 200) ** 2))
        step.return_value = 30000
        assert cps.consistency_weight() == pytest.approx(0.1)
    with mock.patch.object(type(mc), "global_step", new_callable=mock.PropertyMock) as step:
        step.return_value = 149  # MC-Net: iter_num is incremented first -> (149 + 1) // 150 = 1; LA: 1.0, ramp 40
        assert mc.consistency_weight() == pytest.approx(math.exp(-5 * (1 - 1 / 40) ** 2))
        step.return_value = 5999
        assert mc.consistency_weight() == pytest.approx(1.0)
    overrides = ["method.consistency_rampup_fraction=0.4", "trainer.max_steps=1000"]
    fraction = build_method("mc_net_plus", overrides=overrides)
    with mock.patch.object(type(fraction), "global_step", new_callable=mock.PropertyMock) as step:
        step.return_value = 200
        assert fraction.consistency_weight() == pytest.approx(0.1 * math.exp(-5 * 0.5**2))
        step.return_value = 400
        assert fraction.consistency_weight() == pytest.approx(0.1)


def test_presets_per_family_and_profile():
    acdc = resolve_config("acdc", "mc_net_plus", "paper", method_defaults=MCNetPlus.defaults, family="acdc")
    la = resolve_config("la", "mc_net_plus", "paper", method_defaults=MCNetPlus.defaults, family="la")
    def key(config):
        return config["method"]["consistency"], config["method"]["consistency_rampup"], config["trainer"]["max_steps"]

    assert key(acdc) == (0.1, 200.0, 30000) and key(la) == (1.0, 40.0, 15000)
    assert acdc["optim"]["schedule"] == la["optim"]["schedule"] == "constant"
    assert la["data"]["labeled_batch_size"] == la["data"]["unlabeled_batch_size"] == 2
    la_cpu = resolve_config("la", "mc_net_plus", "cpu", method_defaults=MCNetPlus.defaults, family="la")
    assert la_cpu["trainer"]["max_steps"] == 1000 and la_cpu["method"]["consistency_rampup_fraction"] == 0.4
    cps = resolve_config("acdc", "cps", "paper", method_defaults=CrossPseudoSupervision.defaults, family="acdc")
    assert cps["method"]["consistency"] == 0.1 and cps["method"]["consistency_rampup"] == 200.0
    assert cps["optim"]["schedule"] == "poly" and cps["method"]["consistency_rampup_fraction"] is None


# ---------------------------------------------------------------------------------------------------------------
# Gradient routing


def test_cps_pseudo_terms_route_to_their_own_network_and_the_total_reaches_everything():
    model = build_method("cps", patch=(32, 32))
    model.train()
    batch = random_batch(model)
    losses = model.compute_losses(batch)
    assert losses["pseudo1"].item() > 0 and losses["pseudo2"].item() > 0
    losses["pseudo1"].backward(retain_graph=True)
    assert has_grad(model.net1) and no_grad(model.net2)
    model.zero_grad(set_to_none=True)
    losses["pseudo2"].backward(retain_graph=True)
    assert has_grad(model.net2) and no_grad(model.net1)
    model.zero_grad(set_to_none=True)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    # one optimizer over both networks
    optimizer = model.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_cps_networks_start_apart_and_predict_with_model1_or_average():
    model = build_method("cps", patch=(32, 32))
    w1 = next(p for n, p in model.net1.named_parameters() if n.endswith("weight") and p.dim() == 4)
    w2 = next(p for n, p in model.net2.named_parameters() if n.endswith("weight") and p.dim() == 4)
    assert not torch.equal(w1, w2)  # two draws of PyTorch's default init (upstream 2-D)
    model.eval()
    images = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.predict_logits(images), model.net1(images))
        model.hp = dataclasses.replace(model.hp, predict_with="average")
        mean = (torch.softmax(model.net1(images), 1) + torch.softmax(model.net2(images), 1)) / 2
        assert torch.allclose(torch.softmax(model.predict_logits(images), 1), mean, atol=1e-6)
    with pytest.raises(Exception, match="predict_with"):
        build_method("cps", overrides=["method.predict_with=model3"])


def test_mcnet_consistency_reaches_encoder_and_all_three_decoders():
    model = build_method("mc_net_plus", patch=(32, 32))
    model.train()
    assert model.net.num_decoders == 3
    losses = model.compute_losses(random_batch(model))
    losses["consistency"].backward(retain_graph=True)
    for part in (model.net.encoder, *model.net.decoders):
        assert has_grad(part)
    model.zero_grad(set_to_none=True)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_mcnet_supervised_term_is_upstream_dice_per_dimension():
    model = build_method("mc_net_plus", dataset="synthetic_la", patch=(16, 16, 16))
    model.train()
    logits = [torch.randn(2, 2, 16, 16, 16) for _ in range(3)]
    labels = torch.randint(0, 2, (1, 16, 16, 16))
    supervised, consistency = model.mcnet_losses(logits, labels)
    expected = sum(binary_dice_loss(torch.softmax(x[:1], 1)[:, 1], labels == 1) for x in logits)
    assert supervised.item() == pytest.approx(expected.item(), rel=1e-6)
    probabilities = [torch.softmax(x, 1) for x in logits]  # all samples, labeled and unlabeled
    assert consistency.item() == pytest.approx(mutual_consistency_loss(probabilities, 0.1).item(), rel=1e-6)
    model.eval()
    images = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.predict_logits(images), model.net.forward_all(images)[0])


@pytest.mark.parametrize("name, dataset", [("cps", "synthetic_acdc"), ("mc_net_plus", "synthetic_la")])
def test_labeled_only_batch_trains(name, dataset):
    model = build_method(name, dataset=dataset)
    model.train()
    batch = random_batch(model, n_labeled=1 if dataset == "synthetic_la" else 2, n_unlabeled=0)
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()


def conv_std(network) -> float:
    return torch.cat([m.weight.flatten() for m in network.modules() if isinstance(m, torch.nn.Conv2d)]).std().item()


@pytest.mark.parametrize("method", ["cps", "co_da", "mcl_cs"])
def test_network_inits_flag_chooses_each_networks_initialisation(method):
    def built(inits):
        return build_method(method, overrides=[] if inits is None else [f"method.network_inits=[{inits}]"])

    reference = conv_std(build_network(2, 1, 4, base_features=4))  # PyTorch's layer defaults
    reinitialised = built("kaiming, xavier")  # Kaiming for network 1, Xavier for network 2: larger weights
    assert conv_std(reinitialised.net1) > 2 * reference and conv_std(reinitialised.net2) > 1.3 * reference
    for plain in (built(None), built("default, default")):  # 2-D upstream (the default) keeps PyTorch's init
        assert conv_std(plain.net1) == pytest.approx(reference, rel=0.15)
        assert conv_std(plain.net2) == pytest.approx(reference, rel=0.15)
    with pytest.raises(UserError, match="network_inits"):
        built("kaiming, orthogonal")


@pytest.mark.parametrize("method", ["cps", "co_da", "mcl_cs"])
def test_network_inits_default_follows_upstream_per_dimensionality(method):
    """SSL4MIS's 2-D CPS script keeps PyTorch's init for both networks; its 3-D script re-initialises them
    Kaiming / Xavier. null (the default) picks the one of the data's dimensionality; the config says null, so it
    hashes apart from an explicit choice."""
    from benchmark.config import config_hash

    assert build_method(method).network_inits() == ("default", "default")
    volumetric = build_method(method, "synthetic_la")
    assert volumetric.network_inits() == ("kaiming", "xavier")
    reference = torch.nn.init.calculate_gain("leaky_relu", 0)  # Kaiming's gain: std = gain / sqrt(fan_in)
    conv = next(m for m in volumetric.net1.modules() if isinstance(m, torch.nn.Conv3d) and m.weight.shape[1] > 1)
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(reference / fan_in ** 0.5, rel=0.2)

    def digest(overrides):
        return config_hash(resolve_config("synthetic_acdc", method, "smoke", overrides, get_method(method).defaults,
                                          family="acdc"))

    assert len({digest([]), digest(["method.network_inits=[kaiming,xavier]"]),
                digest(["method.network_inits=[default,default]"])}) == 3


def test_supervised_network_init_isolates_an_initialisation_without_cross_supervision():
    """supervised's method.network_init applies CPS's schemes to its one network; default keeps PyTorch's."""
    from benchmark.config import config_hash

    reference = conv_std(build_network(2, 1, 4, base_features=4))
    assert conv_std(build_method("supervised").net) == pytest.approx(reference, rel=0.15)
    assert conv_std(build_method("supervised", overrides=["method.network_init=kaiming"]).net) > 2 * reference
    assert conv_std(build_method("supervised", overrides=["method.network_init=xavier"]).net) > 1.3 * reference
    with pytest.raises(UserError, match="network_init"):
        build_method("supervised", overrides=["method.network_init=orthogonal"])

    def digest(overrides):
        return config_hash(resolve_config("synthetic_acdc", "supervised", "smoke", overrides, get_method("supervised").defaults, family="acdc"))

    # The default is hash-neutral (rows written before the flag keep their hash); another scheme is another config.
    assert digest(["method.network_init=default"]) == digest([]) != digest(["method.network_init=kaiming"])


def test_mcnet_supervised_weight_default_is_upstreams_lamda_per_dimensionality():
    """MC-Net's --lamda: 1 in train_mcnet_2d.py, 0.5 in train_mcnet_3d.py (null = that); a bad value is refused."""
    assert build_method("mc_net_plus").supervised_weight() == 1.0
    assert build_method("mc_net_plus", "synthetic_la").supervised_weight() == 0.5
    assert build_method("mc_net_plus", overrides=["method.supervised_weight=0.25"]).supervised_weight() == 0.25
    with pytest.raises(UserError, match="supervised_weight"):
        build_method("mc_net_plus", overrides=["method.supervised_weight=-1"])


def test_cps_dice_include_background_flag_replaces_the_datasets_convention():
    volumetric = build_method("cps", "synthetic_la")  # LA convention: foreground-only Dice
    assert not volumetric.supervised_criterion.dice.include_background
    with_background = build_method("cps", "synthetic_la", ["method.dice_include_background=true"])
    assert with_background.supervised_criterion.dice.include_background
    with pytest.raises(UserError, match="dice_include_background"):
        build_method("cps", overrides=["method.dice_include_background=maybe"])
