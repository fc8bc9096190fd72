"""Command line: ``python -m benchmark run|sweep|leaderboard|tune|list|score|predict|data`` (the Makefile wraps the same commands).

User errors (bad paths, names, values, command lines) print one message (what, where, how to fix) and exit with
code 2; nothing already on disk is changed by them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from benchmark.run_command import PROG, Parser, add_run_options, add_run_parser, command_run, config_from_args
from benchmark.run_command import number as _number
from benchmark.stops import RunStopped
from core.errors import EXIT_RUN_FAILED, EXIT_USER_ERROR, NonFiniteLossError, UserError

EXIT_SOME_RUNS_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    add_run_parser(commands)

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

    sweep = commands.add_parser("sweep", help="run the grid methods x ratios x seeds into the leaderboard (skips what is done)")
    sweep.add_argument("--dataset", default="synthetic_acdc", help="a dataset name (`list datasets`)")
    sweep.add_argument("--methods", nargs="+", default=["supervised"], help="registered methods (space or comma separated)")
    sweep.add_argument("--ratios", nargs="+", default=["0.2"], help="labeled ratios in (0, 1]")
    sweep.add_argument("--seeds", nargs="+", default=["0"], help="seeds")
    sweep.add_argument("--profile", default="cpu", help="paper | cpu | smoke")
    sweep.add_argument("--data-root", default=None)
    sweep.add_argument("--devices", type=_number(int), default=None, help="devices per run (Lightning DDP)")
    sweep.add_argument("--num-nodes", type=_number(int), default=None, help="nodes per run (SLURM launcher)")
    sweep.add_argument("--out", default="runs")
    sweep.add_argument("--leaderboard-dir", default="leaderboards")
    sweep.add_argument("--wandb", choices=["disabled", "offline", "online"], default=None)
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override for every run of the grid (repeatable)")
    sweep.add_argument("--name", default=None, help="sweep name (W&B group; default: a digest of the grid)")
    sweep.add_argument("--shard", default=None, metavar="I/N", help="run only shard I of N (0-based) of the grid")
    sweep.add_argument("--launcher", default="local", help="local (one subprocess per run) | slurm | submitit-local (submitit)")
    sweep.add_argument("--in-process", action="store_true", help="run each point in the sweep process (debugging; no DDP)")
    sweep.add_argument("--progress", action="store_true", help="progress bars in the runs")
    sweep.add_argument("--dry-run", action="store_true", help="print which points are done and which would run")
    slurm = sweep.add_argument_group("SLURM (--launcher slurm, through submitit)")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-gpus-per-node", type=_number(int), default=None, help="default: --devices")
    slurm.add_argument("--slurm-cpus-per-task", type=_number(int), default=None)
    slurm.add_argument("--slurm-mem-gb", type=_number(int), default=None)
    slurm.add_argument("--slurm-time", dest="slurm_time_min", type=_number(int), default=24 * 60, help="minutes per run (default 1440)")
    slurm.add_argument("--slurm-max-parallel", type=_number(int), default=None, help="jobs in flight at once (default: all)")
    slurm.add_argument("--slurm-setup", action="append", default=[], help="shell line run before each job (repeatable)")
    slurm.add_argument("--slurm-param", dest="slurm_params", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. account=proj or qos=high (repeatable)")

    board = commands.add_parser("leaderboard", help="aggregate the leaderboard CSVs into leaderboards/README.md and plots")
    board.add_argument("--dir", default="leaderboards", help="folder of <dataset>.csv and reported.csv")
    board.add_argument("--out", default=None, help="folder for README.md and the plots (default: --dir)")
    board.add_argument("--datasets", nargs="*", default=None, help="only these datasets (default: every CSV but reported.csv)")

    listing = commands.add_parser("list", help="print the known methods, datasets or profiles, one per line")
    listing.add_argument("what", choices=["methods", "datasets", "profiles"])

    score = commands.add_parser("score", help="score a folder of predictions against a folder of ground truths")
    score.add_argument("pred", help="folder of predictions (.nii, .nii.gz, .h5 with 'label'/'prediction', .png, .jpg)")
    score.add_argument("gt", help="folder of ground truths, matched by file name")
    score.add_argument("--spacing", action="store_true", help="distances in the files' spacing units instead of voxels")
    score.add_argument("--out", default=None, help="CSV to write (default: <pred>/scores.csv)")
    score.add_argument("--empty-policy", default="penalty", choices=["penalty", "literature"])
    score.add_argument("--num-classes", type=_number(int), default=None,
                       help="classes including background (default: 1 + the largest ground-truth label)")
    score.add_argument("--workers", type=_number(int), default=None,
                       help="processes scoring cases in parallel (default: one per core)")

    predict = commands.add_parser("predict", help="label maps of a folder of images with a trained run (same formats, sizes, affines)")
    predict.add_argument("run_dir", metavar="RUN", help="a finished run folder (runs/<dataset>/<method>/L<n>_s<seed>_...)")
    predict.add_argument("input", help="folder of images: .h5 (dataset 'image'), .nii/.nii.gz, .png/.jpg/.jpeg")
    predict.add_argument("output", help="folder for the label maps (created)")
    predict.add_argument("--checkpoint", choices=["last", "best"], default="last")

    from benchmark.data_commands import add_parser as add_data_parser

    add_data_parser(commands)
    return parser


def _numbers(values: list[str], kind, what: str) -> list:
    from benchmark.sweep import split_words

    numbers = []
    for word in split_words(values):
        try:
            numbers.append(kind(word))
        except ValueError:
            raise UserError(f"{what} holds {word!r}, which is not {'a whole number' if kind is int else 'a number'}") from None
    return numbers


def command_sweep(args: argparse.Namespace) -> int:
    from benchmark.leaderboard import leaderboard_dir_for
    from benchmark.sweep import SweepOptions, split_words, sweep

    options = SweepOptions(**{
        **{k: v for k, v in vars(args).items() if k not in ("command", "methods", "ratios", "seeds")},
        "leaderboard_dir": str(leaderboard_dir_for(args.profile, args.leaderboard_dir, args.out)),
        "methods": split_words(args.methods),
        "ratios": _numbers(args.ratios, float, "RATIOS"),
        "seeds": _numbers(args.seeds, int, "SEEDS"),
    })
    outcomes = sweep(options)
    return EXIT_SOME_RUNS_FAILED if any(o.status in ("failed", "stopped") for o in outcomes.values()) else 0


def command_leaderboard(args: argparse.Namespace) -> int:
    from benchmark.leaderboard_page import render_leaderboards

    written = render_leaderboards(Path(args.dir), Path(args.out) if args.out else None, args.datasets)
    for path in written:
        print(f"written: {path}")
    return 0


def command_tune(args: argparse.Namespace) -> int:
    from benchmark.tune import command_tune as tune

    return tune(args, config_from_args(args))


def command_list(args: argparse.Namespace) -> int:
    from benchmark.catalogue import catalogue

    if args.what == "methods":
        names = catalogue()["methods"]
    elif args.what == "datasets":
        names = sorted(catalogue()["datasets"])
    else:
        from benchmark.config import PROFILES

        names = list(PROFILES)
    print("\n".join(names))
    return 0


def command_score(args: argparse.Namespace) -> int:
    from benchmark.score import print_scores, score_folders

    out = Path(args.out) if args.out else Path(args.pred) / "scores.csv"
    frame = score_folders(args.pred, args.gt, out_csv=out, use_spacing=args.spacing, empty_policy=args.empty_policy,
                          num_classes=args.num_classes, workers=args.workers)
    print_scores(frame)
    print(f"written: {out}")
    return 0


def command_predict(args: argparse.Namespace) -> int:
    from benchmark.predict import predict_folder

    written = predict_folder(args.run_dir, args.input, args.output, args.checkpoint)
    print(f"written: {len(written)} label map(s) into {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from benchmark.data_commands import command_data

    handlers = {"run": command_run, "sweep": command_sweep, "leaderboard": command_leaderboard, "tune": command_tune,
                "list": command_list, "score": command_score, "data": command_data,
                "predict": command_predict}
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run" and args.resume:  # the run folder's config fills in the options not given
            from benchmark.resume import given_options

            args.given_options = given_options(build_parser(), sys.argv[1:] if argv is None else argv)
        return handlers[args.command](args)
    except UserError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except RunStopped as stop:  # SIGTERM / SIGINT during a run: 143 / 130, and how to resume
        print(f"{stop.message}", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
