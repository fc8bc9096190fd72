"""Test a finished run's checkpoint again with changed settings, without training and without a leaderboard row.

For questions about a trained model rather than new rows, e.g. how each network of a two-network method does
on its own::

    python -m benchmark.reevaluate RUN_DIR --set method.predict_with=model2 [--checkpoint best]

The run folder's config.yaml gives the dataset, data root, split and model; ``--set`` changes settings that do not
change the weights (``method.predict_with``, ``eval.*``). ``--batchnorm-from labeled`` (or ``labeled+unlabeled``)
first replaces the running statistics of every BatchNorm the tested network uses by their average over training
batches of that kind, read in training mode as in training: it separates what a method's normalisation statistics
do at test time from what its training did to the weights. Prints the summary of the test set and writes
``RUN_DIR/reevaluated_<checkpoint>_<digest of the changes>.csv`` (per case); nothing else is touched.
``--split val`` scores the validation cases instead (its Dice is the run's logged ``val/dice`` for the checkpoint's
step): e.g. to ask whether a checkpoint that was never validated would have been chosen as the best one.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from benchmark.checkpoints import read_checkpoint
from benchmark.config import add_keys_newer_than_the_run, apply_overrides
from core.errors import UserError
from core.evaluation import Evaluator, summarize


def load_run_checkpoint(run_dir: Path, overrides: list[str], checkpoint: str = "last"):
    """(config, dataset entry, datamodule, model with the checkpoint's weights, the checkpoint's step) of a run
    folder; for multi-stage methods the final stage. ``checkpoint``: last or best of a finished run, or resume (a
    stopped run at its latest validation). ``overrides`` must not change the weights (loaded as saved)."""
    from benchmark.config import stage_config
    from benchmark.finalize import finalize
    from benchmark.run import RunFolder, prepare
    from methods.registry import get_method

    run_dir = Path(run_dir).resolve()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError("not a run folder (no config.yaml)", where=str(run_dir), fix="give a folder a run printed as 'run folder:'")
    config = yaml.safe_load(config_file.read_text())
    config.pop("config_hash", None)
    method_cls = get_method(config["method_name"])
    config = apply_overrides(add_keys_newer_than_the_run(config, method_cls.defaults), overrides)
    final_stage = method_cls.stages[-1]
    folder = RunFolder(run_dir, multi_stage=len(method_cls.stages) > 1, resumed=True)
    if checkpoint == "resume":
        path = folder.resume_checkpoint(final_stage)
        if path is None:
            raise UserError(
                f"no resume checkpoint of the {final_stage!r} stage: the run finished that stage (its resume "
                "checkpoint is deleted then) or stopped before the stage's first validation",
                where=str(run_dir), fix="use --checkpoint last or best for a finished run")
    else:
        path = folder.last_checkpoint(final_stage) if checkpoint == "last" else folder.best_checkpoint(final_stage)
    config["run"]["out"] = str(run_dir.parent)  # prepare() checks it is writable; nothing is written there
    config.update(finalize(config))  # finished in place: the caller's config is the run's
    entry, method_cls, datamodule = prepare(config)
    model = method_cls(entry.spec, stage_config(config, final_stage))
    state = read_checkpoint(path, f"the {checkpoint} checkpoint of this run")
    model.load_state_dict(state["state_dict"])
    return config, entry, datamodule, model, int(state.get("global_step", 0))


def training_batches(config: dict, datamodule, count: int):
    """The first ``count`` training batches of the run's split, in the order its seed gives."""
    import pytorch_lightning as pl

    pl.seed_everything(config["run"]["seed"], verbose=False)
    datamodule.setup("fit")
    for taken, item in enumerate(datamodule.train_dataloader()):
        if taken == count:
            return
        yield item[0] if isinstance(item, tuple) else item  # CombinedLoader yields (batch, index, loader index)


#: what ``--batchnorm-from`` re-estimates the statistics from: the labeled images, or labeled and unlabeled images
#: in one batch (as a joint student pass normalises them)
BATCHNORM_SOURCES = ("labeled", "labeled+unlabeled")


@torch.no_grad()
def reestimate_batchnorm(model, batches, source: str) -> int:
    """Replace the running mean and variance of each BatchNorm that ``model.predict_logits`` runs through by their
    average over ``batches`` (cumulative, every batch weighted alike), with the model in training mode as during
    training. Returns the number of batches read; the model is left in eval mode."""
    used: list[nn.Module] = []
    hooks = [module.register_forward_pre_hook(lambda module, _: used.append(module))
             for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise UserError("the run's training loader gave no batch", fix="check the data root in the run's config.yaml")
    if source == "labeled+unlabeled" and "unlabeled" not in first:
        raise UserError("this run trained on labeled images only, so it has no unlabeled stream to read",
                        fix="use --batchnorm-from labeled")
    model.eval()
    model.predict_logits(first["labeled"]["image"][:1])  # which normalisation layers the tested network uses
    for hook in hooks:
        hook.remove()
    norms = list(dict.fromkeys(used))
    if not norms:
        raise UserError("the tested network has no BatchNorm layer, so there are no running statistics to re-estimate",
                        fix="leave out --batchnorm-from")
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.train()
    for read, batch in enumerate([first, *batches], start=1):
        images = batch["labeled"]["image"]
        if source == "labeled+unlabeled":
            images = torch.cat([images, batch["unlabeled"]["image"]])
        model.predict_logits(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()
    return read


def reevaluate(run_dir: Path, overrides: list[str], checkpoint: str = "last", batchnorm_from: str | None = None,
               batchnorm_batches: int = 200, split: str = "test") -> tuple[dict, Path]:
    run_dir = Path(run_dir).resolve()
    config, entry, datamodule, model, _ = load_run_checkpoint(run_dir, overrides, checkpoint)
    changes = list(overrides)
    if batchnorm_from is not None:
        reestimate_batchnorm(model, training_batches(config, datamodule, batchnorm_batches), batchnorm_from)
        changes.append(f"batchnorm_from={batchnorm_from}x{batchnorm_batches}")
    model.eval()
    per_case = Evaluator.from_config(entry.spec, config).evaluate(model.predict_logits, datamodule.cases(split),
                                                                 progress=False, desc=f"{split} ({checkpoint})")
    digest = hashlib.sha256(" ".join(sorted(changes)).encode()).hexdigest()[:8]
    prefix = "reevaluated" if split == "test" else f"reevaluated_{split}"  # test files keep their earlier names
    out = run_dir / f"{prefix}_{checkpoint}_{digest}.csv"
    per_case.to_csv(out, index=False)
    return summarize(per_case), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.reevaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--checkpoint", choices=["last", "best"], default="last")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="the cases to score (default test; val gives the checkpoint's validation Dice)")
    parser.add_argument("--batchnorm-from", choices=BATCHNORM_SOURCES,
                        help="re-estimate BatchNorm running statistics from these training batches before testing")
    parser.add_argument("--batchnorm-batches", type=int, default=200, metavar="N",
                        help="training batches for --batchnorm-from (default 200)")
    args = parser.parse_args(argv)
    if args.batchnorm_batches < 1:
        print("error: --batchnorm-batches must be at least 1", file=sys.stderr)
        return 2
    try:
        summary, out = reevaluate(Path(args.run_dir), args.overrides, args.checkpoint, args.batchnorm_from,
                                  args.batchnorm_batches, args.split)
    except UserError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    changes = [*args.overrides, *([f"BatchNorm statistics from {args.batchnorm_batches} {args.batchnorm_from} training "
                                   "batches"] if args.batchnorm_from else [])]
    print(f"{args.run_dir} ({args.checkpoint}, {args.split} cases) with {', '.join(changes) or 'its own settings'}:")
    print("  " + "  ".join(f"{key}={value:.4f}" for key, value in summary.items() if isinstance(value, float)))
    print(f"per case: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
