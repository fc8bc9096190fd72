"""Compute of a `paper`-profile run, per method: the floating-point operations of one training step, counted, and
what a whole run costs at a stated GPU throughput.

A GPU run cannot be timed here, so the expected time per run is derived from what can be counted on a CPU:
torch's ``FlopCounterMode`` around one bare step (the method's own ``training_step`` and ``backward``, as in the
training-step section) at the paper protocol's sizes, times the paper's step budget (per stage for multi-stage
methods). The step is run on real tensors (the meta device cannot run the methods' data-dependent sampling).
The input is the built-in synthetic set of the same family at the paper's patch size, so the count is the
protocol's, not the data's. Counted: convolutions, matrix products and attention (2 FLOPs per multiply-add);
not counted: element-wise work, data loading and validation, so the times are lower bounds of the training
alone.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.flop_counter import FlopCounterMode

from benchmark.config import resolve_config
from benchmark.perf.training_step import batches_in_memory
from datamodules import get_dataset
from methods.registry import get_method

# Sustained throughputs the report converts FLOPs into hours with. Small 2-D U-Nets keep a GPU far from its peak
# (an A100 has 19.5 TFLOP/s FP32 and 156 TF32 tensor-core peak); 10 and 40 TFLOP/s bracket what fp32/TF32 training
# of these networks typically sustains. A user divides the run's FLOPs by their own figure.
ASSUMED_TFLOPS = (10.0, 40.0)
PROTOCOLS = {
    # name: (synthetic set of the family, the family's paper patch, label)
    "acdc": ("synthetic_acdc", [256, 256], "ACDC (SSL4MIS protocol)"),
    "la": ("synthetic_la", [112, 112, 80], "LA (UA-MT protocol)"),
}
# Counted by default: ACDC. LA on request (--cost-protocols acdc la): one step of ACTION's 3-D stage 3 alone is
# about 40 TFLOP (its 3x3x3 head reads a 496-channel hypercolumn at full resolution, ~8 GB for the batch), which
# is tens of minutes on a CPU core.
DEFAULT_PROTOCOLS = ("acdc",)
# Quick mode (tests): the smallest patches that still hold one of ACTION's paper windows (64^2 / 20^3).
QUICK_PATCH = {"acdc": [96, 96], "la": [32, 32, 32]}


def protocol_config(method: str, protocol: str, out: Path, quick: bool) -> dict[str, Any]:
    synthetic, patch, _ = PROTOCOLS[protocol]
    overrides = ["data.ratio=0.2", f"data.patch_size={QUICK_PATCH[protocol] if quick else patch}", "data.num_workers=0",
                 "data.max_eval_cases=1", "run.progress=false", f"run.out={out}", f"run.leaderboard_dir={out}"]
    if quick:
        overrides += ["model.base_features=4", "data.labeled_batch_size=2", "data.unlabeled_batch_size=2"]
    return resolve_config(synthetic, method, "paper", overrides, get_method(method).defaults,
                          family=get_dataset(synthetic).family)


def step_flops(config: dict[str, Any]) -> int:
    """FLOPs of one bare training step (forward, losses, backward) of the method and stage the config names."""
    from benchmark.finalize import finalize
    from benchmark.run import prepare

    config.update(finalize(config))  # finished in place: the caller's config is the run's
    entry, method_cls, datamodule = prepare(config)
    batch = batches_in_memory(datamodule, 1)[0]
    pl.seed_everything(config["run"]["seed"], verbose=False)
    model = method_cls(entry.spec, config)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "self.log() without a trainer"
        with FlopCounterMode(display=False) as counter:
            loss = model.training_step(batch, 0)
            loss.backward()
    return counter.get_total_flops()


def measure(method: str, protocol: str, quick: bool) -> dict[str, Any]:
    from benchmark.config import stage_config
    from benchmark.run import plan_stages
    from core.errors import UserError

    try:
        get_method(method).check_dataset(get_dataset(PROTOCOLS[protocol][0]).spec)
    except UserError as error:  # e.g. a 2-D method on LA
        return {"not_applicable": error.message}
    with tempfile.TemporaryDirectory(prefix="perf-cost-") as out:
        config = protocol_config(method, protocol, Path(out), quick)
        stages = {}
        for stage in plan_stages(get_method(method), config):
            staged = stage_config(config, stage)
            flops = step_flops(staged)
            steps = int(staged["trainer"]["max_steps"])
            stages[stage] = {"step_tflop": flops / 1e12, "steps": steps, "run_pflop": flops * steps / 1e15,
                             "batch": {"labeled": staged["data"]["labeled_batch_size"],
                                       "unlabeled": staged["data"]["unlabeled_batch_size"] if get_method(method).uses_unlabeled else 0}}
        run_pflop = sum(s["run_pflop"] for s in stages.values())
        return {"patch": config["data"]["patch_size"], "base_features": config["model"]["base_features"],
                "stages": stages, "run_pflop": run_pflop,
                "hours_at_assumed_tflops": {str(t): run_pflop * 1e3 / t / 3600 for t in ASSUMED_TFLOPS}}


def run(quick: bool, methods: list[str] | None = None, protocols: list[str] | None = None) -> dict[str, Any]:
    from methods.registry import method_names

    results: dict[str, Any] = {"assumed_tflops": list(ASSUMED_TFLOPS), "protocols": {}}
    for protocol in protocols or DEFAULT_PROTOCOLS:
        label = PROTOCOLS[protocol][2]
        per_method = {}
        for name in methods or method_names():
            try:
                per_method[name] = measure(name, protocol, quick)
            except Exception as error:  # a method that does not support the protocol must not sink the section
                per_method[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        # Relative cost is exact (same counting for every method); the hours depend on the assumed throughput.
        reference = per_method.get("supervised", {}).get("run_pflop")
        for result in per_method.values():
            if reference and "run_pflop" in result:
                result["supervised_runs"] = result["run_pflop"] / reference
        results["protocols"][protocol] = {"label": label, "methods": per_method}
    return results
