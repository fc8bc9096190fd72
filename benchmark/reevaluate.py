"""Test a finished run's checkpoint again with changed settings, without training and without a leaderboard row.

For questions about a trained model rather than new rows, e.g. how each network of a two-network method does
on its own::

    python -m benchmark.reevaluate RUN_DIR --set method.predict_with=model2 [--checkpoint best]

The run folder's config.yaml gives the dataset, data root, split and model; ``--set`` changes settings that do not
change the weights (``method.predict_with``, ``eval.*``). Prints the summary of the test set and writes
``RUN_DIR/reevaluated_<checkpoint>_<digest of the changes>.csv`` (per case); nothing else is touched.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import yaml

from benchmark.checkpoints import read_checkpoint
from benchmark.config import apply_overrides
from core.errors import UserError
from core.evaluation import Evaluator, summarize


def load_finished_run(run_dir: Path, overrides: list[str], checkpoint: str = "last"):
    """(config, dataset entry, datamodule, model with the checkpoint's weights, the checkpoint's step) of a run
    folder; for multi-stage methods the final stage. ``overrides`` must not change the weights (loaded as saved)."""
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
    config = apply_overrides(config, overrides)
    method_cls = get_method(config["method_name"])
    final_stage = method_cls.stages[-1]
    folder = RunFolder(run_dir, multi_stage=len(method_cls.stages) > 1, resumed=True)
    path = folder.last_checkpoint(final_stage) if checkpoint == "last" else folder.best_checkpoint(final_stage)
    config["run"]["out"] = str(run_dir.parent)  # prepare() checks it is writable; nothing is written there
    config.update(finalize(config))  # finished in place: the caller's config is the run's
    entry, method_cls, datamodule = prepare(config)
    model = method_cls(entry.spec, stage_config(config, final_stage))
    state = read_checkpoint(path, f"the {checkpoint} checkpoint of this run")
    model.load_state_dict(state["state_dict"])
    return config, entry, datamodule, model, int(state.get("global_step", 0))


def reevaluate(run_dir: Path, overrides: list[str], checkpoint: str = "last") -> tuple[dict, Path]:
    run_dir = Path(run_dir).resolve()
    config, entry, datamodule, model, _ = load_finished_run(run_dir, overrides, checkpoint)
    model.eval()
    per_case = Evaluator.from_config(entry.spec, config).evaluate(model.predict_logits, datamodule.cases("test"),
                                                                 progress=False, desc=f"test ({checkpoint})")
    digest = hashlib.sha256(" ".join(sorted(overrides)).encode()).hexdigest()[:8]
    out = run_dir / f"reevaluated_{checkpoint}_{digest}.csv"
    per_case.to_csv(out, index=False)
    return summarize(per_case), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.reevaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--checkpoint", choices=["last", "best"], default="last")
    args = parser.parse_args(argv)
    try:
        summary, out = reevaluate(Path(args.run_dir), args.overrides, args.checkpoint)
    except UserError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    print(f"{args.run_dir} ({args.checkpoint}) with {' '.join(args.overrides) or 'its own settings'}:")
    print("  " + "  ".join(f"{key}={value:.4f}" for key, value in summary.items() if isinstance(value, float)))
    print(f"per case: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
