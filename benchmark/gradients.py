"""How much gradient each loss term of a run sends to each part of its model, at one checkpoint.

For questions about loss balance that the logged loss values cannot answer, e.g. whether a contrast that reads
its clamp value still trains the network::

    python -m benchmark.gradients RUN_DIR [--checkpoint best] [--batches 4]

``--checkpoint resume`` reads a stopped run at its latest validation (its ``resume.ckpt``), so a run stopped early
on purpose shows the balance of its first steps, which a finished run's checkpoints no longer hold.

The method's own ``compute_losses`` runs on the first training batches of the run's split (same seed, training
mode, the checkpoint's step, so ramp-ups and delays read as they did in training). For every term it returns that
carries gradient, the table gives its value and the L2 norm of its gradient on each top-level module with trainable
parameters (for example ``net`` and ``contrastive_modules``), averaged over the batches. Terms are unweighted,
as ``compute_losses`` returns them; ``loss`` is the weighted total that training minimised. Multi-stage methods
use their final stage. Nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch

from benchmark.reevaluate import load_run_checkpoint, training_batches
from core.errors import UserError


def at_step(model: pl.LightningModule, step: int) -> None:
    """Make ``model.global_step`` read ``step`` without a Trainer (Lightning's property reads 0 without one)."""
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"global_step": property(lambda self: step)})


def gradient_norms(run_dir: Path, checkpoint: str = "last", batches: int = 4) -> tuple[pd.DataFrame, int]:
    """(one row per term: its mean value and mean gradient norm per module, the checkpoint's step)."""
    config, _, datamodule, model, step = load_run_checkpoint(run_dir, [], checkpoint)
    at_step(model, step)
    model.train()
    modules = {name: [p for p in module.parameters() if p.requires_grad] for name, module in model.named_children()}
    modules = {name: params for name, params in modules.items() if params}
    sums: dict[str, dict[str, float]] = {}
    taken = 0
    for batch in training_batches(config, datamodule, batches):
        losses = model.compute_losses(batch)
        for term, value in losses.items():
            if not (isinstance(value, torch.Tensor) and value.requires_grad) or term.endswith("_weight"):
                continue
            row = sums.setdefault(term, {"value": 0.0, **{name: 0.0 for name in modules}})
            row["value"] += float(value.detach())
            # One backward pass per term over every module's parameters, then split per module.
            grads = iter(torch.autograd.grad(value, [p for params in modules.values() for p in params],
                                             retain_graph=True, allow_unused=True))
            for name, params in modules.items():
                module_grads = [next(grads) for _ in params]
                row[name] += float(torch.sqrt(sum(((g.double() ** 2).sum() for g in module_grads if g is not None),
                                                  torch.zeros((), dtype=torch.float64))))
        taken += 1
    table = pd.DataFrame.from_dict(sums, orient="index") / max(taken, 1)
    table.index.name = "term"
    return table, step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.gradients", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", choices=["last", "best", "resume"], default="last",
                        help="last / best of a finished run, or resume: a stopped run at its latest validation")
    parser.add_argument("--batches", type=int, default=4, help="training batches to average over (default 4)")
    args = parser.parse_args(argv)
    if args.batches < 1:
        print("error: --batches must be at least 1", file=sys.stderr)
        return 2
    try:
        table, step = gradient_norms(Path(args.run_dir), args.checkpoint, args.batches)
    except UserError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    print(f"{args.run_dir} ({args.checkpoint}, step {step}), mean over {args.batches} training batches; "
          "value = the unweighted term, other columns = the L2 norm of its gradient on each module:")
    print(table.to_string(float_format=lambda x: f"{x:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
