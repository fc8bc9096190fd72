"""One run: config -> DataModule -> method -> Trainer.fit (once per training stage) -> test of the last and
best-on-val checkpoints -> run folder + leaderboard rows.

Multi-stage methods (``Method.stages``, e.g. ACTION's pretrain_global, pretrain_local, finetune) train their
stages in order in one run: each stage is a fresh module and Trainer that starts from the weights of the previous
stage's last checkpoint (loaded with ``weights_only``), writes its logs and checkpoints into ``<run>/<stage>/`` and
gets the config merged with ``per_stage.<stage>`` (``trainer.max_steps`` is each stage's budget unless
``per_stage.<stage>.trainer.max_steps`` says otherwise). Only the final stage is tested; the rows then carry
``stages`` and ``stage_steps`` columns. ``run.stages`` trains a subset (e.g. ``finetune``), starting from
``run.init_from`` when it does not begin with the method's first stage. Single-stage methods keep the flat layout.

The run folder holds the resolved config, the split, Lightning's CSV logs, the checkpoints, per-case metrics of
both checkpoints and result.json. Only rank 0 evaluates and writes; under DDP (``trainer.devices > 1``) Lightning
re-launches this same command once per rank, and the ranks agree on the run folder through an environment
variable set before the launch.

Killed runs and ``--resume RUN_DIR`` (benchmark/checkpoints.py has the files): every validation rewrites the
stage's resumable full-state checkpoint; a resumed run (same config hash and seed, checked) skips the stages whose
``last.ckpt`` exists, continues the interrupted one from its ``resume.ckpt`` (or starts it over if it never
validated) and then tests and writes the rows, unless the leaderboard already holds this folder's rows. Data
order, augmentation and the global random states are restored, so on CPU the resumed run ends with the very
metrics of an uninterrupted one. A run folder is held by one process at a time (a lock the kernel drops when
the process dies), so two resumes of one folder cannot both run it.

A fresh run stopped by bad input (a UserError) before it wrote any checkpoint removes its folder again; later,
the folder stays and the message says how to resume it once the input is fixed.

This file holds the run's course (checks, stages, test, rows); its parts live beside it: run_folder.py (the folder,
its lock and resume checks), trainer_setup.py (Trainer, loggers, fit), run_logs.py (joined logs, curves, archives)
and weights.py (loading checkpoints).
"""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger

from benchmark.checkpoints import (
    RESUME_CHECKPOINT, RunClock, best_validation_score, checkpoint_folder, checkpoint_space_needed, checkpoint_step_and_clock,
)
from benchmark.config import PER_STAGE, config_hash, stage_config
from benchmark.finalize import finalize
from benchmark.hardware import check_hardware
from benchmark.leaderboard import append_rows, check_writable, read_leaderboard, recorded_rows
from benchmark.precision import check_numerics, chosen_precision
from benchmark.run_folder import (  # noqa: F401 (RUN_DIR_ENV, inherited_run_dir, unfinished_run_folder: for the importers of benchmark.run)
    RUN_DIR_ENV, RunFolder, global_rank, check_resumable, holding_run_folder, inherited_run_dir, leaderboard_path,
    make_run_dir, resume_hint, share_run_dir_with_ranks, stopped_by_user_error, unfinished_run_folder,
)
from benchmark.run_logs import (append_test_metrics, archive_config, archive_per_case, archive_validation_curve,
                                 join_interrupted_metrics)  # noqa: F401 (join_interrupted_metrics: for importers)
from benchmark.run_report import write_run_report_safely
from benchmark.schema import validate_config
from benchmark.stops import RunStopped, raise_if_stopped, stop_signals_raise
from benchmark.trainer_setup import build_loggers, build_trainer, fit
from benchmark.weights import init_stage, load_weights, load_weights_from_rank_zero  # noqa: F401 (load_weights: for importers)
from core.atomic import full_disk_error, is_full_disk, remove_stale_temporaries, replaced_atomically, write_text_atomically
from core.distributed import (broadcast_from_rank_zero, check_shareable, check_world_fits, gather_to_all, my_share,
                              rank_and_world, release_process_group)
from core.errors import UserError
from core.evaluation import Evaluator, summarize
from datamodules import build_datamodule, get_dataset
from methods.registry import get_method

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare(config: dict[str, Any]):
    """Check everything a user can get wrong and build the DataModule, before anything is written or trained.
    ``config`` is finished (benchmark/finalize.py) and stays as it is."""
    validate_config(config)  # again: tuning trials and callers of run() bypass resolve_config
    check_hardware(config["trainer"])
    entry = get_dataset(config["dataset"])
    method_cls = get_method(config["method_name"])
    method_cls.check_dataset(entry.spec)
    check_numerics(config, entry.spec)
    check_finished(config)
    datamodule = build_datamodule(
        config["dataset"], config, use_unlabeled=method_cls.uses_unlabeled, labeled_partitions=method_cls.labeled_partitions
    )
    if datamodule.split.labeled_count != config["data"]["labeled"]:
        raise RuntimeError(f"the labeled count finished from the lists of {config['dataset']} ({config['data']['labeled']}) "
                           f"differs from the DataModule's split ({datamodule.split.labeled_count}): datamodules/listing.py "
                           "counts this layout's units otherwise than its read_split")
    check_world_fits(config, datamodule, method_cls.uses_unlabeled)  # once, here, not in every launched rank
    run = config["run"]
    check_writable(Path(run["out"]))
    check_writable(Path(run["leaderboard_dir"]))
    read_leaderboard(leaderboard_path(config))  # a damaged CSV stops the run now, not after training
    return entry, method_cls, datamodule


def check_finished(config: dict[str, Any]) -> None:
    """A config that did not go through benchmark/finalize.py is a programming error (its hash would be wrong)."""
    if config != finalize(config):
        raise ValueError("run.prepare() needs a finished config: pass it through benchmark.finalize.finalize() first")


def plan_stages(method_cls, config: dict[str, Any]) -> list[str]:
    """The stages this run trains, in order; checks run.stages, run.init_from and per_stage against the method."""
    declared = list(method_cls.stages)
    asked = config["run"].get("stages")
    chosen = declared if asked is None else [asked] if isinstance(asked, str) else list(asked)
    unknown = [name for name in [*chosen, *config.get(PER_STAGE, {})] if name not in declared]
    if unknown:
        raise UserError(f"{config['method_name']} has no stage {unknown[0]!r}", where=f"its stages, in order: {', '.join(declared)}",
                        fix="run.stages takes one stage or a list of them, e.g. run.stages=" + declared[-1])
    positions = [declared.index(name) for name in chosen]
    if not chosen or positions != sorted(set(positions)):
        raise UserError(f"run.stages={asked!r} must name distinct stages in their order", where=f"stages of {config['method_name']}: {', '.join(declared)}",
                        fix="e.g. run.stages=" + declared[-1])
    init_from = config["run"].get("init_from")
    if init_from is not None and not Path(init_from).is_file():
        raise UserError("run.init_from checkpoint not found", where=str(init_from),
                        fix="give the path of a .ckpt file (e.g. <run>/<stage>/checkpoints/last.ckpt)")
    if positions[0] > 0 and init_from is None:
        raise UserError(f"stage {chosen[0]!r} continues from stage {declared[positions[0] - 1]!r} but no checkpoint was given",
                        fix=f"set run.init_from=<run>/{declared[positions[0] - 1]}/checkpoints/last.ckpt")
    return chosen


# ---- one run --------------------------------------------------------------------------------------------------


def evaluate_spread(evaluator: Evaluator, model: pl.LightningModule, cases, progress: bool, desc: str) -> pd.DataFrame:
    """Per-case metrics of all ``cases``, each rank scoring its share; the full table (in the cases' order) on every
    rank."""
    share = type(cases)(my_share(cases.case_ids), cases.load_case)
    per_case = evaluator.evaluate(model.predict_logits, share, progress=progress, device=model.device, desc=desc)
    parts = gather_to_all(per_case)
    if len(parts) == 1:
        return per_case
    order = {case_id: index for index, case_id in enumerate(cases.case_ids)}
    merged = pd.concat(parts, ignore_index=True)
    # A stable sort on the case's position keeps each case's class rows in their order.
    return merged.iloc[merged["case"].map(order).argsort(kind="stable")].reset_index(drop=True)


def peak_memory() -> tuple[float, float]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return rss_mb, gpu_mb


def rounded_or_empty(seconds: float | None) -> float | str:
    """A row's seconds to 0.1, or an empty cell when unknown."""
    return "" if seconds is None else round(seconds, 1)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Trained:
    """What training in this process left for the test: the final stage's model and trainer (None when a resume
    found every stage finished) and each stage's steps."""

    stage_steps: dict[str, int] = field(default_factory=dict)
    model: pl.LightningModule | None = None
    trainer: pl.Trainer | None = None


def train_stages(config, method_cls, spec, datamodule, stages: list[str], folder: RunFolder, digest: str,
                 callbacks: Sequence[pl.Callback], record_failure, clock: RunClock) -> Trained:
    """Train the stages in order; on a resume, skip the finished ones and continue the interrupted one (the
    clock carries on from the latest checkpoint it starts from)."""
    init_from = config["run"].get("init_from")
    previous_checkpoint = Path(init_from) if init_from else None
    rank_zero = global_rank(int(config["trainer"]["devices"])) == 0
    trained = Trained()
    for stage in stages:
        last_checkpoint = folder.last_checkpoint(stage)
        stage_dir = folder.stage_dir(stage)
        if last_checkpoint.is_file():  # finished before this resume
            if rank_zero:  # left if the run was killed between writing last.ckpt and deleting it
                (checkpoint_folder(stage_dir) / RESUME_CHECKPOINT).unlink(missing_ok=True)
            step, clock_state = checkpoint_step_and_clock(last_checkpoint)
            clock.load_state_dict(clock_state)  # superseded by the interrupted stage's resume.ckpt, if it has one
            trained = Trained(trained.stage_steps | {stage: step})
            previous_checkpoint = last_checkpoint
            continue
        staged = stage_config(config, stage)
        if folder.multi_stage and rank_zero:
            stage_dir.mkdir(exist_ok=True)
            write_text_atomically(stage_dir / "config.yaml", yaml.safe_dump({**staged, "config_hash": digest}, sort_keys=False))
        pl.seed_everything(config["run"]["seed"], workers=True, verbose=False)
        model = method_cls(spec, staged)
        model.on_stage_start(init_stage(model, previous_checkpoint))
        # A stage that validates only at its end (ACTION's pretraining) still leaves a resumable checkpoint every
        # val_every steps of the run.
        validates_only_at_end = staged["trainer"]["val_every"] >= staged["trainer"]["max_steps"]
        checkpoint_every = min(config["trainer"]["val_every"], staged["trainer"]["max_steps"]) if validates_only_at_end else None
        # Extra callbacks (the tuner's validation reporter) watch the final stage only: the earlier stages'
        # validation scores an unfinished model.
        trainer, _ = build_trainer(staged, stage_dir, digest, (*(callbacks if stage == stages[-1] else ()), clock),
                                   checkpoint_every)
        # A stage with its own data settings or budget (the samplers are step-indexed) gets its own loaders over
        # the same split.
        same_loaders = staged["data"] == config["data"] and staged["trainer"]["max_steps"] == config["trainer"]["max_steps"]
        stage_data = datamodule if same_loaders else build_datamodule(
            config["dataset"], staged, use_unlabeled=method_cls.uses_unlabeled)
        resume_checkpoint = folder.resume_checkpoint(stage)
        try:
            fit(trainer, model, stage_data, stage_dir, resume_checkpoint)
            raise_if_stopped()  # arrived in the last moments and was lost in a finalizer (trainer_setup.StopAtNextBatch)
        except KeyboardInterrupt:
            raise
        except SystemExit as error:  # Lightning's SIGTERMException: a stop whose own exception was lost on the way
            raise_if_stopped(error)
            raise
        except Exception as error:
            raise_if_stopped(error)  # e.g. a loader worker ended by the same SIGTERM, noticed before the main process's
            if is_full_disk(error):  # not a failure of the method: no failed row; the folder stays resumable
                raise full_disk_error(folder.path, checkpoint_space_needed(folder.path, model)) from error
            if isinstance(error, UserError):
                raise
            if trainer.is_global_zero:
                record_failure(error, stage, sum(trained.stage_steps.values()) + trainer.global_step)
            raise
        # Saved here rather than by ModelCheckpoint(save_last=True), which skips the final step when the last
        # validation does not improve the monitored score. A collective call under DDP; rank 0 writes.
        trainer.save_checkpoint(last_checkpoint, weights_only=False)  # full state
        if trainer.is_global_zero:
            (checkpoint_folder(stage_dir) / RESUME_CHECKPOINT).unlink(missing_ok=True)  # last.ckpt supersedes it
        trained = Trained(trained.stage_steps | {stage: trainer.global_step}, model, trainer)
        previous_checkpoint = last_checkpoint
    return trained


def evaluate_checkpoints(config, spec, method_cls, datamodule, folder: RunFolder, stage: str, trained: Trained,
                         base_row: dict[str, Any], digest: str, clock: RunClock, rank_zero: bool) -> tuple[list[dict], dict]:
    """Test the final stage's last and best checkpoints: (leaderboard rows, summaries); writes the per-case CSVs.

    Under DDP every rank scores its share of the test cases with rank 0's weights; rank 0 gathers and writes
    (the other ranks return no rows)."""
    staged = stage_config(config, stage)
    model = trained.model if trained.model is not None else method_cls(spec, staged)
    evaluator = Evaluator.from_config(spec, config)
    model.eval()
    test_cases = datamodule.cases("test")
    check_shareable(len(test_cases), rank_and_world()[1], "test")
    checkpoints = {"last": folder.last_checkpoint(stage)}
    best = folder.best_checkpoint(stage)
    if best.is_file():
        checkpoints["best"] = best
    checkpoints = broadcast_from_rank_zero(checkpoints)  # rank 0's view of its folder
    rows, results = [], {}
    for kind, path in checkpoints.items():
        step = load_weights_from_rank_zero(model, path)
        per_case = evaluate_spread(evaluator, model, test_cases, progress=config["run"]["progress"], desc=f"test ({kind})")
        if not rank_zero:
            continue
        with replaced_atomically(folder.path / f"test_per_case_{kind}.csv") as out:
            per_case.to_csv(out, index=False)
        summary = summarize(per_case)
        results[kind] = {"step": step, **summary}
        rss, gpu = peak_memory()
        rows.append({
            **base_row, "checkpoint": kind, "step": step, **summary, "status": "ok",
            "steps": sum(trained.stage_steps.values()), "wall_time_s": round(clock.seconds(), 1),
            "cpu_time_s": rounded_or_empty(clock.cpu_seconds()),
            "peak_rss_mb": round(rss, 1), "peak_gpu_mb": round(gpu, 1), "finished_at": now_utc(),
        })
    if not rank_zero:
        return [], {}
    step = trained.stage_steps[stage]
    test_metrics = [{f"test_{kind}/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
                    for kind, summary in results.items()]
    append_test_metrics(folder.stage_dir(stage) / "logs" / "metrics.csv", test_metrics, step)
    loggers = trained.trainer.loggers if trained.trainer is not None else build_loggers(staged, folder.stage_dir(stage), digest)
    for logger in loggers:
        # The CSV file was written above; a CSVLogger also deletes the metrics.csv it finds when it first logs.
        if not isinstance(logger, CSVLogger):
            for metrics in test_metrics:
                logger.log_metrics(metrics, step=step)
        logger.finalize("success")  # a CSVLogger that never logged does nothing here
    if config["run"]["wandb"] != "disabled":
        import wandb

        wandb.finish()  # several runs in one process (sweeps) must not log into one W&B run
    return rows, results


def run(config: dict[str, Any], callbacks: Sequence[pl.Callback] = (), resume: str | Path | None = None) -> list[dict[str, Any]]:
    """:func:`run_once` of the finished ``config`` (benchmark/finalize.py; finishing a finished config changes
    nothing), with SIGTERM and SIGINT stopping it as :class:`RunStopped` (benchmark/stops.py). A DDP run that
    finished releases its process group here, so that every caller (the CLI, scripts, tuning trials) gets it
    (core/distributed.py, release_process_group)."""
    with stop_signals_raise():
        rows = run_once(finalize(config), callbacks, resume)
    release_process_group()
    return rows


def run_once(config: dict[str, Any], callbacks: Sequence[pl.Callback] = (), resume: str | Path | None = None) -> list[dict[str, Any]]:
    """Train and test one configuration; returns the leaderboard rows written (empty on non-zero ranks, and for
    a resumed run whose rows the leaderboard already holds).

    ``run.test=false`` stops after training and validation (tuning trials: the test set is never looked at) and
    writes no leaderboard row; ``callbacks`` are added to the Trainer's (the tuner's validation reporter);
    ``resume`` is a run folder of this configuration and seed to continue (``--resume``)."""
    clock = RunClock()
    devices = int(config["trainer"]["devices"])
    if devices > 1 and not torch.cuda.is_available():
        # CPU DDP: every rank's OpenMP pool defaults to all cores; oversubscribed spinning pools slow a step
        # down by an order of magnitude, so split the cores between the ranks.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    entry, method_cls, datamodule = prepare(config)
    stages = plan_stages(method_cls, config)
    digest = config_hash(config)
    rank_zero = global_rank(devices) == 0
    run_dir = check_resumable(Path(resume), config, digest) if resume is not None else make_run_dir(config, digest)
    if rank_zero:
        share_run_dir_with_ranks(run_dir)
    folder = RunFolder(run_dir, multi_stage=len(method_cls.stages) > 1, resumed=resume is not None)
    # After the hash: it covers the request (auto), never a machine's choice (benchmark/precision.py).
    config["trainer"]["precision_chosen"] = chosen_precision(config, method_cls, entry.spec, datamodule.has_unlabeled,
                                                             run_dir if resume is not None else None)
    with holding_run_folder(run_dir) if rank_zero else nullcontext():
        try:
            return run_in_folder(config, digest, entry.spec, method_cls, datamodule, stages, folder, callbacks, rank_zero, clock)
        except RunStopped as stop:
            raise RunStopped(stop.signum, resume_hint(folder) if rank_zero else "") from None
        except UserError as error:
            if not rank_zero:
                raise
            reported = stopped_by_user_error(error, folder)
            if reported is error:
                raise
            raise reported from error


def run_in_folder(config, digest, spec, method_cls, datamodule, stages, folder: RunFolder, callbacks, rank_zero: bool,
                  clock: RunClock) -> list[dict[str, Any]]:
    leaderboard = leaderboard_path(config)
    if rank_zero and folder.resumed:
        remove_stale_temporaries(folder.path, recursive=True)  # left by writers killed in this folder
        recorded = recorded_rows(leaderboard, folder.path)
        if recorded:
            print(f"run folder {folder.path} is finished: the leaderboard {leaderboard} holds its {len(recorded)} row(s); nothing to do")
            return []
    if rank_zero and not folder.resumed:
        write_text_atomically(folder.path / "config.yaml", yaml.safe_dump({**config, "config_hash": digest}, sort_keys=False))
        datamodule.split.write(folder.path / "split.json")

    base_row = {
        "dataset": config["dataset"], "method": config["method_name"], "profile": config["profile"],
        "labeled_cases": datamodule.split.labeled_count, "labeled_unit": spec.labeled_unit,
        "ratio": config["data"].get("ratio") or "", "seed": config["run"]["seed"], "config_hash": digest,
        "empty_policy": config["eval"]["empty_policy"], "lcc": config["eval"]["lcc"],
        "units": "mm" if config["eval"]["use_spacing"] else "voxel",
        "devices": config["trainer"]["devices"], "precision": config["trainer"]["precision_chosen"],
        "global_batch": config["data"]["labeled_batch_size"] + (config["data"]["unlabeled_batch_size"] if datamodule.has_unlabeled else 0),
        "git_rev": git_revision(), "torch": torch.__version__, "lightning": pl.__version__, "host": socket.gethostname(),
        "run_dir": str(folder.path),
    }
    base_row.update(datamodule.leaderboard_fields())
    if folder.multi_stage:
        base_row["stages"] = "+".join(stages)

    def record_failure(error: Exception, stage: str, steps: int) -> None:
        if not config["run"]["test"]:
            return
        message = f"{type(error).__name__}: {error}"
        append_rows(leaderboard, [{
            **base_row, "checkpoint": "none", "status": "failed", "steps": steps, "finished_at": now_utc(),
            "error": (f"stage {stage}: {message}" if folder.multi_stage else message)[:500],
            "wall_time_s": round(clock.seconds(), 1), "cpu_time_s": rounded_or_empty(clock.cpu_seconds()),
        }])

    trained = train_stages(config, method_cls, spec, datamodule, stages, folder, digest, callbacks, record_failure,
                           clock)
    final_stage = stages[-1]
    result_file = folder.path / "result.json"
    if not config["run"]["test"]:
        if not rank_zero:
            return []
        validation = {"best_dice": best_validation_score(folder.last_checkpoint(final_stage)), "steps": trained.stage_steps[final_stage]}
        write_text_atomically(result_file, json.dumps({"config_hash": digest, "rows": [], "validation": validation}, indent=1))
        return []
    if folder.multi_stage:
        base_row["stage_steps"] = "+".join(str(steps) for steps in trained.stage_steps.values())
    # Rank 0 decides (other nodes may not see its folder); every rank then takes part in the test or none does.
    if broadcast_from_rank_zero(rank_zero and folder.resumed and result_file.is_file()):
        if not rank_zero:
            return []
        # Killed after testing, before its rows reached the leaderboard: the rows are in result.json.
        rows = json.loads(result_file.read_text())["rows"]
    else:
        rows, results = evaluate_checkpoints(config, spec, method_cls, datamodule, folder, final_stage, trained, base_row,
                                             digest, clock, rank_zero)
        raise_if_stopped()  # a stop recorded during testing (benchmark/stops.py): no result, no row
        if not rank_zero:
            return []
        stage_record = {"stages": [{"stage": name, "steps": steps, "dir": str(folder.stage_dir(name))}
                                   for name, steps in trained.stage_steps.items()]} if folder.multi_stage else {}
        write_text_atomically(result_file, json.dumps({"config_hash": digest, "rows": rows, "test": results, "resumed": folder.resumed,
                                                       **stage_record}, indent=1, default=str))
    append_rows(leaderboard, rows)
    archive_per_case(leaderboard, config["dataset"], folder.path, [row["checkpoint"] for row in rows])
    archive_validation_curve(leaderboard, config["dataset"], folder, list(trained.stage_steps))
    archive_config(leaderboard, config["dataset"], folder.path)
    write_run_report_safely(folder.path, config, rows, [(stage, folder.stage_dir(stage)) for stage in stages])
    return rows


