"""Mean Teacher and UA-MT: the EMA rule, each loss term by hand, gradient routing, DDP teacher agreement."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from benchmark.config import PROFILES, resolve_config
from datamodules import DATASETS, get_dataset
from methods.components.ema import make_ema_teacher, ssl4mis_ema
from methods.registry import get_method
from tests.conftest import run_two_rank_script
from tests.method_helpers import build_method, random_batch


def test_ema_follows_ssl4mis_alpha():
    student = torch.nn.Linear(1, 1, bias=False)
    teacher = make_ema_teacher(student, decay=0.99)
    values = [2.0, 4.0, 8.0, 16.0]
    expected = None
    for n, value in enumerate(values):
        student.weight.data.fill_(value)
        teacher.update_parameters(student)
        alpha = min(1 - 1 / (n + 1), 0.99)  # SSL4MIS update_ema_variables at iter_num = n
        expected = value if expected is None else alpha * expected + (1 - alpha) * value
        assert teacher.module.weight.item() == pytest.approx(expected)
    assert ssl4mis_ema(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1000), 0.99).item() == pytest.approx(0.99)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_mean_teacher_consistency_by_hand():
    model = build_method("mean_teacher", overrides=["method.noise_std=0.0"], patch=(32, 32))
    model.train()
    unlabeled = torch.rand(2, 1, 32, 32)
    student_logits = torch.randn(2, 4, 32, 32)
    torch.manual_seed(0)
    got = model.consistency_loss(student_logits, unlabeled)
    torch.manual_seed(0)  # the same dropout draw for the teacher pass
    with torch.no_grad():
        teacher = torch.softmax(model.teacher(unlabeled), 1)
    expected = ((torch.softmax(student_logits, 1) - teacher) ** 2).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_noise_is_clamped_and_differs_per_rank_and_step():
    model = build_method("mean_teacher", overrides=["method.noise_std=10.0"], patch=(32, 32))
    images = torch.zeros(1, 1, 8, 8)
    noisy = model.teacher_input(images)
    assert noisy.abs().max().item() == pytest.approx(0.2)
    assert torch.equal(noisy, model.teacher_input(images))  # same (seed, rank, step)
    model.config["run"]["seed"] = 1
    assert not torch.equal(noisy, model.teacher_input(images))


@pytest.mark.parametrize("name", ["mean_teacher", "ua_mt"])
def test_consistency_term_trains_the_student_not_the_teacher(name):
    # UA-MT: the threshold at its largest (ln C) so that an untrained teacher's uncertain pixels still count.
    extra = ["method.threshold_start=1.0", "method.threshold_end=1.0"] if name == "ua_mt" else []
    model = build_method(name, overrides=["method.consistency_start_step=0", *extra], patch=(32, 32))
    model.train()
    unlabeled = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # make the teacher differ from the student so the consistency is non-zero
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = model.consistency_loss(model.net(unlabeled), unlabeled)
    assert loss.item() > 0
    loss.backward()
    reached = [n for n, p in model.net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("encoder") for n in reached) and any(n.startswith("decoders.0") for n in reached)
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("name", ["mean_teacher", "ua_mt"])
def test_the_student_pass_over_both_streams_is_one_batch_unless_asked_per_stream(name):
    # One pass (upstream) normalises the labeled images with BatchNorm statistics of labeled + unlabeled; one pass
    # per stream gives the labeled images exactly the supervised-only forward on the same weights and dropout draw.
    batch = random_batch(build_method(name, patch=(32, 32)), n_labeled=2, n_unlabeled=2,
                         generator=torch.Generator().manual_seed(0))
    images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
    supervised = {}
    for joint in (True, False):
        model = build_method(name, overrides=[f"method.joint_student_pass={str(joint).lower()}"], patch=(32, 32))
        model.train()
        torch.manual_seed(1)
        supervised[joint] = model.compute_losses(batch)["supervised"]
        torch.manual_seed(1)
        alone = model.supervised_loss(model.net(images), labels)
    assert torch.equal(supervised[False], alone)
    assert not torch.allclose(supervised[True], alone)


def test_teacher_is_updated_after_each_step():
    model = build_method("mean_teacher", patch=(32, 32))
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    model.on_train_batch_end(None, None, 0)  # the first update copies the student
    after = list(model.teacher.parameters())
    assert all(torch.allclose(a, s) for a, s in zip(after, model.net.parameters()))
    assert not all(torch.allclose(a, b) for a, b in zip(after, before))


def test_consistency_weight_schedule():
    model = build_method("mean_teacher", overrides=["method.consistency_start_step=10", "method.consistency_rampup=40.0"],
                         patch=(32, 32))
    assert model.consistency_weight() == 0.0  # step 0 < start
    model.hp = dataclasses.replace(model.hp, consistency_start_step=0)
    assert model.consistency_weight() == pytest.approx(0.1 * math.exp(-5))


def test_consistency_ramp_up_over_a_fraction_of_the_run():
    # The endoscopy paper presets ramp over the whole run (fraction 1.0) whatever each set's budget; the weight
    # then follows the step itself, not SSL4MIS's step // 150.
    from unittest import mock

    model = build_method("mean_teacher", overrides=["method.consistency_start_step=0", "trainer.max_steps=1000",
                                                    "method.consistency_rampup_fraction=1.0"], patch=(32, 32))
    with mock.patch.object(type(model), "global_step", new_callable=mock.PropertyMock) as step:
        step.return_value = 149  # 149 // 150 = 0 would give exp(-5); by steps it is exp(-5 (1 - 0.149)^2)
        assert model.consistency_weight() == pytest.approx(0.1 * math.exp(-5 * (1 - 0.149) ** 2))
        step.return_value = 1000
        assert model.consistency_weight() == pytest.approx(0.1)


def test_ua_mt_threshold_uses_ln_classes_or_the_faithful_ln2():
    model = build_method("ua_mt", patch=(32, 32))
    assert model.uncertainty_threshold() == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(4))
    model.hp = dataclasses.replace(model.hp, entropy_of_two_classes=True)
    assert model.uncertainty_threshold() == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))


def test_ua_mt_masked_consistency_by_hand(monkeypatch):
    model = build_method("ua_mt", overrides=["method.noise_std=0.0"], patch=(32, 32))
    model.eval()  # deterministic teacher
    unlabeled = torch.rand(1, 1, 32, 32)
    uncertainty = torch.full((1, 1, 32, 32), 10.0)
    uncertainty[..., :16] = 0.0  # certain on the left half only
    monkeypatch.setattr(model, "teacher_uncertainty", lambda x, generator: uncertainty)
    student_logits = torch.randn(1, 4, 32, 32)
    got = model.consistency_loss(student_logits, unlabeled)
    with torch.no_grad():
        teacher = torch.softmax(model.teacher(unlabeled), 1)
    distance = (torch.softmax(student_logits, 1) - teacher) ** 2
    expected = distance[..., :16].sum() / (2 * 32 * 16)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ua_mt_uncertainty_is_the_entropy_of_the_mean_of_t_passes(monkeypatch):
    model = build_method("ua_mt", patch=(32, 32))
    outputs = iter([torch.log(torch.tensor([0.9, 0.1])).reshape(1, 2, 1, 1).repeat(2, 1, 1, 1),
                    torch.log(torch.tensor([0.5, 0.5])).reshape(1, 2, 1, 1).repeat(2, 1, 1, 1)])
    monkeypatch.setattr(model.teacher, "forward", lambda x: next(outputs))
    model.hp = dataclasses.replace(model.hp, uncertainty_passes=4)
    entropy = model.teacher_uncertainty(torch.zeros(1, 1, 1, 1), model.step_generator())
    mean = torch.tensor([0.7, 0.3])
    assert entropy.item() == pytest.approx(-(mean * torch.log(mean + 1e-6)).sum().item(), rel=1e-5)


def test_ua_mt_draws_new_teacher_noise_for_every_pass(monkeypatch):
    # Upstream draws a fresh randn_like for the consistency input and for each of the T/2 doubled passes; one
    # step's stream re-seeded per call would give all T/2 passes the same noise and understate the uncertainty.
    model = build_method("ua_mt", patch=(8, 8))
    model.train()
    inputs = []

    def record(x):
        inputs.append(x.clone())
        return torch.zeros(x.shape[0], 4, *x.shape[2:])

    monkeypatch.setattr(model.teacher, "forward", record)
    unlabeled = torch.zeros(2, 1, 8, 8)
    model.consistency_loss(torch.zeros(2, 4, 8, 8), unlabeled)
    copies = [inputs[0]] + [half for doubled in inputs[1:] for half in doubled.chunk(2)]
    assert len(inputs) == 1 + 4 and len(copies) == 9  # the consistency pass, then T/2 passes of two copies
    assert all(not torch.equal(a, b) for i, a in enumerate(copies) for b in copies[i + 1:])
    assert all(c.abs().max() <= 0.2 + 1e-6 for c in copies)


def test_ua_mt_consistency_has_no_delay_on_any_dataset_or_profile():
    # SSL4MIS's UA-MT 2D script has no `iter_num < 1000` switch; its Mean Teacher 2D script has.
    for dataset in DATASETS:
        for profile in PROFILES:
            config = resolve_config(dataset, "ua_mt", profile, [], get_method("ua_mt").defaults,
                                    family=get_dataset(dataset).family)
            assert config["method"]["consistency_start_step"] == 0, (dataset, profile)
    teacher = resolve_config("acdc", "mean_teacher", "paper", [], get_method("mean_teacher").defaults, family="acdc")
    assert teacher["method"]["consistency_start_step"] == 1000


@pytest.mark.slow
def test_two_process_ddp_teacher_is_identical_on_every_rank(tmp_path):
    run_two_rank_script("ddp_teacher_check.py", tmp_path, master_port=29533, timeout=300)
    checksums = json.loads((tmp_path / "checksums.json").read_text())
    assert checksums["world_size"] == 2
    assert checksums["teacher"][0] == checksums["teacher"][1]
    rows = (tmp_path / "lb" / "synthetic_acdc.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + last + best, written by rank 0 only
    assert len(list((tmp_path / "runs").rglob("config.yaml"))) == 1
