"""``make gpu-check`` (``python -m benchmark.gpu_check``): a one-shot check of every method on one GPU, before a
sweep spends GPU hours.

For every registered method (each stage of a multi-stage one), on ACDC-size 2-D and LA-size 3-D batches at the
``paper`` profile (the built-in synthetic sets, written in the real datasets' file formats and read by the real
loaders), in float32 and in mixed precision (``16-mixed``, ``bf16-mixed``): a few dozen bare training steps (the
method's own ``training_step``, backward, optimizer and scheduler, ``on_train_batch_end``; what ``make perf`` times
as the bare step, with the autocast and gradient scaling Lightning's precision plugin applies), and one table:
step time, images/s, peak GPU memory, and the step-0 loss against a CPU float32 step on the same batch and the
same initial weights. The two step-0 losses see the same random numbers (dropout masks, noise, sampled pixels):
while they are computed, every random draw is made on the CPU and copied to the device
(:class:`SameRandomNumbersOnEveryDevice`), so what differs is the arithmetic alone. A row that fails (an error,
a non-finite loss, a loss difference over the tolerance) says so in the table; the others still run; the exit
code is 1 if any row failed.

Without a GPU it refuses (exit 2). ``--device cpu`` (``make gpu-check DEVICE=cpu``) is the dry run the test suite
exercises: smoke sizes (tiny patches, batches and widths), a couple of steps.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from core.errors import EXIT_USER_ERROR, UserError

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
# Step-0 loss on the device vs the CPU float32 step: |device - cpu| <= tolerance * max(1, |cpu|). float32 on a GPU
# differs by TF32 convolutions (cuDNN's default, ~1e-3 per product, averaged out in a mean loss); float16 keeps
# 11 significant bits, bfloat16 8.
LOSS_TOLERANCE = {"32-true": 1e-3, "16-mixed": 1e-2, "bf16-mixed": 5e-2}
PROTOCOLS = ("acdc", "la")  # benchmark.perf.paper_cost's: synthetic set of the family at the paper's patch
DIMS = {"acdc": "2-D", "la": "3-D"}
STEPS, WARMUP = 24, 4
# The whole check should fit in 10 minutes of one GPU: each row gets an equal share of 80 % of the budget (the rest
# is set-up and the CPU reference steps) and stops early, after at least MIN_TIMED_STEPS, when its share is spent
# (at the paper sizes ACTION's stage 3 alone counts ~8 TFLOP per 2-D step and ~40 per 3-D step, make perf).
BUDGET_MINUTES = 10.0
MIN_TIMED_STEPS = 3
DRY_STEPS, DRY_WARMUP = 2, 1
DRY_METHODS = ("supervised", "mean_teacher")  # float16 convolutions are slow on a CPU: a couple of methods
DISTINCT_BATCHES = 2


class SameRandomNumbersOnEveryDevice(TorchFunctionMode):
    """Inside this mode every random draw of torch is made on the CPU and copied to the tensor's device, so a step
    on a GPU draws the numbers the same step draws on the CPU (a CUDA generator's stream differs from the CPU's).

    A draw from a CUDA generator comes from a CPU generator seeded with that generator's seed (one per generator),
    a draw from the global CUDA generator from the global CPU one. Draws are made in float32 whatever dtype
    autocast asks for, and dropout is redrawn here (a float32 mask, scaled by 1 / (1 - p)) on every device, so the
    numbers do not depend on the dtype either. Covers torch's random factories, the in-place samplers and dropout;
    anything else (e.g. a Beta sample) keeps its device's stream and shows as a loss difference.
    """

    FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm}
    LIKE = {torch.rand_like: torch.rand, torch.randn_like: torch.randn}
    TENSOR_ARGUMENTS = {torch.bernoulli, torch.multinomial, torch.normal, torch.poisson}
    IN_PLACE = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.exponential_,
                torch.Tensor.random_, torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_}
    DROPOUT_SPATIAL_DIMS = {F.dropout: 0, F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3}

    def __init__(self):
        super().__init__()
        self._twins: dict[int, tuple[torch.Generator, torch.Generator]] = {}

    def _cpu_generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is None:
            return torch.default_generator
        if generator.device.type == "cpu":
            return generator
        key = id(generator)
        if key not in self._twins:  # the generator is kept alive with its twin, so its id is not reused
            self._twins[key] = (generator, torch.Generator().manual_seed(generator.initial_seed()))
        return self._twins[key][1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.DROPOUT_SPATIAL_DIMS:
            return self._dropout(func, *args, **kwargs)
        if func in self.FACTORIES or func in self.LIKE or func in self.TENSOR_ARGUMENTS:
            return self._factory(func, args, kwargs)
        if func in self.IN_PLACE:
            tensor, *rest = args
            draw = torch.empty(tensor.shape, dtype=_drawn_dtype(tensor.dtype))
            kwargs["generator"] = self._cpu_generator(kwargs.get("generator"))
            func(draw, *[_to_cpu(a) for a in rest], **kwargs)
            with torch.no_grad():
                return tensor.copy_(draw)
        return func(*args, **kwargs)

    def _factory(self, func, args, kwargs):
        generator = kwargs.pop("generator", None)
        dtype = kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        kwargs.pop("layout", None), kwargs.pop("requires_grad", None), kwargs.pop("pin_memory", None)
        kwargs.pop("memory_format", None)
        if func in self.LIKE:
            like, *args = args
            dtype, device = dtype or like.dtype, device or like.device
            func, args = self.LIKE[func], [tuple(like.shape), *args]
        elif func in self.TENSOR_ARGUMENTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors:
                device = device or tensors[0].device
                if func is not torch.multinomial:  # indices; the others sample in their input's dtype
                    dtype = dtype or tensors[0].dtype
            args = [_to_cpu(a) for a in args]
        if device is None:
            device = generator.device if generator is not None else torch.get_default_device()
        drawn_dtype = _drawn_dtype(dtype) if func is not torch.randint and func is not torch.randperm else dtype
        if drawn_dtype is not None and func not in self.TENSOR_ARGUMENTS:
            kwargs["dtype"] = drawn_dtype
        drawn = func(*args, generator=self._cpu_generator(generator), **kwargs)
        return drawn.to(device=device, dtype=dtype or drawn.dtype)

    def _dropout(self, func, input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        if p == 1:
            return input * 0
        spatial = self.DROPOUT_SPATIAL_DIMS[func]
        mask_shape = input.shape if spatial == 0 else (*input.shape[: input.dim() - spatial], *(1,) * spatial)
        keep = torch.rand(mask_shape, generator=torch.default_generator) >= p
        return input * keep.to(device=input.device, dtype=input.dtype) / (1 - p)


def _drawn_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """Low-precision floats are drawn in float32 (then cast), so the numbers do not depend on autocast."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float() if value.dtype in (torch.float16, torch.bfloat16) else value.detach().cpu()
    return value


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def images_in(batch) -> int:
    """Images (2-D slices or 3-D patches) of every stream of a training batch."""
    return sum(stream["image"].shape[0] for stream in batch.values() if isinstance(stream, dict) and "image" in stream)


def step_zero_loss(model, batch, seed: int, device: torch.device, precision: str) -> torch.Tensor:
    """The method's step-0 loss with the random numbers pinned (CPU-drawn) and the precision's autocast."""
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)
    with SameRandomNumbersOnEveryDevice(), autocast(device, precision):
        return model.training_step(batch, 0)


def autocast(device: torch.device, precision: str):
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_method(config: dict[str, Any], precisions: list[str], device: torch.device, steps: int,
                 warmup: int, row_seconds: float = float("inf")) -> list[dict[str, Any]]:
    """One row per precision for the method and stage ``config`` names; a failing row carries its error."""
    from benchmark.perf.training_step import batches_in_memory
    from benchmark.finalize import finalize
    from benchmark.run import prepare

    config.update(finalize(config))  # finished in place: the caller's config is the run's
    entry, method_cls, datamodule = prepare(config)
    batches = batches_in_memory(datamodule, DISTINCT_BATCHES)
    seed = config["run"]["seed"]
    torch.manual_seed(seed)
    initial = method_cls(entry.spec, config)
    initial.train()
    reference = copy.deepcopy(initial)
    with torch.no_grad():
        cpu_loss = float(step_zero_loss(reference, batches[0], seed, torch.device("cpu"), "32-true"))
    del reference
    rows = []
    for precision in precisions:
        row: dict[str, Any] = {"precision": precision, "cpu_fp32_loss": cpu_loss}
        try:
            row.update(timed_steps(copy.deepcopy(initial), batches, seed, device, precision, steps, warmup,
                                   row_seconds))
            difference = abs(row["step0_loss"] - cpu_loss)
            row["loss_difference"] = difference
            allowed = LOSS_TOLERANCE[precision] * max(1.0, abs(cpu_loss))
            if not difference <= allowed:
                row["error"] = f"step-0 loss {row['step0_loss']:.6g} vs CPU fp32 {cpu_loss:.6g}: over {allowed:.2g}"
        except Exception as error:  # a method not (yet) working in this precision is a row, not the end of the check
            row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def timed_steps(model, batches: list, seed: int, device: torch.device, precision: str, steps: int,
                warmup: int, row_seconds: float = float("inf")) -> dict[str, Any]:
    model.to(device)
    batches = [to_device(batch, device) for batch in batches]
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    # float16 needs loss scaling (Lightning's 16-mixed does the same); a disabled scaler passes everything through.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, step0_loss = [], None
    row_started = time.perf_counter()
    for index in range(warmup + steps):
        if index >= warmup + MIN_TIMED_STEPS and time.perf_counter() - row_started > row_seconds:
            break  # this row's share of the time budget is spent
        batch = batches[index % len(batches)]
        synchronize(device)
        started = time.perf_counter()
        if index == 0:
            loss = step_zero_loss(model, batch, seed, device, precision)
            step0_loss = float(loss)
        else:
            with autocast(device, precision):
                loss = model.training_step(batch, index)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        model.on_train_batch_end(loss, batch, index)
        synchronize(device)
        times.append(time.perf_counter() - started)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"loss {float(loss)} at step {index}")
    step_s = statistics.median(times[warmup:])
    return {"step0_loss": step0_loss, "step_s": step_s, "images_per_s": images_in(batches[0]) / step_s,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "steps_timed": len(times) - warmup}


def run_check(device: torch.device, methods: list[str] | None, protocols: list[str], precisions: list[str],
              steps: int, warmup: int, dry: bool, out=None, budget_minutes: float = BUDGET_MINUTES) -> list[dict[str, Any]]:
    from benchmark.perf.paper_cost import PROTOCOLS as PAPER_PROTOCOLS
    from benchmark.perf.paper_cost import protocol_config
    from benchmark.config import stage_config
    from benchmark.run import plan_stages
    from datamodules import get_dataset
    from methods.registry import get_method, method_names

    out = out or sys.stdout
    rows = []
    print(table_header(device, steps, warmup, dry, budget_minutes), file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "self.log() without a trainer", loader worker notices
        plan = []
        for name in methods or method_names():
            method_cls = get_method(name)
            for protocol in protocols:
                if get_dataset(PAPER_PROTOCOLS[protocol][0]).spec.spatial_dims not in method_cls.spatial_dims:
                    continue  # e.g. a 2-D method on LA
                config = protocol_config(name, protocol, Path(work), quick=dry)
                plan += [(name, method_cls, protocol, config, stage) for stage in plan_stages(method_cls, config)]
        row_seconds = 0.8 * 60 * budget_minutes / max(1, len(plan) * len(precisions))
        for name, method_cls, protocol, config, stage in plan:
            label = name if len(method_cls.stages) == 1 else f"{name} ({stage})"
            try:
                method_rows = check_method(stage_config(config, stage), precisions, device, steps, warmup, row_seconds)
            except Exception as error:
                message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                method_rows = [{"precision": p, "error": message} for p in precisions]
            for row in method_rows:
                row.update(method=label, dims=DIMS[protocol])
                rows.append(row)
                print(table_row(row), file=out, flush=True)
    failed = sum("error" in row for row in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} rows passed"
          + (f"; {failed} failed (see the last column)" if failed else ""), file=out, flush=True)
    return rows


def table_header(device: torch.device, steps: int, warmup: int, dry: bool, budget_minutes: float) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU (dry run)"
    tolerances = ", ".join(f"{p} {t:g}" for p, t in LOSS_TOLERANCE.items())
    sizes = "smoke sizes (tiny patches, batches and widths)" if dry else "`paper` profile sizes"
    return "\n".join([
        f"gpu-check on {name}: {sizes}, up to {steps} timed step(s) after {warmup} warm-up step(s) (fewer when a "
        f"row's share of the {budget_minutes:g}-minute budget is spent), median step time.",
        f"loss diff = |step-0 loss - CPU float32 step-0 loss| (same batch, weights and random numbers); allowed: "
        f"tolerance x max(1, |CPU loss|), tolerance {tolerances}.",
        "",
        f"| {'method':<24} | dims | precision  | steps |  step s | images/s | peak GPU GB | loss diff | status",
        f"| {'-' * 24} | ---- | ---------- | ----- | ------- | -------- | ----------- | --------- | ------",
    ])


def table_row(row: dict[str, Any]) -> str:
    def number(key, fmt):
        value = row.get(key)
        return format(value, fmt) if value is not None else "-"

    status = f"FAIL: {row['error']}" if "error" in row else "ok"
    return (f"| {row['method']:<24} | {row['dims']:<4} | {row['precision']:<10} | {number('steps_timed', 'd'):>5} | "
            f"{number('step_s', '7.3f'):>7} | "
            f"{number('images_per_s', '8.1f'):>8} | {number('peak_memory_gb', '11.2f'):>11} | "
            f"{number('loss_difference', '9.1e'):>9} | {status}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default: the first GPU) or cpu (the dry run: smoke sizes, a couple of steps)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"methods to check (default: every registered one; dry run: {' '.join(DRY_METHODS)})")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                        help="acdc (2-D) and/or la (3-D); default both")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps (default {STEPS}; dry run {DRY_STEPS})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed first steps (default {WARMUP}; dry {DRY_WARMUP})")
    parser.add_argument("--minutes", type=float, default=BUDGET_MINUTES,
                        help=f"time budget of the whole check (default {BUDGET_MINUTES:g}); rows stop early to keep it")
    args = parser.parse_args(argv)
    dry = args.device == "cpu"
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or `make gpu-check DEVICE=cpu` for the CPU dry run", file=sys.stderr)
        return EXIT_USER_ERROR
    steps = DRY_STEPS if args.steps is None and dry else STEPS if args.steps is None else args.steps
    warmup = DRY_WARMUP if args.warmup is None and dry else WARMUP if args.warmup is None else args.warmup
    if steps < 1 or warmup < 1:
        print(f"gpu-check: --steps and --warmup must be >= 1 (got {steps}, {warmup}); the first step is the "
              "loss comparison and is never timed", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        from methods.registry import get_method

        for name in args.methods or []:
            get_method(name)
        methods = args.methods or (list(DRY_METHODS) if dry else None)
        rows = run_check(torch.device("cuda:0" if not dry else "cpu"), methods, args.protocols, args.precisions,
                         steps, warmup, dry, budget_minutes=args.minutes)
    except UserError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
