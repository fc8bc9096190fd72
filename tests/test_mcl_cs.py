"""MCL-CS: losses by hand, CutMix boxes and perturbations, feature perturbation, gradient routing, presets.

The smoke fits (2D, 3D, RATIO=1.0) are in test_methods_smoke.py, which runs every registered method.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from benchmark.config import resolve_config, shared_recipe
from core.errors import UserError
from methods.components.mixing import cutmix_box_masks, mix_with_next
from methods.components.perturbations import channel_dropout, gaussian_noise
from methods.mcl_cs import priority_sample, sample_pixels
from methods.registry import get_method
from tests.method_helpers import build_method, has_grad, random_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Losses by hand


def test_priority_sample_takes_preferred_first_and_never_a_non_candidate():
    candidates = torch.tensor([True, True, True, False, True])
    preferred = torch.tensor([False, True, False, True, False])
    assert priority_sample(candidates, preferred, 1, generator()).tolist() == [1]
    two = priority_sample(candidates, preferred, 2, generator())
    assert two[0].item() == 1 and two[1].item() in (0, 2, 4)
    assert sorted(priority_sample(candidates, preferred, 10, generator()).tolist()) == [0, 1, 2, 4]


def test_sample_pixels_per_class_hard_anchors_and_other_class_negatives():
    labels = torch.tensor([[0, 0, 0, 1, 1, 2]])
    valid = torch.tensor([[True, True, True, True, True, False]])  # the only class-2 pixel is not confident
    own = torch.tensor([[0.99, 0.5, 0.99, 0.2, 0.99, 0.1]])
    samples = sample_pixels(labels, valid, own, generator(), 3, anchors_per_class=1, negatives=5,
                            prototype_samples=None, hard_threshold=0.97)
    assert samples.classes == [0, 1]
    assert [a.tolist() for a in samples.anchors] == [[1], [3]]  # the hard pixel of each class
    assert [sorted(n.tolist()) for n in samples.negatives] == [[3, 4], [0, 1, 2]]
    assert [sorted(p.tolist()) for p in samples.prototype_pixels] == [[0, 1, 2], [3, 4]]
    capped = sample_pixels(labels, valid, own, generator(), 3, negatives=1, prototype_samples=2)
    assert [len(n) for n in capped.negatives] == [1, 1] and [len(p) for p in capped.prototype_pixels] == [2, 2]
    # one class alone has no negatives: nothing to contrast
    alone = sample_pixels(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4),
                          generator(), 2)
    assert alone.classes == []


# ---------------------------------------------------------------------------------------------------------------
# CutMix and perturbations


@pytest.mark.parametrize("spatial", [(24, 20), (12, 10, 8)])
def test_cutmix_masks_are_one_box_per_sample_within_the_area_range(spatial):
    masks = cutmix_box_masks(64, spatial, generator(3), probability=1.0, area_range=(0.02, 0.4))
    assert masks.shape == (64, *spatial) and masks.dtype == torch.bool
    total = math.prod(spatial)
    for mask in masks:
        inside = mask.nonzero()
        low, high = inside.min(dim=0).values, inside.max(dim=0).values
        box_volume = int(torch.prod(high - low + 1))
        assert box_volume == len(inside)  # an axis-aligned box (rectangle / cuboid), nothing else
        assert 1 <= len(inside) <= 0.4 * total * 1.6  # rounding sides of a small grid can grow the share a little
    assert not cutmix_box_masks(8, spatial, generator(3), probability=0.0).any()


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_cutmix_mixes_image_and_label_with_the_same_box(spatial):
    n = 4
    images = torch.stack([torch.full((1, *spatial), float(i)) for i in range(n)])  # sample i is all i
    images = images + torch.rand(n, 1, *spatial, generator=generator(1))  # so the label is floor(image)
    labels = images.squeeze(1).floor().long()
    masks = cutmix_box_masks(n, spatial, generator(5), probability=1.0)
    mixed_images, mixed_labels = mix_with_next(~masks, images, labels)
    assert torch.equal(mixed_labels, mixed_images.squeeze(1).floor().long())  # label still fits the image
    for i in range(n):
        assert torch.equal(mixed_labels[i][masks[i]], torch.full_like(mixed_labels[i][masks[i]], (i + 1) % n))
        assert torch.equal(mixed_labels[i][~masks[i]], torch.full_like(mixed_labels[i][~masks[i]], i))


def test_channel_dropout_zeroes_whole_channels_and_rescales():
    features = torch.ones(3, 16, 4, 4, 2)
    dropped = channel_dropout(features, 0.5, generator(2))
    per_channel = dropped.flatten(2)
    assert ((per_channel == 0).all(dim=2) | (per_channel == 2.0).all(dim=2)).all()  # 0 or 1 / (1 - 0.5)
    assert 0 < (per_channel[:, :, 0] == 0).sum() < 48
    assert torch.equal(channel_dropout(features, 0.0, generator(2)), features)


def test_noise_is_clamped_per_sample():
    images = torch.randn(4, 1, 8, 8, generator=generator(1))
    noisy = gaussian_noise(images, generator(2), max_std=5.0, clamp=0.2)
    assert (noisy - images).abs().max() <= 0.2 + 1e-6 and not torch.equal(noisy, images)
    assert torch.equal(gaussian_noise(images, generator(2), max_std=0.0), images)


def test_strong_view_without_intensity_changes_is_the_cutmixed_image():
    model = build_method("mcl_cs", overrides=["method.noise_max_std=0.0", "method.jitter_probability=0.0",
                                   "method.blur_probability=0.0"])
    images = torch.randn(3, 1, 32, 32, generator=generator(1))
    boxes = cutmix_box_masks(3, (32, 32), generator(4), probability=1.0)
    strong = model.strong_view(images, boxes, generator(5))
    assert torch.allclose(strong, mix_with_next(~boxes, images)[0], atol=1e-6)


def test_strong_view_pseudo_labels_are_mixed_with_the_image_boxes(monkeypatch):
    """The strong-view cross-supervision gets the other network's pseudo-labels CutMixed with the image's box."""
    import methods.mcl_cs as module

    model = build_method("mcl_cs", overrides=["method.pseudo_label_threshold=0.0", "method.cutmix_probability=1.0"])
    recorded = {"boxes": [], "ce": []}
    real_masks, real_ce = module.cutmix_box_masks, module.cross_entropy_mean_over_all
    monkeypatch.setattr(module, "cutmix_box_masks", lambda *a, **k: recorded["boxes"].append(real_masks(*a, **k)) or recorded["boxes"][-1])
    monkeypatch.setattr(module, "cross_entropy_mean_over_all", lambda logits, pseudo, keep: recorded["ce"].append(pseudo) or real_ce(logits, pseudo, keep))
    model.compute_losses(random_batch(model, n_unlabeled=3, generator=generator(1)))
    (boxes,) = recorded["boxes"]
    assert boxes.any()
    fp_pseudo_of_net2, strong_pseudo_of_net2 = recorded["ce"][0], recorded["ce"][1]  # network 1's two terms
    assert torch.equal(strong_pseudo_of_net2, mix_with_next(~boxes, fp_pseudo_of_net2)[0])


# ---------------------------------------------------------------------------------------------------------------
# The feature perturbation


def test_feature_perturbation_decodes_a_dropped_copy_in_the_same_pass():
    model = build_method("mcl_cs")
    net = model.net1
    labeled, unlabeled = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    perturbed = model.forward_network(net, labeled, unlabeled, None, generator(1))
    assert perturbed["fp_logits"].shape == perturbed["logits"][2:].shape
    assert not torch.allclose(perturbed["fp_logits"], perturbed["logits"][2:])
    net.eval()  # no encoder dropout: with p = 0 the copy is the clean unlabeled prediction
    model.hp = dataclasses.replace(model.hp, feature_dropout=0.0)
    clean = model.forward_network(net, labeled, unlabeled, None, generator(1))
    assert torch.allclose(clean["fp_logits"], clean["logits"][2:], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Gradient routing


@pytest.mark.parametrize("dataset", ["synthetic_acdc", "synthetic_la"])
def test_every_term_reaches_what_it_should_and_nothing_else(dataset):
    model = build_method("mcl_cs", dataset, overrides=["method.pseudo_label_threshold=0.0"])
    batch = random_batch(model, generator=generator(1))
    parts = {
        "net1": model.net1, "net2": model.net2,
        "net1.decoder": model.net1.decoders, "net2.decoder": model.net2.decoders,
        "pixel_head1": model.pixel_heads[0], "pixel_head2": model.pixel_heads[1],
        "patch_head1": model.patch_heads[0], "patch_head2": model.patch_heads[1],
    }
    expected = {
        "supervised1": {"net1", "net1.decoder"},
        "supervised2": {"net2", "net2.decoder"},
        "cross_strong1": {"net1", "net1.decoder"},
        "cross_fp2": {"net2", "net2.decoder"},
        # strong-view cells of each network's encoder and its patch head; the keys are targets
        "patch_contrast": {"net1", "net2", "patch_head1", "patch_head2"},
        "pixel_contrast": {"net1", "net2", "net1.decoder", "net2.decoder", "pixel_head1", "pixel_head2"},
        "loss": set(parts),
    }
    for term, reached in expected.items():
        model.zero_grad(set_to_none=True)
        losses = model.compute_losses(batch)
        assert losses[term].requires_grad and losses[term].item() != 0.0
        losses[term].backward()
        got = {name for name, part in parts.items() if has_grad(part)}
        assert got == reached, term


def test_decoder_scales_trains_one_pixel_head_per_scale_and_has_no_patch_term():
    model = build_method("mcl_cs", overrides=["method.multiscale=decoder_scales"])
    assert model.patch_heads is None and list(model.pixel_heads[0]) == ["4", "2", "1"]
    losses = model.compute_losses(random_batch(model, generator=generator(1)))
    assert "patch_contrast" not in losses
    losses["pixel_contrast"].backward()
    assert all(has_grad(head) for heads in model.pixel_heads for head in heads.values())
    assert has_grad(model.net1.decoders) and has_grad(model.net2.decoders)


def test_without_unlabeled_data_every_head_stays_in_the_graph():
    model = build_method("mcl_cs", "synthetic_la")
    losses = model.compute_losses(random_batch(model, n_unlabeled=0, generator=generator(1)))
    assert losses["cross_strong1"].item() == 0.0 and losses["patch_contrast"].item() == 0.0
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter used


def test_the_threshold_masks_unconfident_pseudo_labels():
    model = build_method("mcl_cs", overrides=["method.pseudo_label_threshold=1.0"])  # nothing is that confident
    losses = model.compute_losses(random_batch(model, generator=generator(1)))
    assert all(losses[k].item() == 0.0 for k in ("cross_strong1", "cross_fp1", "cross_strong2", "cross_fp2"))


# ---------------------------------------------------------------------------------------------------------------
# Presets and settings


def test_presets_per_family_and_profile():
    defaults = get_method("mcl_cs").defaults
    cpu = resolve_config("acdc", "mcl_cs", "cpu", [], defaults)
    recipe = shared_recipe("cpu", "acdc", "acdc")  # the cpu profile's batch and budget are the shared recipe's
    assert cpu["data"]["unlabeled_batch_size"] == recipe["data"]["unlabeled_batch_size"]
    assert cpu["trainer"]["max_steps"] == recipe["trainer"]["max_steps"]
    assert cpu["method"]["consistency_rampup_fraction"] == 1.0  # CPS's ACDC ramp-up spans the whole run
    la = resolve_config("la", "mcl_cs", "paper", [], defaults)
    assert la["trainer"]["max_steps"] == 15000 and la["optim"]["schedule"] == "poly"
    assert la["method"]["consistency_rampup"] == 40.0 and la["data"]["patch_size"] is None  # LA's 112x112x80
    # the BraTS and nuclei sections apply to their families only
    brats = resolve_config("brats", "mcl_cs", "paper", [], defaults, family="brats")
    assert (brats["data"]["unlabeled_batch_size"], brats["trainer"]["max_steps"]) == (2, 30000)
    nuclei = resolve_config("monuseg", "mcl_cs", "paper", [], defaults, family="monuseg")
    assert (nuclei["data"]["labeled_batch_size"], nuclei["data"]["unlabeled_batch_size"]) == (12, 12)
    assert (resolve_config("monuseg", "mcl_cs", "cpu", [], defaults, family="monuseg")["data"]["unlabeled_batch_size"]
            == shared_recipe("cpu", "monuseg", "monuseg")["data"]["unlabeled_batch_size"])
    assert la["eval"]["stride"] is None and cpu["data"]["patch_size"] == [128, 128]


@pytest.mark.parametrize("override", [
    "method.multiscale=pixels", "method.pseudo_label_threshold=1.5", "method.scale_weights=[1.0]",
    "method.scale_strides=[3]", "method.cutmix_area=[0.5, 0.1]", "method.patch_grid=0", "method.feature_dropout=1.0",
    "method.pixel_prototype_samples=0",
])
def test_bad_settings_are_user_errors(override):
    with pytest.raises(UserError):
        build_method("mcl_cs", overrides=[override])
