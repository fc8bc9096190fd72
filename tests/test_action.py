"""ACTION: each loss by hand, window counts, ReCo sampling, the memory bank, gradient routing per stage, views,
and end-to-end runs through all three stages (2D and 3D) and of one stage alone from a checkpoint."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from benchmark.cli import main
from core.errors import UserError
from methods.action import (
    anatomical_contrast_loss,
    confidence_weighted_ce,
    distillation_kl,
    extract_windows,
    negative_products,
    sample_anatomical_contrast,
    similarity_logits,
    window_starts,
)
from methods.components.ema import make_ema_teacher
from methods.components.memory_bank import MemoryQueue
from methods.components.mixing import classmix_keep_masks, cutmix_keep_masks, mix_with_next
from tests.conftest import run_two_rank_script
from tests.method_helpers import build_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_action(stage: str, dataset: str = "synthetic_acdc", overrides=()):
    return build_method("action", dataset, overrides, stage=stage, seed=None).train()


def smoke_batch(dataset: str, labeled: int = 2, unlabeled: int = 2):
    shape = (32, 32) if dataset == "synthetic_acdc" else (32, 32, 16)
    classes = 4 if dataset == "synthetic_acdc" else 2
    torch.manual_seed(0)
    return {"labeled": {"image": torch.rand(labeled, 1, *shape), "label": torch.randint(0, classes, (labeled, *shape))},
            "unlabeled": {"image": torch.rand(unlabeled, 1, *shape)}}


# ---- the distillation loss ----------------------------------------------------------------------------
def test_distillation_kl_by_hand():
    query, key = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    bank = torch.tensor([[2.0, 0.0], [0.0, 5.0]])  # normalised: the two unit vectors
    student, teacher = similarity_logits(query, bank, 0.1), similarity_logits(key, bank, 0.6)
    assert student.tolist()[0] == pytest.approx([6.0, 8.0])  # cos 0.6, 0.8 over T_s = 0.1
    assert teacher.tolist()[0] == pytest.approx([0.8 / 0.6, 1.0])
    p_student = [1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)]
    p_teacher = [math.exp(1 / 3) / (1 + math.exp(1 / 3)), 1 / (1 + math.exp(1 / 3))]
    expected = sum(t * math.log(t / s) for t, s in zip(p_teacher, p_student))  # 0.6126
    assert distillation_kl(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # "batchmean": a second row with identical distributions adds 0 and halves the mean.
    doubled = distillation_kl(torch.cat([student, student]), torch.cat([teacher, student]))
    assert doubled.item() == pytest.approx(expected / 2, rel=1e-5)


# ---- windows ----------------------------------------------------------------------------------------------
def test_window_counts_of_the_papers_patches():
    assert window_starts(112, 20, 10, include_last=True) == list(range(0, 100, 10))  # 10 starts, 0..90
    assert window_starts(80, 20, 10, include_last=True) == [0, 10, 20, 30, 40, 50, 60]
    assert window_starts(256, 64, 32, include_last=False) == [0, 32, 64, 96, 128, 160]  # 192 dropped as upstream
    windows, count = extract_windows(torch.zeros(1, 2, 112, 112, 80), 20, 10, include_last=True)
    assert count == 700 and windows.shape == (700, 2, 20, 20, 20)
    windows, count = extract_windows(torch.zeros(2, 4, 256, 256), 64, 32, include_last=False)
    assert count == 36 and windows.shape == (72, 4, 64, 64)


def test_windows_are_window_major_like_upstreams_concatenation():
    logits = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).view(2, 1, 4, 4)
    windows, count = extract_windows(logits, 2, 2, include_last=True)
    assert count == 4
    assert torch.equal(windows[0], logits[0, :, 0:2, 0:2]) and torch.equal(windows[1], logits[1, :, 0:2, 0:2])
    assert torch.equal(windows[2], logits[0, :, 0:2, 2:4])  # second window, first sample


def test_model_counts_windows_of_its_training_patch_and_rejects_a_window_that_does_not_fit():
    assert make_action("pretrain_local", "synthetic_acdc").num_windows == 4  # 32x32, 16 / 8, last dropped: 2 x 2
    assert make_action("pretrain_local", "synthetic_la").num_windows == 4 * 4 * 2  # 32x32x16, 8 / 8, every window
    with pytest.raises(UserError, match="leaves no local window"):
        make_action("pretrain_local", "synthetic_acdc", ["method.window=64"])


# ---- memory bank ----------------------------------------------------------------------------------------
def test_queue_is_fifo_across_steps_and_checkpointed():
    queue = MemoryQueue(4, (2,))
    batches = [torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[3.0, 0.0], [4.0, 0.0]]),
               torch.tensor([[5.0, 0.0], [6.0, 0.0]])]
    for batch in batches:
        queue.enqueue(batch)
    assert queue.keys[:, 0].tolist() == [5.0, 6.0, 3.0, 4.0] and int(queue.pointer) == 2
    restored = MemoryQueue(4, (2,))
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and int(restored.pointer) == 2
    with pytest.raises(UserError, match="multiple of 3"):
        queue.enqueue(torch.zeros(3, 2))


def test_initial_queue_entries_are_unit_vectors():
    queue = MemoryQueue(6, (3, 5))
    assert torch.allclose(queue.keys.norm(dim=-1), torch.ones(6, 3))


def test_model_enqueues_teacher_keys_each_step():
    model = make_action("pretrain_local")
    before = model.latent_queue.keys.clone()
    model.compute_losses(smoke_batch("synthetic_acdc"))
    assert int(model.latent_queue.pointer) == 0 and int(model.window_queue.pointer) == 0  # 4 keys fill K = 4
    assert not torch.equal(before, model.latent_queue.keys)
    assert model.window_queue.keys.shape == (4, 4, 4 * 4 * 4)  # K, P windows, C * s^2


def test_constant_ema_has_no_warm_up():
    student = torch.nn.Linear(1, 1, bias=False)
    teacher = make_ema_teacher(student, 0.99, warmup=False)
    student.weight.data.fill_(2.0)
    teacher.update_parameters(student)  # AveragedModel's first update copies
    student.weight.data.fill_(4.0)
    teacher.update_parameters(student)
    assert teacher.module.weight.item() == pytest.approx(0.99 * 2 + 0.01 * 4)


# ---- fine-tuning losses --------------------------------------------------------------------------------
def test_confidence_weighted_ce_by_hand():
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]], [[0.0, 5.0], [0.0, 1.0]]])  # (B=2, C=2, N=2)
    targets = torch.tensor([[0, 0], [1, -1]])
    confidence = torch.tensor([[0.99, 0.5], [0.98, 0.98]])
    # sample 0: weight 1/2, CE ln 2 and -ln(3/4); sample 1: weight 2 confident / 1 valid = 2, CE ln 2 (the
    # ignored pixel has loss 0 and is left out of the mean).
    expected = (0.5 * math.log(2) + 0.5 * -math.log(0.75) + 2 * math.log(2)) / 3
    assert confidence_weighted_ce(logits, targets, confidence, 0.97).item() == pytest.approx(expected, rel=1e-6)


def contrast_case():
    """Flattened pixels: class 0 (ids 0-9) half confident (prob 0.99), class 1 (10-19) half invalid, class 2
    (20-29) all confident, class 3 absent."""
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    valid = torch.ones(30, dtype=torch.bool)
    valid[15:20] = False
    probabilities = torch.full((30, 4), 0.25)
    probabilities[0:5, 0] = 0.99
    probabilities[20:30, 2] = 0.98
    return labels, valid, probabilities, torch.randn(30, 6)


def test_reco_sampling_respects_the_thresholds_and_never_draws_the_querys_class():
    labels, valid, probabilities, features = contrast_case()
    generator = torch.Generator().manual_seed(0)
    prototypes, present, draws = sample_anatomical_contrast(labels, valid, probabilities, features, 0.97, 0.5, 64, 32, generator)
    assert present == [0, 1, 2] and prototypes.shape == (3, 6)
    assert torch.allclose(prototypes[1], features[10:15].mean(0))  # invalid pixels are not in the prototype
    drawn_classes = [present[position] for position, _, _ in draws]
    assert drawn_classes == [0, 1]  # class 2 has no pixel below 0.97: no queries
    for position, queries, negatives in draws:
        c = present[position]
        assert (labels[queries] == c).all() and valid[queries].all()
        assert (probabilities[queries, c] < 0.97).all()
        assert queries.shape == (64,) and negatives.shape == (64, 32)
        assert (labels[negatives] != c).all() and valid[negatives].all()
    class0_queries = draws[0][1]
    assert set(class0_queries.tolist()) <= set(range(5, 10))  # the hard half only


def test_reco_negative_classes_follow_the_prototype_relation():
    # Class 1's prototype equals class 0's, class 2's is opposite: negatives of class 0 come from class 1
    # with probability softmax([1, -1] / 0.5)[0] = 1 / (1 + e^-4) ~ 0.982.
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    features = torch.cat([torch.ones(8, 2), -torch.ones(4, 2)])
    probabilities = torch.full((12, 3), 0.3)
    _, _, draws = sample_anatomical_contrast(labels, torch.ones(12, dtype=torch.bool), probabilities, features,
                                             0.97, 0.5, 100, 100, torch.Generator().manual_seed(0))
    share = (labels[draws[0][2]] == 1).float().mean().item()
    assert share == pytest.approx(1 / (1 + math.exp(-4)), abs=0.01)


def test_reco_loss_by_hand_on_one_query():
    # Two classes, one pixel each, both hard: each query's keys are its own prototype (itself) and the other
    # pixel; logits cos / 0.5 = [2, cos(a, b) / 0.5].
    representation = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]).view(1, 2, 2)  # (B=1, R=2, N=2): pixels (1,0) and (0,1)
    labels = torch.tensor([[0, 1]])
    probabilities = torch.full((1, 2, 2), 0.5)
    loss = anatomical_contrast_loss(representation, labels, torch.ones(1, 2, dtype=torch.bool), probabilities,
                                    torch.Generator().manual_seed(0), num_queries=3, num_negatives=2)
    expected = -math.log(math.exp(2) / (math.exp(2) + 2 * math.exp(0)))  # cos = 0 with the other pixel
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    single = anatomical_contrast_loss(representation, torch.tensor([[0, 0]]), torch.ones(1, 2, dtype=torch.bool),
                                      probabilities, torch.Generator().manual_seed(0))
    assert single.item() == 0.0  # one present class: nothing to contrast


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 1])  # one block, and one query at a time
def test_negative_products_equal_gathered_dot_products_in_value_and_gradient(chunk_bytes, monkeypatch):
    from methods.action import NegativeProducts

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 6, generator=generator)
    negatives = torch.randint(50, (7, 9), generator=generator)  # repeated keys among and across queries
    anchors = torch.randn(7, 6, generator=generator, requires_grad=True)
    weights = torch.randn(7, 9, generator=generator)
    monkeypatch.setattr(NegativeProducts.forward, "__defaults__", (chunk_bytes,))
    products = negative_products(keys, negatives, anchors)
    expected = (keys[negatives] * anchors.unsqueeze(1)).sum(-1)
    assert torch.allclose(products, expected, atol=1e-6)
    (gradient,) = torch.autograd.grad((products * weights).sum(), anchors)
    (expected_gradient,) = torch.autograd.grad((expected * weights).sum(), anchors)
    assert torch.allclose(gradient, expected_gradient, atol=1e-5)
    with pytest.raises(ValueError, match="detach the keys"):
        negative_products(keys.requires_grad_(), negatives, anchors)


def test_cutmix_box_and_mixing_with_the_next_sample():
    generator = torch.Generator().manual_seed(0)
    masks = cutmix_keep_masks((3, 16, 12), generator)
    for mask in masks:
        removed = int((mask == 0).sum())
        assert abs(removed - 16 * 12 / 2) <= 16  # area H W / 2 up to the rounding of the height
    volumes = cutmix_keep_masks((1, 16, 16, 30), generator, depth=20)
    assert ((volumes[0] == 0).any(dim=(0, 1))).sum() == 20
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 16, 12)
    labels = torch.arange(3).view(3, 1, 1).expand(3, 16, 12)
    mixed_images, mixed_labels = mix_with_next(masks, images, labels)
    assert torch.equal(mixed_images[0, 0][masks[0] == 0], torch.ones(int((masks[0] == 0).sum())))
    assert torch.equal(mixed_labels[2][masks[2] == 0], torch.zeros(int((masks[2] == 0).sum()), dtype=torch.long))
    class_masks = classmix_keep_masks(torch.tensor([[[0, 1], [2, 3]]]), generator)
    assert int(class_masks.sum()) == 2  # half of the four present classes


# ---- gradient routing per stage --------------------------------------------------------------------------
def grads_of(model, term):
    model.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def prefixes(names):
    return {n.split(".")[0] + (".encoder" if n.startswith("net.encoder") else ".decoders" if n.startswith("net.decoders") else "")
            for n in names}


@pytest.mark.parametrize("dataset", ["synthetic_acdc", "synthetic_la"])
def test_stage_one_trains_encoder_and_global_heads_only(dataset):
    model = make_action("pretrain_global", dataset)
    losses = model.compute_losses(smoke_batch(dataset))
    assert set(losses) == {"latent", "loss"}
    # 3D: the latent x5_up passes through the decoder's first up-convolution, which upstream's V-Net trains.
    expected = {"net.encoder", "q_latent_head", "latent_predictor"} | ({"net.decoders"} if dataset == "synthetic_la" else set())
    assert prefixes(grads_of(model, losses["loss"])) == expected
    assert prefixes(n for n, p in model.named_parameters() if p.requires_grad) == expected
    if dataset == "synthetic_la":
        trained_decoder = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("net.decoders")}
        assert trained_decoder == {n for n, _ in model.named_parameters() if n.startswith("net.decoders.0.ups.0.")}
        frozen = make_action("pretrain_global", dataset, ["method.freeze_whole_decoder_in_stage_one=true"])
        assert not any(p.requires_grad for p in frozen.net.decoders.parameters())


@pytest.mark.parametrize("dataset", ["synthetic_acdc", "synthetic_la"])
def test_stage_two_terms_reach_what_they_should(dataset):
    model = make_action("pretrain_local", dataset)
    losses = model.compute_losses(smoke_batch(dataset))
    assert prefixes(grads_of(model, losses["latent"])) == {"net.encoder", "q_latent_head", "latent_predictor"} | (
        {"net.decoders"} if dataset == "synthetic_la" else set())  # 3D latent = x5_up, inside the decoder
    assert prefixes(grads_of(model, losses["output"])) == {"net.encoder", "net.decoders", "q_outputs_head", "outputs_predictor"}
    assert prefixes(grads_of(model, losses["supervised"])) == {"net.encoder", "net.decoders"}
    everything = grads_of(model, losses["loss"])
    assert not any(n.startswith(("teacher", "k_", "representation_head")) for n in everything)


@pytest.mark.parametrize("dataset", ["synthetic_acdc", "synthetic_la"])
def test_stage_three_terms_reach_what_they_should(dataset):
    model = make_action("finetune", dataset)
    losses = model.compute_losses(smoke_batch(dataset))
    assert set(losses) == {"supervised", "unsupervised", "reco", "loss"}
    assert losses["reco"].item() > 0
    assert prefixes(grads_of(model, losses["reco"])) == {"net.encoder", "net.decoders", "representation_head"}
    assert prefixes(grads_of(model, losses["supervised"])) == {"net.encoder", "net.decoders"}
    if losses["unsupervised"].requires_grad:  # zero without a pixel of positive CE; random weights give some
        assert prefixes(grads_of(model, losses["unsupervised"])) <= {"net.encoder", "net.decoders"}
    trainable = prefixes(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == {"net.encoder", "net.decoders", "representation_head"}


@pytest.mark.parametrize("weights", [(1.0, 0.01), (0.0, 0.01), (0.5, 0.0)])
def test_stage_three_total_weighs_the_pseudo_label_and_contrast_terms(weights):
    pseudo_label_weight, reco_weight = weights
    model = make_action("finetune", "synthetic_acdc", [f"method.pseudo_label_weight={pseudo_label_weight}",
                                                        f"method.reco_weight={reco_weight}", "method.strong_threshold=0.3"])
    losses = model.compute_losses(smoke_batch("synthetic_acdc"))
    expected = losses["supervised"] + pseudo_label_weight * losses["unsupervised"] + reco_weight * losses["reco"]
    assert losses["unsupervised"].item() > 0 and losses["reco"].item() > 0
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_faithful_undetached_targets_train_the_key_heads():
    model = make_action("pretrain_local", overrides=["method.undetached_teacher_targets=true"])
    losses = model.compute_losses(smoke_batch("synthetic_acdc"))
    assert "k_latent_head" in prefixes(grads_of(model, losses["latent"]))
    assert "k_outputs_head" in prefixes(grads_of(model, losses["output"]))
    assert not any(n.startswith("teacher") for n in grads_of(model, losses["loss"]))


def test_literal_reshape_keeps_upstreams_shapes_and_differs_from_the_intended_loss():
    intended, literal = make_action("pretrain_local"), make_action("pretrain_local", overrides=["method.literal_local_reshape=true"])
    literal.load_state_dict(intended.state_dict())
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    loss_intended, keys_intended = intended.local_loss(student, teacher)
    loss_literal, keys_literal = literal.local_loss(student, teacher)
    assert keys_intended.shape == keys_literal.shape == (2, 4, 64)
    # Intended: keys[b, p] is the teacher embedding of window p of sample b.
    window = teacher[1:2, :, 0:16, 8:24]  # sample 1, window (0, 8): the second window
    assert torch.allclose(keys_intended[1, 1], intended.k_outputs_head(window).flatten(), atol=1e-6)
    assert not torch.allclose(keys_intended, keys_literal)
    assert loss_intended.item() != pytest.approx(loss_literal.item())


# ---- views -----------------------------------------------------------------------------------------------
def test_views_of_the_distillation_stages():
    sure = ["method.jitter_probability=1.0", "method.blur_probability=1.0"]
    images = torch.rand(2, 1, 32, 32)
    student, teacher = make_action("pretrain_global", overrides=[*sure, "method.augment_view=student"]).distillation_views(images)
    assert torch.equal(teacher, images) and not torch.allclose(student, images)
    student, teacher = make_action("pretrain_global", overrides=[*sure, "method.augment_view=teacher"]).distillation_views(images)
    assert torch.equal(student, images) and not torch.allclose(teacher, images)
    student, teacher = make_action("pretrain_global", overrides=[*sure, "method.shared_augmented_view=true"]).distillation_views(images)
    assert torch.equal(student, teacher) and not torch.allclose(student, images)


def test_finetune_starts_the_teacher_from_the_student():
    model = make_action("finetune")
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    model.on_stage_start("pretrain_local")
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.module.state_dict().values(), model.net.state_dict().values()))


# ---- end to end --------------------------------------------------------------------------------------------
def run_cli(tmp_path: Path, *args: str) -> int:
    return main(["run", "--method", "action", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), *args])


@pytest.mark.parametrize("dataset", ["synthetic_acdc", "synthetic_la"])
def test_one_command_trains_all_three_stages_in_order_each_from_the_previous(tmp_path, dataset, monkeypatch):
    from benchmark import run as run_module

    chained = []
    original = run_module.init_stage

    def recording(model, checkpoint):
        previous = original(model, checkpoint)
        if checkpoint is not None:  # the stage starts from exactly the previous stage's final weights
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
            assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
        chained.append((model.stage, previous))
        return previous

    monkeypatch.setattr(run_module, "init_stage", recording)
    assert run_cli(tmp_path, "--dataset", dataset, "--ratio", "0.5") == 0
    assert chained == [("pretrain_global", None), ("pretrain_local", "pretrain_global"), ("finetune", "pretrain_local")]
    table = pd.read_csv(tmp_path / "lb" / f"{dataset}.csv")
    assert table["checkpoint"].tolist() == ["last", "best"] and (table["status"] == "ok").all()
    assert table["stages"][0] == "pretrain_global+pretrain_local+finetune" and table["stage_steps"][0] == "2+2+2"
    assert table["steps"][0] == 6
    run_dir = Path(table["run_dir"][0])
    for stage in ("pretrain_global", "pretrain_local", "finetune"):
        for name in ("config.yaml", "logs/metrics.csv", "checkpoints/last.ckpt"):
            assert (run_dir / stage / name).is_file(), (stage, name)
    result = json.loads((run_dir / "result.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["pretrain_global", "pretrain_local", "finetune"]
    stage_optim = [yaml.safe_load((run_dir / s / "config.yaml").read_text())["optim"] for s in ("pretrain_global", "finetune")]
    assert [optim["nesterov"] for optim in stage_optim] == [False, True]  # per_stage.finetune of the presets
    # One validation curve for the whole run: each stage's steps continue the previous stages' count.
    curve = pd.read_csv(tmp_path / "lb" / "curves" / dataset / f"{run_dir.name}.csv")
    assert curve["stage"].iloc[-1] == "finetune" and curve["step"].is_monotonic_increasing and curve["step"].iloc[-1] == 6


def test_one_stage_alone_from_a_checkpoint(tmp_path):
    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.5", "--set", "run.stages=[pretrain_global, pretrain_local]") == 0
    first = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    checkpoint = Path(first["run_dir"][0]) / "pretrain_local" / "checkpoints" / "last.ckpt"
    assert not (Path(first["run_dir"][0]) / "finetune").exists()
    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.5", "--set", "run.stages=finetune",
                   "--set", f"run.init_from={checkpoint}", "--set", "per_stage.finetune.trainer.max_steps=3") == 0
    table = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    alone = table.iloc[2:]
    assert alone["stages"].tolist() == ["finetune", "finetune"] and alone["stage_steps"].astype(str).tolist() == ["3", "3"]
    assert alone["config_hash"].nunique() == 1 and alone["config_hash"].iloc[0] != first["config_hash"][0]
    run_dir = Path(alone["run_dir"].iloc[0])
    assert (run_dir / "finetune" / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "pretrain_global").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "run.stages=finetune"], "no checkpoint was given"),
    (["--set", "run.stages=warmup"], "has no stage 'warmup'"),
    (["--set", "run.stages=[finetune, pretrain_global]", "--set", "run.init_from=/x"], "must name distinct stages in their order"),
    (["--set", "run.stages=finetune", "--set", "run.init_from=/nonexistent.ckpt"], "checkpoint not found"),
    (["--set", "per_stage.warmup.trainer.max_steps=3"], "has no stage 'warmup'"),
    (["--set", "per_stage.finetune.trainer.max_stepz=3"], "unknown config key"),
    (["--set", "method.queue_size=3"], "multiple of 4"),
])
def test_bad_stage_settings_give_one_message_and_exit_2(tmp_path, capsys, args, message):
    assert run_cli(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.5", *args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_stages_keep_identical_memory_banks_on_every_rank(tmp_path):
    run_two_rank_script("ddp_queue_check.py", tmp_path, master_port=29537)
    records = json.loads((tmp_path / "queues.json").read_text())
    assert [r["stage"] for r in records] == ["pretrain_local"]
    for record in records:
        assert record["world_size"] == 2
        rank0, rank1 = record["ranks"]
        assert rank0 == rank1  # every rank enqueued the keys of the whole global batch
        assert rank0[2] == 0  # 2 stages x 3 steps x 4 gathered keys = 24 into K = 8 (2 keys per rank alone: 4)
    assert len(list((tmp_path / "runs").rglob("result.json"))) == 1


@pytest.mark.parametrize("dims, shape, latent_size", [(2, (32, 32), (2, 2)), (3, (32, 32, 16), (4, 4, 2))])
def test_forward_features_returns_the_decoder_maps_and_the_same_logits(dims, shape, latent_size):
    from methods.networks import build_network

    net = build_network(dims, 1, 3, base_features=4).eval()
    images = torch.rand(1, 1, *shape)
    logits, levels = net.forward_features(images)
    assert torch.equal(logits, net(images))
    assert [level.shape[1] for level in levels] == net.decoders[0].feature_channels
    assert tuple(levels[0].shape[2:]) == latent_size  # 2D: the bottleneck; 3D: x5_up, one level up
    assert tuple(levels[-1].shape[2:]) == shape


@pytest.mark.parametrize("dataset", ["synthetic_acdc", "synthetic_la"])
def test_all_faithful_flags_together_train_every_stage(dataset):
    flags = ["method.literal_local_reshape=true", "method.shared_augmented_view=true", "method.undetached_teacher_targets=true"]
    for stage in ("pretrain_global", "pretrain_local", "finetune"):
        model = make_action(stage, dataset, flags)
        loss = model.compute_losses(smoke_batch(dataset))["loss"]
        assert torch.isfinite(loss) and loss.requires_grad
        loss.backward()


# ---- upstream behaviours and their flags ---------------------------------------------------------------------
def test_key_heads_start_from_their_own_initialisation_and_move_by_ema():
    model = make_action("pretrain_global")
    query, key = model.q_latent_head, model.k_latent_head.module
    assert not torch.allclose(query[2].weight, key[2].weight)
    before = key[2].weight.clone()
    model.update_teacher()
    decay = model.hp["ema_decay"]
    assert torch.allclose(key[2].weight, decay * before + (1 - decay) * query[2].weight, atol=1e-7)
    copied = make_action("pretrain_global", overrides=["method.key_heads_copy_query=true"])
    assert torch.equal(copied.q_latent_head[2].weight, copied.k_latent_head.module[2].weight)


def test_supervised_dice_includes_the_background_unless_told_not_to():
    logits, labels = torch.randn(2, 2, 8, 8, 4), torch.randint(0, 2, (2, 8, 8, 4))
    upstream = make_action("pretrain_local", "synthetic_la").supervised_loss(logits, labels)
    foreground = make_action("pretrain_local", "synthetic_la", ["method.dice_include_background=false"]).supervised_loss(logits, labels)
    probabilities, onehot = torch.softmax(logits, 1), torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).float()
    dice = 1 - (2 * (probabilities * onehot).sum((0, 2, 3, 4)) + 1e-5) / (
        (probabilities ** 2).sum((0, 2, 3, 4)) + (onehot ** 2).sum((0, 2, 3, 4)) + 1e-5)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert upstream.item() == pytest.approx((0.5 * (ce + dice.mean())).item(), rel=1e-5)
    assert foreground.item() == pytest.approx((0.5 * (ce + dice[1])).item(), rel=1e-5)


def test_finetune_runs_the_student_once_per_stream_unless_joint():
    batch = smoke_batch("synthetic_acdc")
    overrides = ["method.mix=none", "method.jitter_probability=0", "method.blur_probability=0", "method.finetune_isd_call=false",
                 "model.dropout=false"]
    separate = make_action("finetune", overrides=overrides)
    joint = make_action("finetune", overrides=[*overrides, "method.finetune_joint_pass=true"])
    joint.load_state_dict(separate.state_dict())
    labeled = batch["labeled"]["image"]
    with torch.no_grad():
        alone = separate.net(labeled)
        assert not torch.allclose(alone, joint.net(torch.cat([labeled, batch["unlabeled"]["image"]]))[:2], atol=1e-4)
    calls = []
    separate.net.encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    losses = separate.compute_losses(batch)
    # the student's encoder (the teacher has its own copy) on 2 labeled, then on 2 unlabeled images
    assert calls == [2, 2]
    expected = separate.supervised_loss(separate.net.forward_features(labeled)[0], batch["labeled"]["label"])
    assert losses["supervised"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["supervised"].item() != pytest.approx(joint.compute_losses(batch)["supervised"].item(), rel=1e-4)


def test_isd_call_of_2d_finetuning_moves_the_teacher_before_backward():
    batch = smoke_batch("synthetic_acdc")
    plain = make_action("finetune", overrides=["method.finetune_isd_call=false"])
    called = make_action("finetune")  # the ACDC preset (2D) sets it, as train_2D_action.py does
    assert called.hp["finetune_isd_call"] and not make_action("finetune", "synthetic_la").hp["finetune_isd_call"]
    called.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p in called.net.parameters():
            p.add_(0.1)
    called.teacher.n_averaged.fill_(1)  # as after stages 1-2 (a fresh AveragedModel copies on its first update)
    teacher_before = [p.clone() for p in called.teacher.module.parameters()]
    called.compute_losses(batch)
    decay = called.hp["ema_decay"]
    for before, after, student in zip(teacher_before, called.teacher.module.parameters(), called.net.parameters()):
        assert torch.allclose(after, decay * before + (1 - decay) * student, atol=1e-6)
    teacher_before = [p.clone() for p in plain.teacher.module.parameters()]
    plain.compute_losses(batch)
    assert all(torch.equal(b, a) for b, a in zip(teacher_before, plain.teacher.module.parameters()))


# ---- the representation head at the query pixels only ---------------------------------------------------------
@pytest.mark.parametrize("dims, shape", [(2, (32, 32)), (3, (32, 32, 16))])
def test_head_at_chosen_pixels_equals_the_dense_head_in_value_and_gradient(dims, shape):
    from methods.components.hypercolumn_head import HypercolumnHead
    from methods.networks import build_network

    torch.manual_seed(0)
    net = build_network(dims, 1, 3, base_features=4)
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    channels = sum(net.decoders[0].feature_channels)
    head = torch.nn.Sequential(conv(channels, 6, 3, padding=1, bias=False), conv(6, 6, 1))
    _, levels = net.forward_features(torch.rand(2, 1, *shape))
    mode = "bilinear" if dims == 2 else "trilinear"
    dense = head(torch.cat([torch.nn.functional.interpolate(level, size=shape, mode=mode, align_corners=True)
                            for level in levels], dim=1))
    total = 2 * math.prod(shape)
    corners = torch.tensor([0, shape[-1] - 1, math.prod(shape) - 1, total - 1])  # image borders: the conv's padding
    pixels = torch.cat([corners, torch.randint(total, (60,))])
    sparse = HypercolumnHead(levels, shape, head).at(pixels)
    expected = dense.movedim(1, -1).reshape(-1, 6)[pixels]
    assert torch.allclose(sparse, expected, atol=1e-5)
    weights = torch.randn_like(sparse)
    inputs = [*levels, *head.parameters()]
    sparse_grads = torch.autograd.grad((sparse * weights).sum(), inputs, retain_graph=True)
    dense_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    for a, b in zip(sparse_grads, dense_grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dims, shape, channels_last", [(2, (64, 48), False), (2, (64, 64), True), (3, (32, 32, 16), False)])
def test_head_at_every_pixel_without_gradient_equals_the_upsampled_hypercolumn_head(dims, shape, channels_last, monkeypatch):
    from methods.components import hypercolumn_head
    from methods.components.hypercolumn_head import HypercolumnHead
    from methods.networks import build_network

    torch.manual_seed(0)
    net = build_network(dims, 1, 3, base_features=4)
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    representation = 16
    head = torch.nn.Sequential(conv(sum(net.decoders[0].feature_channels), representation, 3, padding=1, bias=False),
                               conv(representation, representation, 1))
    images = torch.rand(2, 1, *shape)
    if channels_last:
        net, head, images = (x.to(memory_format=torch.channels_last) for x in (net, head, images))
    with torch.no_grad():
        _, levels = net.forward_features(images)
    mode = "bilinear" if dims == 2 else "trilinear"
    expected = head(torch.cat([torch.nn.functional.interpolate(level, size=shape, mode=mode, align_corners=True)
                               for level in levels], dim=1))
    # both ways of computing a level's part are exercised: projected then interpolated, and upsampled then convolved
    separable = [hypercolumn_head._separable_cost(level.shape[1], level.shape[2:], shape, representation, 3)
                 < hypercolumn_head._direct_cost(level.shape[1], level.shape[2:], shape, representation, 3) for level in levels]
    assert any(separable) and not all(separable)
    dense = HypercolumnHead(levels, shape, head).dense()
    assert dense.shape == expected.shape and not dense.requires_grad
    assert torch.allclose(dense, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(hypercolumn_head, "SEPARABLE_CHUNK_BYTES", 1)  # one sample at a time
    assert torch.allclose(HypercolumnHead(levels, shape, head).dense(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dataset", ["synthetic_acdc", "synthetic_la"])
def test_finetune_losses_and_gradients_equal_the_dense_representation(dataset):
    batch = smoke_batch(dataset)
    overrides = ["model.dropout=false", "method.strong_threshold=0.99"]
    sparse = make_action("finetune", dataset, overrides)
    dense = make_action("finetune", dataset, [*overrides, "method.dense_representation=true"])
    dense.load_state_dict(sparse.state_dict())
    sparse_losses, dense_losses = sparse.compute_losses(batch), dense.compute_losses(batch)
    assert sparse_losses["reco"].item() > 0
    for name in dense_losses:
        assert sparse_losses[name].item() == pytest.approx(dense_losses[name].item(), rel=1e-5), name
    sparse_losses["loss"].backward()
    dense_losses["loss"].backward()
    # Float-order noise relative to the step's gradients: a conv bias followed by BatchNorm has gradient 0 in exact
    # arithmetic and ~1e-8 noise in either path.
    scale = max(b.grad.abs().max().item() for b in dense.parameters() if b.grad is not None)
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters()):
        if b.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale), name


def test_upstreams_3d_test_normalises_each_patch_with_its_own_statistics():
    # code/test_3D.py never calls net.eval(): each sliding-window patch (batch 1) gets its own BatchNorm statistics;
    # test_2D.py calls eval(). So the LA paper preset turns the flag on and the ACDC one does not.
    from benchmark.config import resolve_config
    from methods.registry import get_method
    from tests.method_helpers import upstream_reference

    def flag(dataset, profile):
        config = resolve_config(dataset, "action", profile, [], get_method("action").defaults, family=dataset)
        return config["method"]["batch_statistics_at_test"]

    assert flag("la", "paper") and not flag("acdc", "paper") and not flag("la", "cpu")
    model = make_action("finetune", "synthetic_la", ["method.batch_statistics_at_test=true", "model.dropout=false"])
    model.net(torch.randn(2, 1, 32, 32, 16) * 2 + 1)  # training mode: running statistics away from 0 / 1
    model.eval()
    patches = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.predict_logits(patches), upstream_reference(model.net, patches), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.predict_logits(patches), model.net(patches), atol=1e-3)
