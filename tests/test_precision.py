"""Mixed precision: every method's first step under bf16 autocast agrees with float32, and the float32 islands
(methods/losses/precision.py) are float32 under autocast.

Tolerances. bfloat16 keeps 8 significant bits: a rounding error of up to 2^-9 = 0.2 % per operation, about three
significant digits. A step's loss is a mean over many pixels, so its rounding errors average out: it must agree
within 1 % (2.5 bfloat16 spacings). ACTION's distillation stages divide cosine similarities by a teacher temperature
of 0.01: the 0.2 % rounding of the (bfloat16) network features becomes a logit error of order 0.1-1, so their loss
only agrees within 10 %. A gradient is a sum of many per-pixel terms that largely cancel, so its relative error is
far larger than one rounding: its direction must agree (cosine >= 0.9) and its norm within 35 %. The inputs are
smooth images whose labels follow their intensity, so the gradient is a coherent signal, not the cancelling noise
of uniform random labels.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from methods.action import distillation_kl, similarity_logits
from methods.components.class_statistics import RunningClassMean
from methods.components.ema import make_ema_teacher
from methods.components.memory_bank import MemoryQueue
from methods.losses import SupervisedSegmentationLoss
from methods.losses.consistency import mutual_consistency_loss
from methods.losses.contrastive import (
    info_nce_all_keys,
    info_nce_shared_negatives,
    l1_pixel_nce_within_image,
    sim_max_loss,
    sim_min_loss,
)
from methods.losses.precision import float32_island, to_float32
from methods.networks import build_network
from methods.registry import get_method, method_names
from tests.method_helpers import build_method, random_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOSS_RTOL = 1e-2
SHARP_TEACHER_LOSS_RTOL = 1e-1  # ACTION's distillation stages (teacher temperature 0.01, see the module docstring)
GRADIENT_MIN_COSINE = 0.9
GRADIENT_NORM_RTOL = 0.35


def bf16_autocast(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def coherent_batch(model):
    """Smooth Gaussian images; labels are intensity bands of the first channel (a learnable signal)."""
    batch = random_batch(model, generator=torch.Generator().manual_seed(1))
    for stream in batch.values():
        stream["image"] = 3 * F.avg_pool2d(stream["image"], 5, stride=1, padding=2)
    bands = torch.linspace(-0.4, 0.4, model.spec.num_classes - 1)
    batch["labeled"]["label"] = torch.bucketize(batch["labeled"]["image"][:, 0], bands)
    return batch


def first_step(name: str, stage: str, autocast: bool):
    model = build_method(name, "synthetic_acdc", stage=stage)
    batch = coherent_batch(model)
    torch.manual_seed(3)  # the same dropout masks in both precisions
    with bf16_autocast(autocast):
        losses = model.compute_losses(batch)
    losses["loss"].backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return model, losses, gradient


@pytest.mark.parametrize("name, stage", [(name, stage) for name in method_names() for stage in get_method(name).stages])
def test_bf16_first_step_agrees_with_float32(name, stage):
    _, reference, reference_gradient = first_step(name, stage, autocast=False)
    model, mixed, mixed_gradient = first_step(name, stage, autocast=True)
    for term, value in mixed.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.dtype in (torch.float32, torch.float64), f"{name}/{stage}: term {term} is {value.dtype} under autocast"
    rtol = SHARP_TEACHER_LOSS_RTOL if name == "action" and stage != "finetune" else LOSS_RTOL
    assert float(mixed["loss"].detach()) == pytest.approx(float(reference["loss"].detach()), rel=rtol)
    assert mixed_gradient.shape == reference_gradient.shape
    assert F.cosine_similarity(mixed_gradient, reference_gradient, dim=0) >= GRADIENT_MIN_COSINE
    assert float(mixed_gradient.norm()) == pytest.approx(float(reference_gradient.norm()), rel=GRADIENT_NORM_RTOL)
    # Weights, EMA teachers, memory banks and running statistics stay float32 under autocast.
    assert {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} == {torch.float32}


def test_bf16_first_step_differs_from_float32():
    """The comparison above sees the autocast at all: the two losses are not bit-identical."""
    _, reference, _ = first_step("supervised", "train", autocast=False)
    _, mixed, _ = first_step("supervised", "train", autocast=True)
    assert float(mixed["loss"].detach()) != float(reference["loss"].detach())


# ---- the islands: float32 out, and exactly the float32 computation on the (rounded) inputs ------------------
def _embeddings(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


ISLANDS = {
    "similarity_logits_t0.07": lambda: similarity_logits(_embeddings(64, 32), _embeddings(256, 32, seed=1), 0.07),
    "distillation_kl": lambda: distillation_kl(_embeddings(16, 64) * 10, _embeddings(16, 64, seed=1) * 10),
    "info_nce_all_keys_t0.07": lambda: info_nce_all_keys(F.normalize(_embeddings(32, 16).float(), dim=1).bfloat16(),
                                                         F.normalize(_embeddings(48, 16, seed=1).float(), dim=1).bfloat16(),
                                                         torch.arange(32), 0.07),
    "info_nce_shared_negatives": lambda: info_nce_shared_negatives(_embeddings(32, 16), _embeddings(16, seed=1),
                                                                   _embeddings(64, 16, seed=2), 0.1),
    "l1_pixel_nce_within_image_t0.07": lambda: l1_pixel_nce_within_image(_embeddings(2, 8, 8, 8),
                                                                         _embeddings(2, 8, 8, 8, seed=1), 0.07),
    "sim_max_loss": lambda: sim_max_loss(_embeddings(8, 32)),
    "sim_min_loss": lambda: sim_min_loss(_embeddings(8, 32), _embeddings(8, 32, seed=1)),
    "supervised_ce_dice": lambda: SupervisedSegmentationLoss()(_embeddings(2, 4, 16, 16), torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(0))),
    "mutual_consistency": lambda: mutual_consistency_loss(
        [torch.softmax(_embeddings(2, 4, 16, 16, seed=s).float(), 1).bfloat16() for s in range(3)], 0.1),
}


@pytest.mark.parametrize("name", sorted(ISLANDS))
def test_island_returns_float32_under_autocast(name):
    with bf16_autocast():
        value = ISLANDS[name]()
    assert value.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(ISLANDS))
def test_island_computes_what_float32_computes_on_the_same_inputs(name):
    """Inside an island the bfloat16 inputs are only widened: the result equals the float32 run without autocast on
    the same (bfloat16-rounded) inputs."""
    with bf16_autocast():
        mixed = ISLANDS[name]()
    reference = ISLANDS[name]()  # no autocast: the islands widen their inputs the same way
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-7)


def test_without_the_island_autocast_would_change_a_sharp_similarity():
    """Why the islands exist: the same cosine similarity at temperature 0.07 computed under autocast (bfloat16
    matrix product) is off by far more than float32 rounding."""
    anchors, bank = _embeddings(64, 32).float(), _embeddings(256, 32, seed=1).float()
    unguarded = similarity_logits.__wrapped__
    with bf16_autocast():
        mixed = unguarded(anchors, bank, 0.07)
    reference = unguarded(anchors, bank, 0.07)
    assert mixed.dtype == torch.bfloat16
    assert (mixed.float() - reference).abs().max() > 1e-2


def test_float32_island_widens_nested_half_tensors_only():
    seen = {}

    @float32_island
    def probe(tensors, *, mapping, scale):
        seen.update(list_dtypes=[t.dtype for t in tensors], mapping_dtype=mapping["x"].dtype, scale=scale,
                    autocast=torch.is_autocast_enabled("cpu"))
        return tensors[0] @ tensors[0]

    half, double, labels = torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.long)
    with bf16_autocast():
        result = probe([half, double, labels], mapping={"x": torch.ones(1, dtype=torch.float16)}, scale=0.5)
    assert seen == {"list_dtypes": [torch.float32, torch.float64, torch.long], "mapping_dtype": torch.float32,
                    "scale": 0.5, "autocast": False}
    assert result.dtype == torch.float32
    assert torch.is_autocast_enabled("cpu") is False  # restored on leaving (the test's own context has closed)
    assert to_float32((half,))[0].dtype == torch.float32


def test_gradient_flows_back_through_the_island_to_bfloat16_inputs():
    features = _embeddings(8, 16).requires_grad_()
    sim_max_loss(features).backward()
    assert features.grad is not None and features.grad.dtype == torch.bfloat16 and features.grad.abs().sum() > 0


def test_decoders_return_float32_logits_under_autocast():
    for dims, shape in ((2, (1, 1, 32, 32)), (3, (2, 1, 16, 16, 16))):
        net = build_network(dims, 1, 3, base_features=4)
        with bf16_autocast():
            logits = net(torch.randn(shape))
            all_logits = net.forward_all(torch.randn(shape))
        assert logits.dtype == torch.float32 and all(x.dtype == torch.float32 for x in all_logits)


# ---- running statistics stay float32 ----------------------------------------------------------------------
def test_ema_teacher_queue_and_class_statistics_stay_float32_under_autocast():
    student = torch.nn.Linear(4, 4)
    teacher = make_ema_teacher(student, 0.99)
    queue = MemoryQueue(8, (4,))
    statistics = RunningClassMean(3, momentum=0.9)
    with bf16_autocast():
        for _ in range(2):
            teacher.update_parameters(student)
            queue.enqueue(torch.randn(4, 4).bfloat16())
            statistics.update_marginal(torch.softmax(torch.randn(2, 3, 4, 4), 1).bfloat16())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert queue.keys.dtype == torch.float32 and statistics.value.dtype == torch.float32
    # The EMA of two identical students is the student itself, exactly (no bfloat16 rounding on the way).
    torch.testing.assert_close(teacher.module.weight, student.weight, rtol=0, atol=0)


# ---- trainer.precision: checked values, and auto ------------------------------------------------------------
def smoke_config(method: str = "supervised", *overrides: str) -> dict:
    from benchmark.config import resolve_config

    return resolve_config("synthetic_acdc", method, "smoke", list(overrides), get_method(method).defaults,
                          family=get_dataset("synthetic_acdc").family)


def get_dataset(name):
    from datamodules import get_dataset as lookup

    return lookup(name)


@pytest.mark.parametrize("value, canonical", [("32-true", "32-true"), (32, "32-true"), ("32", "32-true"),
                                              ("bf16-mixed", "bf16-mixed"), ("16-mixed", "16-mixed"), ("auto", "auto")])
def test_accepted_precisions(value, canonical):
    from benchmark.precision import requested_precision

    config = smoke_config("supervised")
    config["trainer"]["precision"] = value  # as a config file may hold it (an override must be a string)
    assert requested_precision(config) == canonical


@pytest.mark.parametrize("value", ["bf16-true", "16-true", "bf16", "fp16", "64-true"])
def test_other_precisions_are_refused_with_one_message(value):
    from benchmark.precision import requested_precision
    from core.errors import UserError

    # The config schema refuses it when the config is resolved; the precision check refuses it in a config file.
    with pytest.raises(UserError, match="trainer.precision must be one of"):
        smoke_config("supervised", f"trainer.precision={value}")
    config = smoke_config("supervised")
    config["trainer"]["precision"] = value
    with pytest.raises(UserError, match="unknown trainer.precision"):
        requested_precision(config)


def test_auto_is_refused_for_a_multi_device_run():
    from benchmark.precision import requested_precision
    from core.errors import UserError

    with pytest.raises(UserError, match="auto measures one process"):
        requested_precision(smoke_config("supervised", "trainer.precision=auto", "trainer.devices=2"))


@pytest.mark.parametrize("mixed_seconds, expected", [(0.5, "bf16-mixed"), (0.95, "32-true"), (1.5, "32-true")])
def test_auto_picks_mixed_only_when_clearly_faster(monkeypatch, capsys, mixed_seconds, expected):
    import benchmark.precision as precision

    monkeypatch.setattr(precision, "step_seconds", lambda *args, **kwargs: {"32-true": 1.0, "bf16-mixed": mixed_seconds})
    config = smoke_config("supervised", "trainer.precision=auto")
    assert precision.chosen_precision(config, get_method("supervised"), get_dataset("synthetic_acdc").spec, False) == expected
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and f"picked {expected}" in printed[0] and "1.000 s in 32-true" in printed[0]


def test_auto_probe_times_both_precisions_of_the_runs_own_step():
    from benchmark.precision import step_seconds

    config = smoke_config("mean_teacher")
    seconds = step_seconds(get_method("mean_teacher"), get_dataset("synthetic_acdc").spec, config, True,
                           ["32-true", "bf16-mixed"], steps=1)
    assert set(seconds) == {"32-true", "bf16-mixed"} and all(value > 0 for value in seconds.values())


def test_the_config_hash_covers_the_request_not_the_machines_choice():
    from benchmark.config import config_hash

    auto = smoke_config("supervised", "trainer.precision=auto")
    hashes = {config_hash({**auto, "trainer": {**auto["trainer"], "precision_chosen": choice}})
              for choice in ("32-true", "bf16-mixed")}
    assert hashes == {config_hash(auto)}
    assert config_hash(smoke_config("supervised", "trainer.precision=bf16-mixed")) != config_hash(auto)


def test_a_resumed_auto_run_keeps_its_first_choice(tmp_path, monkeypatch):
    import benchmark.precision as precision

    (tmp_path / "config.yaml").write_text("trainer:\n  precision: auto\n  precision_chosen: bf16-mixed\n")
    monkeypatch.setattr(precision, "step_seconds", lambda *args, **kwargs: pytest.fail("a resumed run must not re-probe"))
    config = smoke_config("supervised", "trainer.precision=auto")
    assert precision.chosen_precision(config, get_method("supervised"), get_dataset("synthetic_acdc").spec, False,
                                      tmp_path) == "bf16-mixed"


@pytest.mark.slow
def test_an_auto_run_trains_in_the_chosen_precision_and_records_it(tmp_path, monkeypatch, capsys):
    """Through the CLI, with channels-last too: the probe's choice (forced here) is what Lightning trains with, the
    row and config.yaml record it, and the row's hash is the hash of the request ``auto``."""
    import pandas as pd
    import yaml

    from benchmark.cli import main
    import benchmark.precision as precision

    monkeypatch.setattr(precision, "step_seconds", lambda *args, **kwargs: {"32-true": 1.0, "bf16-mixed": 0.5})
    trained_with = []
    import benchmark.run as run_module

    build_trainer = run_module.build_trainer

    def recording_build_trainer(*args, **kwargs):
        trainer, best = build_trainer(*args, **kwargs)
        trained_with.append(trainer.precision)
        return trainer, best

    monkeypatch.setattr(run_module, "build_trainer", recording_build_trainer)
    code = main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"), "--leaderboard-dir",
                 str(tmp_path / "lb"), "--method", "supervised", "--dataset", "synthetic_acdc", "--ratio", "0.5",
                 "--set", "trainer.precision=auto", "--set", "trainer.channels_last=true"])
    assert code == 0
    assert trained_with == ["bf16-mixed"]
    assert "trainer.precision=auto: picked bf16-mixed" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    assert (table["status"] == "ok").all() and (table["precision"] == "bf16-mixed").all()
    stored = yaml.safe_load(next((tmp_path / "runs").rglob("config.yaml")).read_text())
    assert stored["trainer"]["precision"] == "auto" and stored["trainer"]["precision_chosen"] == "bf16-mixed"
    assert stored["trainer"]["channels_last"] is True
    assert set(table["config_hash"]) == {stored["config_hash"]}
    from benchmark.config import config_hash

    assert config_hash({key: value for key, value in stored.items() if key != "config_hash"}) == stored["config_hash"]


def test_a_refused_precision_exits_2_through_the_cli(tmp_path, capsys):
    from benchmark.cli import main
    from core.errors import EXIT_USER_ERROR

    code = main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"), "--leaderboard-dir",
                 str(tmp_path / "lb"), "--method", "supervised", "--dataset", "synthetic_acdc",
                 "--set", "trainer.precision=bf16-true"])
    assert code == EXIT_USER_ERROR
    assert "trainer.precision must be one of 32-true, 32, bf16-mixed, 16-mixed, auto, got 'bf16-true'" in capsys.readouterr().err
    assert not (tmp_path / "lb" / "synthetic_acdc.csv").exists()


# ---- trainer.channels_last ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["supervised", "mean_teacher", "fba_net_plus"])
def test_channels_last_computes_what_the_default_layout_computes(name):
    """Without dropout (channels-last draws its masks in another memory order) a first step is the same computation
    up to float32 summation order: loss and gradients within 1e-4 relative."""
    results = []
    for layout in ("false", "true"):
        model = build_method(name, "synthetic_acdc", ["model.dropout=false", f"trainer.channels_last={layout}"])
        convolutions = [p for p in model.parameters() if p.dim() == 4]
        memory_format = torch.channels_last if layout == "true" else torch.contiguous_format
        assert convolutions and all(p.is_contiguous(memory_format=memory_format) for p in convolutions)
        assert layout == "false" or not all(p.is_contiguous() for p in convolutions)
        batch = coherent_batch(model)
        torch.manual_seed(3)
        losses = model.compute_losses(batch)
        losses["loss"].backward()
        results.append((losses["loss"].detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    assert float((grad_b - grad_a).norm() / grad_a.norm()) < 1e-4


def test_channels_last_is_checked():
    from benchmark.precision import check_numerics
    from core.errors import UserError

    with pytest.raises(UserError, match="2-D networks"):
        check_numerics(smoke_config("supervised", "trainer.channels_last=true"), get_dataset("synthetic_la").spec)
    config = smoke_config("supervised")
    config["trainer"]["channels_last"] = "yes"
    with pytest.raises(UserError, match="true or false"):
        check_numerics(config, get_dataset("synthetic_acdc").spec)
    assert check_numerics(smoke_config("supervised", "trainer.channels_last=true"), get_dataset("synthetic_acdc").spec) == "32-true"


def test_channels_last_false_keeps_every_existing_config_hash():
    from benchmark.config import config_hash

    config = smoke_config("supervised")
    without = copy.deepcopy(config)
    del without["trainer"]["channels_last"]
    assert config_hash(config) == config_hash(without)
    assert config_hash(smoke_config("supervised", "trainer.channels_last=true")) != config_hash(config)
