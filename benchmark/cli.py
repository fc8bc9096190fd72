"""Command line: ``python -m benchmark run|tune|list|score`` (the Makefile wraps the same commands).

User errors (bad paths, names, values) print one message and exit with code 2; nothing is written for them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from benchmark.errors import EXIT_RUN_FAILED, EXIT_USER_ERROR, NonFiniteLossError, UserError


def _number(kind):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}")
    return parse


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What one run is (method, data, profile, seed, devices, overrides): shared by `run` and `tune`."""
    parser.add_argument("--method", default="supervised", help="a registered method (`list methods`)")
    parser.add_argument("--dataset", default="synthetic_acdc", help="a dataset name (`list datasets`)")
    parser.add_argument("--data-root", default=None, help="the dataset folder (not needed for synthetic_* sets)")
    parser.add_argument("--ratio", type=_number(float), default=None, help="labeled ratio in (0, 1]; 1.0 = full supervision")
    parser.add_argument("--labeled", type=_number(int), default=None, help="number of labeled units (wins over --ratio)")
    parser.add_argument("--profile", default="cpu", help="paper | cpu | smoke")
    parser.add_argument("--seed", type=_number(int), default=0)
    parser.add_argument("--devices", type=_number(int), default=None, help="devices for Lightning DDP (default from the profile: 1)")
    parser.add_argument("--out", default=None, help="runs folder (default runs/)")
    parser.add_argument("--leaderboard-dir", default=None, help="where <dataset>.csv is appended (default leaderboards/)")
    parser.add_argument("--wandb", choices=["disabled", "offline", "online"], default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config value, e.g. --set trainer.max_steps=500 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmark", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train one method on one dataset split and test it (a leaderboard row)")
    add_run_options(run)
    run.add_argument("--from-study", default=None, metavar="STUDY",
                     help="train with the best trial of an Optuna study: its folder (runs/tune/<study>) or STORAGE_URL#STUDY_NAME")
    run.add_argument("--show-config", action="store_true", help="print the resolved config and exit")

    tune = commands.add_parser("tune", help="Optuna search of a method's hyperparameters on validation Dice (never test)")
    add_run_options(tune)
    tune.add_argument("--trials", type=_number(int), default=20, help="trials of the study in total, over all workers (default 20)")
    tune.add_argument("--workers", type=_number(int), default=1, help="worker processes on this machine (default 1)")
    tune.add_argument("--storage", default=None, help="sqlite (default for 1 worker) | journal (default for more) | "
                      "sqlite:///PATH | journal:PATH | postgresql://USER@HOST:PORT/DB (workers on several machines)")
    tune.add_argument("--study-name", default=None, help="default <method>-<dataset>-L<labeled>-<profile>")
    tune.add_argument("--space", default=None, metavar="FILE", help="search-space YAML replacing the method's "
                      "(format: benchmark/configs/search_spaces/*.yaml)")
    tune.add_argument("--pruner", default="median", help="median | hyperband | none (on intermediate validation Dice)")
    tune.add_argument("--pruner-startup-trials", type=_number(int), default=5, help="median pruner: trials before any is pruned")
    tune.add_argument("--sampler-startup-trials", type=_number(int), default=10, help="TPE: random trials before the model")
    tune.add_argument("--seed-per-trial", action="store_true", help="trial seed = --seed + trial number (default: all trials --seed)")
    tune.add_argument("--heartbeat-interval", type=_number(int), default=60, help="seconds between heartbeats of a running trial")
    tune.add_argument("--grace-period", type=_number(int), default=180, help="a trial without heartbeat this long is failed and retried")
    tune.add_argument("--max-retry", type=_number(int), default=2, help="retries of a trial whose worker was killed")
    tune.add_argument("--keep-checkpoints", action="store_true", help="keep the trials' checkpoints (deleted by default)")
    tune.add_argument("--report-only", action="store_true", help="only write the summary and plots of the study")

    listing = commands.add_parser("list", help="print the known methods, datasets or profiles, one per line")
    listing.add_argument("what", choices=["methods", "datasets", "profiles"])

    score = commands.add_parser("score", help="score a folder of predictions against a folder of ground truths")
    score.add_argument("pred", help="folder of predictions (.nii, .nii.gz or .h5 with 'label'/'prediction')")
    score.add_argument("gt", help="folder of ground truths, matched by file name")
    score.add_argument("--spacing", action="store_true", help="distances in the files' spacing units instead of voxels")
    score.add_argument("--out", default=None, help="CSV to write (default: <pred>/scores.csv)")
    score.add_argument("--empty-policy", default="penalty", choices=["penalty", "literature"])
    return parser


def config_from_args(args: argparse.Namespace, first_overrides: Sequence[str] = ()) -> dict:
    """The resolved config of the run options; ``first_overrides`` come before the user's --set (which win)."""
    from benchmark.config import resolve_config
    from methods.registry import get_method

    method_cls = get_method(args.method)
    from datamodules import get_dataset

    entry = get_dataset(args.dataset)
    overrides = [*first_overrides, *args.overrides]
    for key, value in (
        ("data.root", args.data_root), ("data.ratio", args.ratio), ("data.labeled", args.labeled),
        ("run.seed", args.seed), ("trainer.devices", args.devices), ("run.out", args.out),
        ("run.leaderboard_dir", args.leaderboard_dir), ("run.wandb", args.wandb),
    ):
        if value is not None and value != "":
            overrides.insert(0, f"{key}={value}")
    if args.no_progress:
        overrides.insert(0, "run.progress=false")
    return resolve_config(args.dataset, args.method, args.profile, overrides, method_cls.defaults, family=entry.family)


def command_run(args: argparse.Namespace) -> int:
    study_overrides: list[str] = []
    if args.from_study:
        from benchmark.tune import best_trial_overrides

        study_overrides, origin = best_trial_overrides(args.from_study, args.method)
        print(f"{origin}: {' '.join(study_overrides)}")
    config = config_from_args(args, study_overrides)
    if args.show_config:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    from benchmark.run import run

    rows = run(config)
    if rows:
        print_summary(rows)
    return 0


def print_summary(rows: list[dict]) -> None:
    first = rows[0]
    print(f"\n{first['method']} on {first['dataset']} ({first['profile']} profile), "
          f"{first['labeled_cases']} labeled {first['labeled_unit']}s, seed {first['seed']}, {first['steps']} steps, "
          f"{first['wall_time_s']:.0f} s")
    print(f"{'checkpoint':<10} {'step':>6} {'Dice':>7} {'Jaccard':>8} {'HD95':>8} {'ASD':>7}   per-class Dice")
    for row in rows:
        per_class = " ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("dice_"))
        print(f"{row['checkpoint']:<10} {row['step']:>6} {row['dice']:>7.4f} {row['jaccard']:>8.4f} "
              f"{row['hd95']:>8.2f} {row['asd']:>7.2f}   {per_class}")
    print(f"test cases: {first['n_cases']} (distances in {first['units']} units, empty-mask policy '{first['empty_policy']}')")
    print(f"run folder: {first['run_dir']}")
    print(f"leaderboard: row(s) appended for config {first['config_hash']}")


def command_tune(args: argparse.Namespace) -> int:
    from benchmark.tune import command_tune as tune

    return tune(args, config_from_args(args))


def command_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from methods.registry import method_names

        names = method_names()
    elif args.what == "datasets":
        from datamodules import dataset_names

        names = dataset_names()
    else:
        from benchmark.config import PROFILES

        names = list(PROFILES)
    print("\n".join(names))
    return 0


def command_score(args: argparse.Namespace) -> int:
    from benchmark.score import print_scores, score_folders

    out = Path(args.out) if args.out else Path(args.pred) / "scores.csv"
    frame = score_folders(args.pred, args.gt, out_csv=out, use_spacing=args.spacing, empty_policy=args.empty_policy)
    print_scores(frame)
    print(f"written: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": command_run, "tune": command_tune, "list": command_list, "score": command_score}
    try:
        return handlers[args.command](args)
    except UserError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
