"""``trainer.precision``: the values the suite accepts, and ``auto``, which measures which one is faster here.

Accepted: ``32-true`` (every preset), ``bf16-mixed`` (CPU or GPU autocast to bfloat16), ``16-mixed`` (GPU autocast
to float16 with loss scaling, Lightning's) and ``auto``. Mixed precision keeps the weights, EMA teachers, memory
banks and running statistics in float32, and computes the losses that need it in float32
(methods/losses/precision.py). ``bf16-true`` / ``16-true`` (half-precision weights) would round the EMA teachers and
queues and are refused.

``auto`` times a few training steps of the run's own method (its networks, at its batch and patch size, on a
random batch) in float32 and in mixed precision before training, and picks mixed precision only when it is
clearly faster on this machine (:data:`FASTER_BELOW` of the float32 step time). The config hash covers the
request ``auto``, never the choice, so it does not depend on the machine; the choice goes into the run folder's
config.yaml (``trainer.precision_chosen``) and the leaderboard row (``precision``), and a resumed run keeps it.
The leaderboard's own recipes fix ``32-true``: the same hash must mean the same computation on every machine
(docs/perf.md, "Mixed precision and channels-last").
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmark.schema import PRECISIONS
from core.errors import UserError

AUTO = "auto"
FLOAT32 = "32-true"
# Lightning's names (the schema's list); 32 / "32" are Lightning's aliases of 32-true.
ALIASES = {"32": FLOAT32}
ACCEPTED = tuple(value for value in PRECISIONS if value not in ALIASES)
#: ``auto`` picks mixed precision when its step takes less than this fraction of the float32 step.
FASTER_BELOW = 0.9
PROBE_STEPS = 3  # timed steps per precision, after one untimed warm-up step each


def requested_precision(config: dict[str, Any]) -> str:
    """``trainer.precision`` checked and in its canonical spelling (a UserError for anything else)."""
    trainer = config["trainer"]
    value = ALIASES.get(str(trainer["precision"]), str(trainer["precision"]))
    if value not in ACCEPTED:
        raise UserError(
            f"unknown trainer.precision '{trainer['precision']}'", where=f"accepted: {', '.join(ACCEPTED)}",
            fix="bf16-mixed on CPUs with bfloat16 units or GPUs, 16-mixed on older GPUs, auto to measure; half-precision "
                "weights (bf16-true, 16-true) are not supported (EMA teachers and memory banks must stay float32)",
        )
    if value == AUTO and int(trainer["devices"]) * int(trainer["num_nodes"]) > 1:
        raise UserError(
            "trainer.precision=auto measures one process's step and cannot promise every rank the same choice",
            where=f"DEVICES={trainer['devices']}, num_nodes={trainer['num_nodes']}",
            fix="give the precision explicitly (32-true, bf16-mixed or 16-mixed) for a multi-device run",
        )
    return value


def check_numerics(config: dict[str, Any], spec) -> str:
    """Check ``trainer.precision`` and ``trainer.channels_last`` before anything is written; the precision requested."""
    channels_last = config["trainer"].get("channels_last", False)
    if not isinstance(channels_last, bool):
        raise UserError(f"trainer.channels_last must be true or false, got {channels_last!r}", where="base.yaml trainer.channels_last")
    if channels_last and spec.spatial_dims != 2:
        raise UserError(f"trainer.channels_last applies to 2-D networks, but dataset '{spec.name}' is {spec.spatial_dims}-D",
                        fix="drop trainer.channels_last (it is implemented for 2-D networks only)")
    return requested_precision(config)


def probe_device(config: dict[str, Any]) -> torch.device:
    accelerator = str(config["trainer"]["accelerator"])
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def mixed_precision_for(device: torch.device) -> str:
    """The mixed precision ``auto`` compares against float32: bf16-mixed where the device has bfloat16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "16-mixed"
    return "bf16-mixed"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def probe_batch(model, config: dict[str, Any], with_unlabeled: bool, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """A random batch of the run's own shape (labeled and unlabeled batch sizes, patch size)."""
    generator = torch.Generator().manual_seed(0)
    data, spec = config["data"], model.spec
    shape = tuple(data["patch_size"] or spec.patch_size)
    labeled = int(data["labeled_batch_size"])
    batch = {"labeled": {
        "image": torch.randn(labeled, spec.in_channels, *shape, generator=generator).to(device),
        "label": torch.randint(0, spec.num_classes, (labeled, *shape), generator=generator).to(device),
    }}
    if with_unlabeled and int(data.get("unlabeled_batch_size") or 0) > 0:
        batch["unlabeled"] = {"image": torch.randn(int(data["unlabeled_batch_size"]), spec.in_channels, *shape,
                                                   generator=generator).to(device)}
    return batch


def step_seconds(method_cls, spec, config: dict[str, Any], with_unlabeled: bool, precisions: list[str],
                 steps: int = PROBE_STEPS) -> dict[str, float]:
    """Median seconds of one training step (forward, losses, backward, optimizer step) per precision, measured in
    turn (A B A B ...) so that a load spike on a shared machine hits both alike."""
    device = probe_device(config)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = method_cls(spec, config).to(device).train()
        model.log = model.log_dict = lambda *args, **kwargs: None  # no Trainer attached
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # timing only
        batch = probe_batch(model, config, with_unlabeled, device)
        times: dict[str, list[float]] = {precision: [] for precision in precisions}
        for repeat in range(steps + 1):
            for precision in precisions:
                dtype = autocast_dtype(precision)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = model.compute_losses(batch)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat:  # the first step of each precision warms up kernels and allocators
                    times[precision].append(time.perf_counter() - started)
        return {precision: statistics.median(values) for precision, values in times.items()}
    finally:
        torch.random.set_rng_state(torch_state)  # the run's seeded stream is not moved by the probe


def chosen_precision(config: dict[str, Any], method_cls, spec, with_unlabeled: bool,
                     run_dir: Path | None = None) -> str:
    """The precision the run trains with: the request, or for ``auto`` the stored choice of a resumed run folder,
    or the result of a probe (one line printed with the measured times)."""
    requested = requested_precision(config)
    if requested != AUTO:
        return requested
    stored = run_dir / "config.yaml" if run_dir is not None else None
    if stored is not None and stored.is_file():
        previous = (yaml.safe_load(stored.read_text()) or {}).get("trainer", {}).get("precision_chosen")
        if previous:
            print(f"trainer.precision=auto: {previous} (the choice of the run being resumed)", flush=True)
            return previous
    mixed = mixed_precision_for(probe_device(config))
    seconds = step_seconds(method_cls, spec, config, with_unlabeled, [FLOAT32, mixed])
    choice = mixed if seconds[mixed] < FASTER_BELOW * seconds[FLOAT32] else FLOAT32
    print(f"trainer.precision=auto: picked {choice} (one {config['method_name']} step: {seconds[FLOAT32]:.3f} s in "
          f"{FLOAT32}, {seconds[mixed]:.3f} s in {mixed}; median of {PROBE_STEPS} on {probe_device(config).type}; "
          f"mixed is picked below {FASTER_BELOW:.0%} of the float32 time)", flush=True)
    return choice
