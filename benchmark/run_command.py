"""The `run` command: its options, its parser and what it does.

Shared by the command line (benchmark/cli.py) and the sweep (benchmark/sweep.py), which runs the same request
(benchmark/run_request.py) for every point of its grid; keeping it here lets the sweep use it without importing
the cli that launches the sweep.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from core.errors import UserError

PROG = "python -m benchmark"


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported like every other user error: one message, exit code 2."""

    def error(self, message: str):
        raise UserError(message, where=f"the command line of `{self.prog}`",
                        fix=f"`{self.prog} --help` lists the options")


def number(kind):
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
    parser.add_argument("--ratio", type=number(float), default=None, help="labeled ratio in (0, 1]; 1.0 = full supervision")
    parser.add_argument("--labeled", type=number(int), default=None, help="number of labeled units (wins over --ratio)")
    parser.add_argument("--profile", default="cpu", help="paper | cpu | smoke")
    parser.add_argument("--seed", type=number(int), default=0)
    parser.add_argument("--devices", type=number(int), default=None, help="devices for Lightning DDP (default from the profile: 1)")
    parser.add_argument("--accelerator", default=None, help="auto | cpu | gpu (default from the config: auto)")
    parser.add_argument("--precision", default=None, help="32-true | bf16-mixed | 16-mixed (GPU) | ... (default 32-true)")
    parser.add_argument("--num-nodes", type=number(int), default=None, help="nodes for multi-node DDP (torchrun/SLURM; default 1)")
    parser.add_argument("--out", default=None, help="runs folder (default runs/)")
    parser.add_argument("--leaderboard-dir", default=None, help="where <dataset>.csv is appended (default leaderboards/; "
                        "smoke-profile rows go to <out>/leaderboards-smoke instead of the repository's leaderboards/)")
    parser.add_argument("--wandb", choices=["disabled", "offline", "online"], default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config value, e.g. --set trainer.max_steps=500 (repeatable)")


def add_run_parser(commands) -> argparse.ArgumentParser:
    """The `run` subcommand on the subparsers ``commands`` of the full command line or of :func:`run_parser`."""
    run = commands.add_parser("run", help="train one method on one dataset split and test it (a leaderboard row)")
    add_run_options(run)
    run.add_argument("--from-study", default=None, metavar="STUDY",
                     help="train with the best trial of an Optuna study: its folder (runs/tune/<study>) or STORAGE_URL#STUDY_NAME")
    run.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue this interrupted run folder from its last checkpoint with the config it holds (other "
                          "options given must not change the config hash or seed); a finished run only gets its missing rows written")
    return run


def run_parser() -> argparse.ArgumentParser:
    """A command line that knows only `run` and parses its arguments as the full command line does."""
    parser = Parser(prog=PROG)
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def config_from_args(args: argparse.Namespace, first_overrides: Sequence[str] = ()) -> dict:
    """The resolved config of the run options (not yet finished); ``first_overrides`` come before the user's --set
    (which win)."""
    from benchmark.run_request import RunRequest

    return RunRequest.from_args(args).resolve(first_overrides)


def command_run(args: argparse.Namespace) -> int:
    study_overrides: list[str] = []
    if args.from_study:
        from benchmark.tune_results import best_trial_overrides

        study_overrides, origin = best_trial_overrides(args.from_study, args.method)
        print(f"{origin}: {' '.join(study_overrides)}")
    from benchmark.finalize import finalize

    if args.resume:
        from benchmark.resume import resumed_config

        config = resumed_config(args, getattr(args, "given_options", set(vars(args))), study_overrides)
    else:
        config = config_from_args(args, study_overrides)
    if not args.show_config:  # a machine that cannot run the request says so first (show-config imports no torch)
        from benchmark.hardware import check_hardware

        check_hardware(config["trainer"])
    config = finalize(config)
    if args.show_config:
        from benchmark.show_config import show_config

        print(show_config(config), end="")
        return 0
    return execute(config, args.resume)


def execute(config: dict, resume: str | Path | None = None) -> int:
    """Train and test a finished config (continuing the run folder ``resume``), print the summary of its rows."""
    from benchmark.run import run

    rows = run(config, resume=resume)
    if rows:
        print_summary(rows)
    return 0


def print_summary(rows: list[dict]) -> None:
    first = rows[0]
    print(f"\n{first['method']} on {first['dataset']} ({first['profile']} profile), "
          f"{first['labeled_cases']} labeled {first['labeled_unit']}s, seed {first['seed']}, {first['steps']} steps, "
          f"{first['wall_time_s']:.0f} s" + (f" ({first['cpu_time_s']:.0f} CPU s)" if first.get("cpu_time_s") not in (None, "") else ""))
    print(f"{'checkpoint':<10} {'step':>6} {'Dice':>7} {'Jaccard':>8} {'HD95':>8} {'ASD':>7}   per-class Dice")
    for row in rows:
        per_class = " ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("dice_"))
        print(f"{row['checkpoint']:<10} {row['step']:>6} {row['dice']:>7.4f} {row['jaccard']:>8.4f} "
              f"{row.get('hd95', float('nan')):>8.2f} {row.get('asd', float('nan')):>7.2f}   {per_class}")
    print(f"test cases: {first['n_cases']} (distances in {first['units']} units, empty-mask policy '{first['empty_policy']}')")
    print(f"run folder: {first['run_dir']}")
    print(f"leaderboard: row(s) appended for config {first['config_hash']}")
