"""Mixed precision, channels-last and torch.compile on the machine `make perf` runs on.

``trainer.precision`` (benchmark/precision.py) is 32-true in every profile and dataset preset (checked here): the
leaderboard's numbers must not depend on the kind of machine, and a bf16 CPU step is 7.96x slower than float32 on
the AMD EPYC host of the first report but faster on Intel Xeons with AMX-BF16. Users may set bf16-mixed, or auto to
let a start-up probe choose. This section measures, per method, the float32 / bf16-mixed step-time ratio of the
method's own training step at the ``cpu`` profile (ACDC: batch 8 + 8, 128x128, U-Net width 8), and for the 2-D
U-Net alone what channels-last memory format (asserted to compute the same numbers) and, with ``--compile``,
torch.compile change. Evaluation (sliding window / slice-wise + metrics) runs outside the Trainer, in float32,
whatever the training precision.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch

from benchmark.config import PROFILES, resolve_config
from benchmark.perf.timing import interleaved, machine, ratio, summary
from benchmark.precision import FLOAT32, step_seconds
from datamodules import DATASETS, get_dataset
from methods.networks import build_network
from methods.registry import get_method, method_names

MIXED = "bf16-mixed"
#: channels-last must compute what the default layout computes, up to float32 summation order.
CHANNELS_LAST_RTOL, CHANNELS_LAST_ATOL = 1e-3, 1e-4

GPU_EXPECTATIONS = (
    "Not measurable here (no GPU). On Ampere or newer GPUs, bf16-mixed autocast usually speeds up the convolutions "
    "of the U-Net/V-Net by roughly 1.5-2.5x and halves activation memory; V-Net 3-D convolutions gain most. "
    "channels-last (channels_last / channels_last_3d) helps tensor cores further for 2-D nets and is often neutral "
    "for 3-D. bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike 16-mixed, which Lightning "
    "scales); expect small run-to-run differences in the last digits of the Dice, not a shift."
)
DECISION = (
    "Leaderboard: every preset, and so the `cpu` recipe, stays `32-true`. A bf16 CPU step took 7.96x the float32 one "
    "on the AMD EPYC host of the first report and is faster on Intel Xeons with AMX-BF16 (below), and the numbers of "
    "one config hash must not depend on the kind of machine that produced them. Users may set "
    "`--set trainer.precision=bf16-mixed` (GPU: also `16-mixed`) or `trainer.precision=auto`: a start-up probe "
    "times three steps of the run's own method at its batch and patch in both precisions and picks bf16-mixed only "
    "below 90 % of the float32 step time, printing one line with both times. The config hash covers the request "
    "(`auto`, never the machine's choice); the choice is recorded as `trainer.precision_chosen` in the run folder's "
    "config.yaml and as the row's `precision` column, and a resumed run keeps it. Rows of another precision have "
    "another hash, so they never mix with float32 rows. Under mixed precision the weights, EMA teachers, memory banks "
    "and running statistics stay float32, the decoders return float32 logits, and the losses that need it (softmax, "
    "Dice, KL, InfoNCE and similarity matrices) are float32 islands (methods/losses/precision.py); "
    "tests/test_precision.py checks every method's first bf16 step against float32."
)

LAYOUT_DECISION = (
    "Adopted: `trainer.channels_last: true` puts 2-D networks in channels-last memory format (default false, so every "
    "existing config hash stays; true is hashed, because with dropout it draws other masks than the default layout). "
    "The `cpu` recipe trains its 2-D entries in channels-last (benchmark/configs/recipes/cpu.yaml; docs/protocol.md). "
    "Not adopted: torch.compile. Its steady-state gain on the float32 U-Net step is modest, and every network of a "
    "method, every stage and every new input shape (the sliding-window batches of evaluation) compiles again, for "
    "tens of seconds to minutes each on a shared 2-core machine (a cold first compile of the U-Net step took 314 s "
    "here, 37 s with a warm inductor cache); `python -m benchmark.perf --only precision --compile` measures it."
)


def resolved_precisions() -> dict[str, str]:
    return {f"{dataset}/{profile}": resolve_config(dataset, "supervised", profile, family=entry.family)["trainer"]["precision"]
            for dataset, entry in DATASETS.items() for profile in PROFILES}


def method_ratios(quick: bool, methods: list[str] | None) -> dict[str, Any]:
    """float32 / bf16-mixed step time of every 2-D method's own training step (> 1: bf16 is faster)."""
    profile, steps = ("smoke", 1) if quick else ("cpu", 2)
    entry = get_dataset("acdc")
    results = {}
    for name in methods or method_names():
        method_cls = get_method(name)
        if 2 not in method_cls.spatial_dims:
            continue
        config = resolve_config("acdc", name, profile, [], method_cls.defaults, family=entry.family)
        seconds = step_seconds(method_cls, entry.spec, config, method_cls.uses_unlabeled, [FLOAT32, MIXED], steps)
        results[name] = {"float32_s": seconds[FLOAT32], "bf16_s": seconds[MIXED],
                         "float32_over_bf16": seconds[FLOAT32] / seconds[MIXED]}
    return {"profile": profile, "timed_steps": steps, "methods": results}


def unet_step(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer, mixed: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        loss = torch.nn.functional.cross_entropy(net(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def assert_channels_last_computes_the_same(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Logits and gradients of the same weights in both layouts (train mode, dropout off: channels-last draws
    dropout masks in its own memory order) agree to float32 tolerance; returns the largest logit difference."""
    plain, last = copy.deepcopy(net).train(), copy.deepcopy(net).train().to(memory_format=torch.channels_last)
    outputs = []
    for model, x in ((plain, images), (last, images.contiguous(memory_format=torch.channels_last))):
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.p = 0.0
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        outputs.append((logits.detach(), [p.grad for p in model.parameters()]))
    (logits_a, grads_a), (logits_b, grads_b) = outputs
    torch.testing.assert_close(logits_b, logits_a, rtol=CHANNELS_LAST_RTOL, atol=CHANNELS_LAST_ATOL)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_b, grad_a, rtol=CHANNELS_LAST_RTOL, atol=CHANNELS_LAST_ATOL)
    return float((logits_b - logits_a).abs().max())


def unet_layouts(quick: bool, compile_too: bool) -> dict[str, Any]:
    """The cpu profile's 2-D U-Net step (width 8, batch 8, 128x128): float32 / bf16, default / channels-last."""
    batch, size, repeats = (2, 32, 2) if quick else (8, 128, 5)
    torch.manual_seed(0)
    images, labels = torch.randn(batch, 1, size, size), torch.randint(0, 4, (batch, size, size))
    reference = build_network(2, 1, 4, base_features=8)
    largest_difference = assert_channels_last_computes_the_same(reference, images, labels)
    candidates, nets = {}, {}
    for layout in ("default", "channels_last"):
        for precision in (FLOAT32, MIXED):
            net = copy.deepcopy(reference).train()
            x = images
            if layout == "channels_last":
                net, x = net.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
            nets[(layout, precision)] = net
            candidates[f"{precision}/{layout}"] = (
                lambda net=net, x=x, optimizer=optimizer, mixed=precision == MIXED: unet_step(net, x, labels, optimizer, mixed))
    for run in candidates.values():  # warm-up
        run()
    times = interleaved(candidates, repeats)
    result = {
        "step": f"U-Net base_features=8, batch {batch}, {size}x{size}, forward + CE + backward + SGD",
        "seconds": {name: summary(values) for name, values in times.items()},
        "float32_over_bf16": ratio(times[f"{FLOAT32}/default"], times[f"{MIXED}/default"]),
        "channels_last_speedup_float32": ratio(times[f"{FLOAT32}/default"], times[f"{FLOAT32}/channels_last"]),
        "channels_last_speedup_bf16": ratio(times[f"{MIXED}/default"], times[f"{MIXED}/channels_last"]),
        "channels_last_largest_logit_difference": largest_difference,
        "channels_last_tolerance": {"rtol": CHANNELS_LAST_RTOL, "atol": CHANNELS_LAST_ATOL},
    }
    if compile_too:
        result["compile"] = compiled_step(reference, images, labels, repeats)
    return result


def compiled_step(reference: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> dict[str, Any]:
    """torch.compile of the float32 U-Net: the first (compiling) step and the steady-state speed-up."""
    eager, compiled = copy.deepcopy(reference).train(), torch.compile(copy.deepcopy(reference).train())
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.0)
    compiled_optimizer = torch.optim.SGD(compiled.parameters(), lr=0.0)
    started = time.perf_counter()
    unet_step(compiled, images, labels, compiled_optimizer, False)
    first_step = time.perf_counter() - started
    times = interleaved({"eager": lambda: unet_step(eager, images, labels, eager_optimizer, False),
                         "compiled": lambda: unet_step(compiled, images, labels, compiled_optimizer, False)}, repeats)
    return {"first_step_s": first_step, "eager": summary(times["eager"]), "compiled": summary(times["compiled"]),
            "speedup": ratio(times["eager"], times["compiled"])}


def run(quick: bool, methods: list[str] | None = None, compile_too: bool = False) -> dict[str, Any]:
    precisions = resolved_precisions()
    assert set(precisions.values()) == {FLOAT32}, f"a preset changes the precision: {precisions}"
    return {
        "cpu": machine()["cpu"],
        "resolved_trainer_precision": sorted(set(precisions.values())),
        "presets_checked": len(precisions),
        "methods": method_ratios(quick, methods),
        "unet": unet_layouts(quick, compile_too),
        "decision": DECISION,
        "layout_decision": LAYOUT_DECISION,
        "gpu_expectation": GPU_EXPECTATIONS,
        "how_to_enable": "--set trainer.precision=bf16-mixed or trainer.precision=auto (OVERRIDES=... with make)",
    }
