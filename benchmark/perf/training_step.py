"""Training step: the suite's Lightning fit against a bare PyTorch loop doing the same forward, losses, backward
and optimizer step on batches already in memory, per registered method.

Suite: ``benchmark.run``'s own pieces (``prepare`` -> DataModule with its default workers, the method,
``build_trainer`` with its loggers and checkpoint callback), timed by a callback between consecutive
``on_train_batch_end`` calls, so a step includes fetching its batch, Lightning's loop and logging.
Bare: the same method class, freshly built with the same seed, its own ``training_step`` (``self.log`` is a no-op
without a trainer), ``loss.backward()``, the optimizer and scheduler of its ``configure_optimizers`` and its
``on_train_batch_end`` (EMA teachers), over a few batches drawn from the same loaders beforehand.
Validation is not part of a step: it runs after the timed steps (report: ``validation`` of the run config).
"""
from __future__ import annotations

import copy
import cProfile
import pstats
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from benchmark.config import config_hash, resolve_config
from benchmark.perf.report import TARGETS
from datamodules import get_dataset
from methods.registry import get_method

DISTINCT_BATCHES = 4


class StepClock(pl.Callback):
    """Wall-clock of every step: batch end to batch end, and the part spent before the step starts (loading)."""

    def __init__(self):
        self.batch_starts: list[float] = []
        self.batch_ends: list[float] = []
        self.cpu_at_batch_ends: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_ends.append(time.perf_counter())
        self.cpu_at_batch_ends.append(time.process_time())

    def step_times(self, warmup: int) -> tuple[list[float], list[float]]:
        """(whole step, waiting for the batch) per step after ``warmup`` steps."""
        whole = [b - a for a, b in zip(self.batch_ends[:-1], self.batch_ends[1:])][warmup:]
        waiting = [s - e for e, s in zip(self.batch_ends[:-1], self.batch_starts[1:])][warmup:]
        return whole, waiting

    def cpu_times(self, warmup: int) -> list[float]:
        """CPU time of this process per step (loader workers are other processes) after ``warmup`` steps."""
        return [b - a for a, b in zip(self.cpu_at_batch_ends[:-1], self.cpu_at_batch_ends[1:])][warmup:]


def method_config(method: str, dataset: str, profile: str, steps: int, out: Path, extra: list[str] = ()) -> dict:
    entry = get_dataset(dataset)
    overrides = ["data.ratio=0.2", f"trainer.max_steps={steps}", f"trainer.val_every={steps}", "run.progress=false",
                 f"run.out={out}", f"run.leaderboard_dir={out}", "data.max_eval_cases=1", *extra]
    return resolve_config(dataset, method, profile, overrides, get_method(method).defaults, family=entry.family)


def suite_fit(config: dict, callback: pl.Callback) -> None:
    """One fit through ``benchmark.run``'s own pieces (DataModule, method, trainer with its loggers and
    checkpointing), with ``callback`` added to the trainer's."""
    from benchmark.finalize import finalize
    from benchmark.run import build_trainer, make_run_dir, prepare

    config.update(finalize(config))  # finished in place: the caller's config is the run's
    entry, method_cls, datamodule = prepare(config)
    digest = config_hash(config)
    run_dir = make_run_dir(config, digest)
    pl.seed_everything(config["run"]["seed"], workers=True, verbose=False)
    model = method_cls(entry.spec, config)
    trainer, _ = build_trainer(config, run_dir, digest)
    trainer.callbacks.append(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=datamodule)


def suite_steps(config: dict, warmup: int) -> dict[str, list[float]]:
    clock = StepClock()
    suite_fit(config, clock)
    whole, waiting = clock.step_times(warmup)
    return {"step": whole, "waiting_for_batch": waiting, "cpu": clock.cpu_times(warmup)}


# Code that is the suite's or Lightning's own (not the method's maths): its Python time is the framework overhead.
FRAMEWORK_FILES = ("pytorch_lightning", "lightning_utilities", "lightning_fabric", "torchmetrics", "/benchmark/",
                   "/logging/", "/csv.py", "wandb")


class ProfiledSteps(pl.Callback):
    """cProfile from the start of batch ``first`` to the end of the fit's last batch (the steps, not setup/teardown)."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.profile = first, last, cProfile.Profile()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first:
            self.profile.enable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.last + 1:  # global_step counts optimizer steps taken, so last + 1 here
            self.profile.disable()


def framework_share(config: dict, warmup: int) -> dict[str, float]:
    """A second suite fit, its steps after ``warmup`` under cProfile: the Python time spent in Lightning's and the
    suite's own code per step.

    Load-robust where the timed ratio is not: it counts what the framework executes, not how long the machine took.
    cProfile's per-call cost inflates Python-heavy code, so it overstates the overhead rather than hiding it. Not
    counted: tensor operations the framework calls (they are attributed to torch's built-ins)."""
    config = copy.deepcopy(config)
    config["run"]["out"] = str(Path(config["run"]["out"]) / "profiled")  # run folders are named to the second
    last = config["trainer"]["max_steps"] - 1
    profiled = ProfiledSteps(warmup, last)
    suite_fit(config, profiled)
    stats = pstats.Stats(profiled.profile).stats
    total = sum(entry[2] for entry in stats.values())
    framework = sum(entry[2] for key, entry in stats.items() if any(part in key[0] for part in FRAMEWORK_FILES))
    steps = last - warmup + 1
    return {"framework_python_s_per_step": framework / steps, "profiled_steps": steps,
            "share_of_profiled_step": framework / total}


def batches_in_memory(datamodule, count: int) -> list[dict]:
    """``count`` training batches from the DataModule's own loaders, as the fit loop would receive them."""
    streams = datamodule.train_dataloader().iterables
    iterators = {name: iter(loader) for name, loader in streams.items()}
    batches = [{name: next(iterator) for name, iterator in iterators.items()} for _ in range(count)]
    del iterators  # stops the workers
    return batches


def bare_steps(config: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    from benchmark.finalize import finalize
    from benchmark.run import prepare

    config.update(finalize(config))  # finished in place: the caller's config is the run's
    entry, method_cls, datamodule = prepare(config)
    batches = batches_in_memory(datamodule, min(DISTINCT_BATCHES, steps))
    pl.seed_everything(config["run"]["seed"], verbose=False)
    model = method_cls(entry.spec, config)
    model.train()
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    times, cpu_times = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "self.log() without a trainer" (logging is what the bare loop leaves out)
        for index in range(warmup + steps + 1):
            started, cpu_started = time.perf_counter(), time.process_time()
            batch = batches[index % len(batches)]
            loss = model.training_step(batch, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            model.on_train_batch_end(loss, batch, index)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    return {"step": times[warmup + 1:], "cpu": cpu_times[warmup + 1:]}


def measure(method: str, dataset: str, profile: str, steps: int, warmup: int, rounds: int, extra=(),
            stage: str | None = None, confirm_above: float | None = None, max_rounds: int = 3) -> dict[str, Any]:
    """``rounds`` x (suite fit, bare loop), alternating; ratio of the medians per round, median over rounds.
    ``stage``: the stage of a multi-stage method to time, with its own per-stage settings (batch, budget).
    ``confirm_above``: while the median CPU-time ratio is above it, add rounds (up to ``max_rounds``), so a method is
    reported over the target only when more than one round on this shared machine says so."""
    from benchmark.config import stage_config

    suite_medians, bare_medians, waiting_medians, suite_cpu_medians, bare_cpu_medians = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="perf-step-") as out:
        # The suite's steps are counted between batch ends: warmup + steps + 1 steps give `steps` intervals after warmup.
        config = method_config(method, dataset, profile, warmup + steps + 1, Path(out), list(extra))
        if stage is not None:
            config = stage_config(config, stage)
            config["trainer"]["max_steps"] = config["trainer"]["val_every"] = warmup + steps + 1

        def over_the_line() -> bool:
            if confirm_above is None or len(suite_medians) >= max_rounds:
                return False
            return statistics.median(s / b for s, b in zip(suite_cpu_medians, bare_cpu_medians)) > confirm_above

        while len(suite_medians) < rounds or over_the_line():
            suite = suite_steps(config, warmup)
            bare = bare_steps(config, warmup, steps)
            suite_medians.append(statistics.median(suite["step"]))
            waiting_medians.append(statistics.median(suite["waiting_for_batch"]))
            bare_medians.append(statistics.median(bare["step"]))
            suite_cpu_medians.append(statistics.median(suite["cpu"]))
            bare_cpu_medians.append(statistics.median(bare["cpu"]))
        framework = framework_share(config, warmup)
    ratios = [s / b for s, b in zip(suite_medians, bare_medians)]
    cpu_ratios = [s / b for s, b in zip(suite_cpu_medians, bare_cpu_medians)]
    return {
        "suite_step_median_s": statistics.median(suite_medians),
        "bare_step_median_s": statistics.median(bare_medians),
        "suite_waiting_for_batch_median_s": statistics.median(waiting_medians),
        "ratio": statistics.median(ratios), "ratio_per_round": ratios,
        # CPU time of the training process per step: what the suite itself costs, far less disturbed by other jobs
        # than wall time on a shared machine (loading runs in worker processes and shows in the waiting column).
        "suite_cpu_step_median_s": statistics.median(suite_cpu_medians),
        "bare_cpu_step_median_s": statistics.median(bare_cpu_medians),
        "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratio_per_round": cpu_ratios,
        "framework": framework,
        "batch": {"labeled": config["data"]["labeled_batch_size"],
                  "unlabeled": config["data"]["unlabeled_batch_size"] if get_method(method).uses_unlabeled else 0},
        "patch": config["data"]["patch_size"], "base_features": config["model"]["base_features"],
        "num_workers": config["data"]["num_workers"], "log_every": config["trainer"]["log_every"],
    }


def action_stage_ratio(profile: str, steps: int, warmup: int) -> dict[str, Any]:
    """ACTION's fine-tuning step over its first stage's, bare loops on random batches shaped as the ACDC preset of
    ``profile`` (no data needed), alternating the two stages step by step so load changes hit both alike. Stage 3
    evaluates its representation head with gradient only at the sampled query pixels; first asserted: on the same
    weights, batch and draws it gives the losses and gradients of the dense full-resolution head."""
    import torch

    from benchmark.config import stage_config

    entry = get_dataset("acdc")
    base = resolve_config("acdc", "action", profile, [], get_method("action").defaults, family=entry.family)
    base["data"]["patch_size"] = list(base["data"]["patch_size"] or entry.spec.patch_size)

    def built(stage: str, extra: dict[str, Any] | None = None):
        config = stage_config(copy.deepcopy(base), stage)
        config["method"].update(extra or {})
        torch.manual_seed(0)
        model = get_method("action")(entry.spec, config)
        model.log = model.log_dict = lambda *a, **k: None
        return model.train(), config

    def batch_for(config: dict) -> dict:
        generator = torch.Generator().manual_seed(0)
        shape, data = tuple(config["data"]["patch_size"]), config["data"]
        return {"labeled": {"image": torch.randn(data["labeled_batch_size"], 1, *shape, generator=generator),
                            "label": torch.randint(0, entry.spec.num_classes, (data["labeled_batch_size"], *shape), generator=generator)},
                "unlabeled": {"image": torch.randn(data["unlabeled_batch_size"], 1, *shape, generator=generator)}}

    # identical results: query-only head against the dense head with gradient
    (sparse, config), (dense, _) = built("finetune"), built("finetune", {"dense_representation": True})
    dense.load_state_dict(sparse.state_dict())
    batch = batch_for(config)
    losses = []
    for model in (sparse, dense):
        torch.manual_seed(1)  # the same dropout masks
        losses.append(model.compute_losses(batch))
    sparse_losses, dense_losses = losses
    sparse_losses["loss"].backward()
    dense_losses["loss"].backward()
    for name in dense_losses:
        assert torch.allclose(sparse_losses[name], dense_losses[name], rtol=1e-5, atol=1e-7), name
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters()):
        if b.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name

    loops = {}
    for stage in ("pretrain_global", "finetune"):
        model, stage_cfg = built(stage)
        optimizers = model.configure_optimizers()
        loops[stage] = (model, optimizers["optimizer"], batch_for(stage_cfg))
    times: dict[str, list[float]] = {stage: [] for stage in loops}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in range(warmup + steps):
            for stage, (model, optimizer, stage_batch) in loops.items():
                started = time.process_time()
                loss = model.training_step(stage_batch, index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.on_train_batch_end(loss, stage_batch, index)
                if index >= warmup:
                    times[stage].append(time.process_time() - started)
    medians = {stage: statistics.median(values) for stage, values in times.items()}
    return {"profile": profile, "steps_timed": steps, "patch": base["data"]["patch_size"],
            "batch": {stage: [len(b["labeled"]["image"]), len(b["unlabeled"]["image"])] for stage, (_, _, b) in loops.items()},
            "cpu_step_median_s": medians, "finetune_over_pretrain_global": medians["finetune"] / medians["pretrain_global"],
            "ratio_per_step": [f / p for f, p in zip(times["finetune"], times["pretrain_global"])],
            "finetune_parts_ms": _finetune_parts(*loops["finetune"], steps=max(1, steps // 2)),
            "pretrain_global_parts_ms": _finetune_parts(*loops["pretrain_global"], steps=max(1, steps // 2)),
            "identical_to_dense_head": True}


def _finetune_parts(model, optimizer, batch, steps: int) -> dict[str, float]:
    """Median CPU ms per part of an ACTION step, each timed around its call; 'other losses' is the rest of
    compute_losses (mixing, photometric views, the supervised and unsupervised terms, stage 1's latent heads and its
    EMA update)."""
    import methods.action as action_module

    parts: dict[str, list[float]] = {}
    current: dict[str, float] = {}

    def timed(owner, attribute: str, label: str):
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            started = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                current[label] = current.get(label, 0.0) + time.process_time() - started
        setattr(owner, attribute, wrapper)
        return owner, attribute, original

    patched = [timed(model.net, "forward_features", "student passes"),
               timed(model.teacher.module, "forward", "teacher pass"),
               timed(model.teacher.module, "forward_features", "teacher pass"),
               timed(model, "contrast_inputs", "keys: head at every pixel, no grad"),
               timed(action_module, "anatomical_contrast_loss", "contrast: sampling, query head, logits"),
               timed(model, "isd_call_side_effects", "unused ISD call (student pass + EMA)")]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for index in range(steps):
                current.clear()
                started = time.process_time()
                loss = model.training_step(batch, index)
                losses_end = time.process_time()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                backward_end = time.process_time()
                optimizer.step()
                model.on_train_batch_end(loss, batch, index)
                ended = time.process_time()
                current["other losses"] = losses_end - started - sum(current.values())
                current["backward"] = backward_end - losses_end
                current["optimizer step, EMA after it"] = ended - backward_end
                for label, value in current.items():
                    parts.setdefault(label, []).append(value)
    finally:
        for owner, attribute, original in patched:
            if owner is action_module:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)  # the instance attribute shadowed the class's method
    return {label: 1000 * statistics.median(values) for label, values in parts.items()}


def run(quick: bool, methods: list[str] | None = None) -> dict[str, Any]:
    from methods.registry import method_names

    names = methods or method_names()
    # Full mode: 10 steps after 2 warm-up steps, one suite fit and one bare loop per method (~1.5 min per method
    # on a loaded 2-core machine); the per-step medians make single rounds usable.
    profile, steps, warmup, rounds = ("smoke", 3, 1, 1) if quick else ("cpu", 10, 2, 1)
    # A single round moved by up to 25 % under load here; a method over the target is timed again before it counts.
    confirm_above = None if quick else TARGETS["step_ratio"]
    results: dict[str, Any] = {"dataset": "synthetic_acdc", "profile": profile, "steps_timed": steps,
                               "warmup_steps": warmup, "rounds": rounds, "methods": {}}
    for name in names:
        stages = get_method(name).stages
        # A multi-stage method's stages cost very differently (ACTION's stage 3 adds a full-resolution head).
        for stage in stages if len(stages) > 1 else [None]:
            key = name if stage is None else f"{name} ({stage})"
            try:
                results["methods"][key] = measure(name, "synthetic_acdc", profile, steps, warmup, rounds, stage=stage,
                                                     confirm_above=confirm_above)
            except Exception as error:  # a method added by someone else must not sink the whole report
                results["methods"][key] = {"error": f"{type(error).__name__}: {error}"[:300]}
    if "action" in names:
        try:
            results["action_stage_ratio"] = action_stage_ratio("smoke" if quick else "cpu", 2 if quick else 6, 1)
        except Exception as error:
            results["action_stage_ratio"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return results
