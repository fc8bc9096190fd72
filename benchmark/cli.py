"""Command line: ``python -m benchmark run|sweep|leaderboard|tune|list|score|predict|data`` (the Makefile wraps the same commands).

User errors (bad paths, names, values, command lines) print one message (what, where, how to fix) and exit with
code 2; nothing already on disk is changed by them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from benchmark.stops import RunStopped
from core.errors import EXIT_RUN_FAILED, EXIT_USER_ERROR, NonFiniteLossError, UserError

EXIT_SOME_RUNS_FAILED = 1
WANDB_MODES_FROM_ENV = {"offline": "offline", "dryrun": "offline", "online": "online", "run": "online"}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported like every other user error: one message, exit code 2."""

    def error(self, message: str):
        raise UserError(message, where=f"the command line of `{self.prog}`",
                        fix=f"`{self.prog} --help` lists the options")


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
    parser.add_argument("--accelerator", default=None, help="auto | cpu | gpu (default from the config: auto)")
    parser.add_argument("--precision", default=None, help="32-true | bf16-mixed | 16-mixed (GPU) | ... (default 32-true)")
    parser.add_argument("--num-nodes", type=_number(int), default=None, help="nodes for multi-node DDP (torchrun/SLURM; default 1)")
    parser.add_argument("--out", default=None, help="runs folder (default runs/)")
    parser.add_argument("--leaderboard-dir", default=None, help="where <dataset>.csv is appended (default leaderboards/; "
                        "smoke-profile rows go to <out>/leaderboards-smoke instead of the repository's leaderboards/)")
    parser.add_argument("--wandb", choices=["disabled", "offline", "online"], default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config value, e.g. --set trainer.max_steps=500 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m benchmark", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train one method on one dataset split and test it (a leaderboard row)")
    add_run_options(run)
    run.add_argument("--from-study", default=None, metavar="STUDY",
                     help="train with the best trial of an Optuna study: its folder (runs/tune/<study>) or STORAGE_URL#STUDY_NAME")
    run.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue this interrupted run folder from its last checkpoint with the config it holds (other "
                          "options given must not change the config hash or seed); a finished run only gets its missing rows written")

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


def config_from_args(args: argparse.Namespace, first_overrides: Sequence[str] = ()) -> dict:
    """The resolved config of the run options; ``first_overrides`` come before the user's --set (which win)."""
    from benchmark.config import resolve_config
    from methods.registry import get_method

    method_cls = get_method(args.method)
    from datamodules import get_dataset

    entry = get_dataset(args.dataset)
    from benchmark.overrides import join_split_overrides

    overrides = [*first_overrides, *join_split_overrides(args.overrides)]
    # W&B stays off unless asked for, by --wandb or by the environment W&B itself reads.
    wandb = args.wandb or WANDB_MODES_FROM_ENV.get(os.environ.get("WANDB_MODE", ""))
    for key, value in (
        ("data.root", args.data_root), ("data.ratio", args.ratio), ("data.labeled", args.labeled),
        ("run.seed", args.seed), ("trainer.devices", args.devices), ("trainer.num_nodes", args.num_nodes),
        ("trainer.accelerator", args.accelerator), ("trainer.precision", args.precision),
        ("run.out", args.out), ("run.leaderboard_dir", args.leaderboard_dir), ("run.wandb", wandb),
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
    if args.resume:
        from benchmark.resume import resumed_config

        config = resumed_config(args, getattr(args, "given_options", set(vars(args))), study_overrides)
    else:
        config = config_from_args(args, study_overrides)
    if args.show_config:
        from benchmark.show_config import show_config

        print(show_config(config), end="")
        return 0
    from benchmark.run import run
    from core.distributed import release_process_group

    rows = run(config, resume=args.resume)
    release_process_group()
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
              f"{row.get('hd95', float('nan')):>8.2f} {row.get('asd', float('nan')):>7.2f}   {per_class}")
    print(f"test cases: {first['n_cases']} (distances in {first['units']} units, empty-mask policy '{first['empty_policy']}')")
    print(f"run folder: {first['run_dir']}")
    print(f"leaderboard: row(s) appended for config {first['config_hash']}")


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
    from benchmark.report import render_leaderboards

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
