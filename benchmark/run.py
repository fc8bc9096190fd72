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
"""
from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import socket
import subprocess
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from core.atomic import full_disk_error, is_full_disk, remove_stale_temporaries, replaced_atomically, write_text_atomically
from benchmark.checkpoints import (
    BEST_NAME, LAST_CHECKPOINT, RESUME_CHECKPOINT, AtomicCheckpointIO, RunClock, best_validation_score,
    checkpoint_callbacks, checkpoint_folder, checkpoint_space_needed, checkpoint_step_and_seconds, read_checkpoint,
)
from benchmark.config import NON_SEMANTIC_KEYS, PER_STAGE, config_hash, stage_config
from benchmark.finalize import finalize
from benchmark.hardware import check_hardware
from benchmark.precision import check_numerics, chosen_precision
from core.distributed import broadcast_from_rank_zero, check_shareable, check_world_fits, gather_to_all, my_share, rank_and_world
from core.errors import UserError
from core.evaluation import Evaluator, summarize
from benchmark.leaderboard import (
    append_rows, check_writable, curve_archive, per_case_archive, read_leaderboard, recorded_rows,
)
from benchmark.resume import read_run_config
from benchmark.run_report import write_run_report_safely
from benchmark.schema import validate_config
from benchmark.stops import RunStopped, stop_received, stop_signals_raise
from benchmark.wandb_overlays import overlay_callbacks
from datamodules import build_datamodule, get_dataset
from methods.registry import get_method

RUN_DIR_ENV = "SSL_BENCH_RUN_DIR"
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


def _global_rank(devices_per_node: int = 1) -> int:
    """This process's DDP rank before the Trainer exists, read the way Lightning picks its cluster environment:
    torchrun (TorchElasticEnvironment: RANK) before SLURM srun tasks (SLURMEnvironment: SLURM_PROCID) before
    Lightning's own launcher, which re-runs this command with NODE_RANK and LOCAL_RANK (LOCAL_RANK alone would
    make the first process of every node a rank 0)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ["RANK"])
    if SLURMEnvironment.detect():
        return int(os.environ["SLURM_PROCID"])
    return int(os.environ.get("NODE_RANK", 0)) * devices_per_node + int(os.environ.get("LOCAL_RANK", 0))


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


def leaderboard_path(config: dict[str, Any]) -> Path:
    return Path(config["run"]["leaderboard_dir"]) / f"{config['dataset']}.csv"


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


def make_run_dir(config: dict[str, Any], digest: str) -> Path:
    """A new folder per run; DDP ranks other than 0 (re-launched copies of this command) reuse rank 0's.

    Ranks started by torchrun or srun on other nodes do not inherit rank 0's environment; they write nothing
    (Lightning's loggers and checkpoint saving are rank-zero only), so they get a path that is never created."""
    rank = _global_rank(int(config["trainer"]["devices"]))
    inherited = inherited_run_dir()
    if rank != 0 and inherited is not None:
        return inherited
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{run_dir_prefix(config, digest)}_{stamp}_{os.getpid()}"
    run_dir = Path(config["run"]["out"]).resolve() / config["dataset"] / config["method_name"] / name
    if rank != 0:
        return run_dir.with_name(f"{name}_rank{rank}")
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def share_run_dir_with_ranks(run_dir: Path) -> None:
    """Tell the DDP ranks Lightning launches from this process (its children) which folder is the run's."""
    os.environ[RUN_DIR_ENV] = f"{os.getpid()}:{run_dir}"


def inherited_run_dir() -> Path | None:
    """The run folder of the rank 0 that launched this process, if it did. The variable names its process id:
    the same variable inherited by anything else (a torchrun started from a process that once ran a run, e.g. a
    test session) would otherwise send this rank into a stale folder."""
    launcher_pid, _, path = os.environ.get(RUN_DIR_ENV, "").partition(":")
    if path and launcher_pid == str(os.getppid()):
        return Path(path)
    return None


def run_dir_prefix(config: dict[str, Any], digest: str) -> str:
    """What every run folder of one (config hash, seed) starts with: ``L<labeled>_s<seed>_<hash>``."""
    return f"L{config['data']['labeled']}_s{config['run']['seed']}_{digest}"


# ---- resuming a run folder -----------------------------------------------------------------------------------
def check_resumable(run_dir: Path, config: dict[str, Any], digest: str) -> Path:
    """``run_dir`` if it is a run folder of this very configuration and seed; otherwise a UserError saying what differs."""
    run_dir = Path(run_dir).expanduser().resolve()
    stored = read_run_config(run_dir)
    stored_hash = stored.pop("config_hash", None)
    stored_seed = stored.get("run", {}).get("seed")
    if stored_hash != digest or stored_seed != config["run"]["seed"]:
        raise UserError(
            f"the run folder holds another configuration (config {stored_hash}, seed {stored_seed}) than this command "
            f"(config {digest}, seed {config['run']['seed']}); differences: {config_differences(stored, config)}",
            where=str(run_dir),
            fix="give --resume alone (the folder's config.yaml holds the run's options), or drop --resume to start a new run",
        )
    return run_dir


def config_differences(stored: dict[str, Any], current: dict[str, Any], shown: int = 5) -> str:
    """The semantic keys (and the seed) whose values differ, as ``key: stored -> current``."""
    ignored = {".".join(key) for key in NON_SEMANTIC_KEYS} - {"run.seed"}

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}.{key}" if prefix else str(key)).items()}

    old, new = flat(stored), flat(current)
    differing = [key for key in sorted(set(old) | set(new)) if key not in ignored and old.get(key) != new.get(key)]
    text = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in differing[:shown])
    return (text + (f" and {len(differing) - shown} more" if len(differing) > shown else "")) or "none in the values (a different suite version?)"


def unfinished_run_folder(config: dict[str, Any], digest: str) -> Path | None:
    """The newest folder of this configuration and seed that a killed run left with a checkpoint but without its
    rows in the leaderboard (what a sweep resumes instead of training again), or None."""
    parent = Path(config["run"]["out"]).resolve() / config["dataset"] / config["method_name"]
    finished = {row["run_dir"] for row in recorded_rows(leaderboard_path(config), None)}
    candidates = [folder for folder in parent.glob(f"{run_dir_prefix(config, digest)}_*")
                  if (folder / "config.yaml").is_file() and str(folder) not in finished and any(folder.rglob("*.ckpt"))]
    return max(candidates, key=lambda folder: folder.stat().st_mtime, default=None)


@contextmanager
def holding_run_folder(run_dir: Path) -> Iterator[None]:
    """One process per run folder (a fresh run, or a resume of it): an exclusive lock on ``<run_dir>/.lock``,
    which the kernel releases when the process ends, however it ends."""
    descriptor = os.open(run_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError("the run folder is in use by another process (a run or another --resume of it)", where=str(run_dir),
                            fix=f"wait for that process to end (`fuser {run_dir / '.lock'}` names it); a killed one frees the folder at once") from None
        yield
    finally:
        os.close(descriptor)


@dataclass
class RunFolder:
    """Where a run's stages keep their files: ``<run>/<stage>/`` for multi-stage methods, the run folder itself otherwise."""

    path: Path
    multi_stage: bool
    resumed: bool

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage if self.multi_stage else self.path

    def last_checkpoint(self, stage: str) -> Path:
        return checkpoint_folder(self.stage_dir(stage)) / LAST_CHECKPOINT

    def best_checkpoint(self, stage: str) -> Path:
        """Where the best-on-validation checkpoint of ``stage`` is (it exists once a validation ran)."""
        return checkpoint_folder(self.stage_dir(stage)) / f"{BEST_NAME}.ckpt"

    def resume_checkpoint(self, stage: str) -> Path | None:
        path = checkpoint_folder(self.stage_dir(stage)) / RESUME_CHECKPOINT
        return path if path.is_file() else None

    def has_checkpoints(self) -> bool:
        return any(self.path.rglob("*.ckpt"))


def stopped_by_user_error(error: UserError, folder: RunFolder) -> UserError:
    """The error to report for a run stopped by bad input. A fresh run without any checkpoint yet leaves nothing
    behind (its folder is removed); otherwise the folder stays and the message says how to continue it."""
    if not folder.resumed and not folder.has_checkpoints():
        shutil.rmtree(folder.path, ignore_errors=True)
        return error
    keep = (f"the run folder keeps its checkpoints: once this is fixed, repeat the same command with "
            f"`--resume {folder.path}` (make: RESUME={folder.path}) to continue without training again")
    return UserError(error.what, error.where, f"{error.fix}; {keep}" if error.fix else keep)


# ---- one run --------------------------------------------------------------------------------------------------
def build_loggers(config: dict[str, Any], run_dir: Path, digest: str) -> list:
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version="logs")]
    mode = config["run"]["wandb"]
    if mode not in ("disabled", "offline", "online"):
        raise UserError(f"run.wandb must be disabled, offline or online (got {mode!r})", where="WANDB= (--wandb, run.wandb)",
                        fix="e.g. WANDB=offline")
    if mode != "disabled":
        from pytorch_lightning.loggers import WandbLogger

        sweep = config["run"].get("sweep")
        tags = [config["dataset"], config["method_name"], config["profile"], f"labeled={config['data']['labeled']}",
                f"ratio={config['data'].get('ratio')}", f"seed={config['run']['seed']}"]
        loggers.append(
            WandbLogger(
                project=os.environ.get("WANDB_PROJECT", "ssl-medseg-bench"),
                name=run_dir.name,
                group=sweep or f"{config['dataset']}-{config['profile']}",
                job_type="sweep" if sweep else "run",
                tags=tags + ([f"sweep={sweep}"] if sweep else []),
                save_dir=str(run_dir),
                offline=mode == "offline",
                config={**config, "config_hash": digest},
            )
        )
    return loggers



def build_trainer(
    config: dict[str, Any], run_dir: Path, digest: str, callbacks: Sequence[pl.Callback] = (), checkpoint_every: int | None = None
) -> tuple[pl.Trainer, ModelCheckpoint]:
    """The Trainer of one stage; its resumable checkpoint is saved at every validation, or every
    ``checkpoint_every`` steps if given (a stage that validates only at its end)."""
    trainer_cfg = config["trainer"]
    devices, num_nodes = int(trainer_cfg["devices"]), int(trainer_cfg["num_nodes"])
    best, resumable, random_states = checkpoint_callbacks(run_dir, checkpoint_every)
    trainer = pl.Trainer(
        accelerator=trainer_cfg["accelerator"],
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        max_steps=trainer_cfg["max_steps"],
        val_check_interval=trainer_cfg["val_every"],
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        precision=trainer_cfg.get("precision_chosen") or trainer_cfg["precision"],
        deterministic=trainer_cfg["deterministic"],
        # The DataModule's own step-indexed samplers are already per rank (docs/design.md#samplers).
        use_distributed_sampler=False,
        logger=build_loggers(config, run_dir, digest),
        callbacks=[random_states, best, resumable, *overlay_callbacks(config), *callbacks],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=config["run"]["progress"],
        enable_model_summary=False,
        log_every_n_steps=trainer_cfg["log_every"],
        default_root_dir=str(run_dir),
    )
    return trainer, best


def fit(trainer: pl.Trainer, model: pl.LightningModule, datamodule, stage_dir: Path, resume_from: Path | None) -> None:
    """``trainer.fit``, continuing from ``resume_from`` (a full-state checkpoint, loaded weights-only) if given."""
    if resume_from is None:
        trainer.fit(model, datamodule=datamodule)
        return
    # Read once before anything in the folder changes: a damaged file stops the resume with the folder as it was.
    read_checkpoint(resume_from, "the checkpoint to resume from")
    metrics = stage_dir / "logs" / "metrics.csv"
    interrupted = metrics.with_name("metrics.interrupted.csv")
    if trainer.is_global_zero:
        if interrupted.is_file():  # an earlier resume was killed too
            join_interrupted_metrics(interrupted, metrics)
        if metrics.is_file():
            metrics.replace(interrupted)  # Lightning's CSV logger deletes the metrics.csv it finds
    with warnings.catch_warnings():
        # Expected or wrong when resuming: the samplers continue the exact stream at the restored step
        # (datamodules/samplers.py), the checkpoints and logs found are this run's own (the logs are joined below).
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
        warnings.filterwarnings("ignore", message=".*Previous log files in this directory will be deleted")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty")
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_from), weights_only=True)
    if trainer.is_global_zero and interrupted.is_file():
        join_interrupted_metrics(interrupted, metrics)


def read_log(metrics: Path) -> pd.DataFrame:
    """A metrics.csv's rows; none if it is missing or empty. Lightning's CSV writer truncates the file before it
    writes it again under a wider header, so a kill can leave it empty; the log must not stop a resume."""
    try:
        return pd.read_csv(metrics)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["step"])


def stack_logs(*parts: pd.DataFrame) -> pd.DataFrame:
    """The parts' rows in order, under the union of their columns; empty parts are left out (pandas warns on
    concatenating them)."""
    return pd.concat([part for part in parts if len(part)] or parts[-1:], ignore_index=True)


def join_interrupted_metrics(interrupted: Path, metrics: Path) -> None:
    """One metrics.csv again: the interrupted part's rows before the first step the resumed part logged (the
    steps between the checkpoint and the kill were trained again), then the resumed part's rows."""
    before, after = read_log(interrupted), read_log(metrics)
    if len(after):
        before = before[before["step"] < after["step"].min()]
    with replaced_atomically(metrics) as out:
        stack_logs(before, after).to_csv(out, index=False)
    interrupted.unlink()


def append_test_metrics(metrics: Path, test_metrics: list[dict[str, float]], step: int) -> None:
    """Append the test summaries (one row each) to a stage's metrics.csv, replacing those of an earlier attempt.

    Written here rather than through the CSVLogger: after a resume its writer knows only the columns it logged
    itself, and on a new column it rewrites the joined file with those alone (it raises on the interrupted part's
    columns, having truncated the file); a run resumed after its training logs nothing, so every column is new."""
    logged = read_log(metrics)
    earlier_test = [column for column in logged.columns if column.startswith("test_")]
    if earlier_test:  # a resume after the test had logged (killed before its row was written)
        logged = logged[logged[earlier_test].isna().all(axis=1)].drop(columns=earlier_test)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(metrics) as out:
        stack_logs(logged, pd.DataFrame([{**row, "step": step} for row in test_metrics])).to_csv(out, index=False)


def load_weights(model: pl.LightningModule, checkpoint: Path) -> int:
    """Weights only (no pickled code from disk); returns the checkpoint's global step."""
    state = read_checkpoint(checkpoint, "a checkpoint of this run")
    model.load_state_dict(state["state_dict"])
    return int(state.get("global_step", -1))


def load_weights_from_rank_zero(model: pl.LightningModule, checkpoint: Path) -> int:
    """:func:`load_weights` on rank 0, its weights broadcast to the other ranks (which may not see rank 0's disk:
    other nodes); returns the checkpoint's global step."""
    rank, world = rank_and_world()
    if world == 1:
        return load_weights(model, checkpoint)
    payload = None
    if rank == 0:
        state = read_checkpoint(checkpoint, "a checkpoint of this run")
        payload = (state["state_dict"], int(state.get("global_step", -1)))
    state_dict, step = broadcast_from_rank_zero(payload)
    model.load_state_dict(state_dict)
    return step


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


def init_stage(model: pl.LightningModule, checkpoint: Path | None) -> str | None:
    """Start a stage from ``checkpoint``'s weights (if any); returns the stage that wrote it (None if unknown)."""
    if checkpoint is None:
        return None
    state = read_checkpoint(checkpoint, f"the checkpoint stage {model.stage!r} starts from")
    weights = state.get("state_dict") if isinstance(state, dict) else None
    mismatch = "it holds no state_dict" if not isinstance(weights, dict) else state_dict_mismatch(model.state_dict(), weights)
    if mismatch and str(checkpoint) == str(model.config["run"].get("init_from")):
        # A checkpoint of another method, or a plain weights file: the backbone goes into every network.
        from benchmark.warm_start import warm_start

        warm_start(model, weights if isinstance(weights, dict) else state, checkpoint)
        return None
    if mismatch:
        raise UserError(f"the checkpoint does not fit stage {model.stage!r} of {model.name}: {mismatch}", where=str(checkpoint),
                        fix="give a checkpoint of the same method, dataset and model settings (run.init_from)")
    model.load_state_dict(weights)
    return state.get("hyper_parameters", {}).get("config", {}).get("run", {}).get("stage")


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, Any]) -> str | None:
    """What keeps ``given`` from loading into a module whose state is ``expected`` (None if it loads), in one line."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [key for key in expected if key in given and tuple(getattr(given[key], "shape", ())) != tuple(expected[key].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        key = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {key}: {list(given[key].shape)} in the checkpoint, "
                     f"{list(expected[key].shape)} in this model)")
    return ", ".join(parts) or None


def peak_memory() -> tuple[float, float]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return rss_mb, gpu_mb


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
    rank_zero = _global_rank(int(config["trainer"]["devices"])) == 0
    trained = Trained()
    for stage in stages:
        last_checkpoint = folder.last_checkpoint(stage)
        stage_dir = folder.stage_dir(stage)
        if last_checkpoint.is_file():  # finished before this resume
            if rank_zero:  # left if the run was killed between writing last.ckpt and deleting it
                (checkpoint_folder(stage_dir) / RESUME_CHECKPOINT).unlink(missing_ok=True)
            step, seconds = checkpoint_step_and_seconds(last_checkpoint)
            clock.carry(seconds)  # superseded by the interrupted stage's resume.ckpt, if it has one
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
        except KeyboardInterrupt:
            raise
        except Exception as error:
            if stop_received():  # e.g. a loader worker ended by the same SIGTERM, noticed before the main process's
                raise RunStopped(stop_received()) from error
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
    nothing), with SIGTERM and SIGINT stopping it as :class:`RunStopped` (benchmark/stops.py)."""
    with stop_signals_raise():
        return run_once(finalize(config), callbacks, resume)


def resume_hint(folder: RunFolder) -> str:
    """What a stopped run left: nothing (a fresh run without a checkpoint yet; its folder is removed) or a
    folder to resume."""
    if not folder.resumed and not folder.has_checkpoints():
        shutil.rmtree(folder.path, ignore_errors=True)
        return "no checkpoint had been written, so nothing was kept and no row written; run the same command again"
    return (f"no row was written; the run folder keeps its checkpoints: repeat the same command with "
            f"`--resume {folder.path}` (make: RESUME={folder.path}) to continue from the last one")


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
    rank_zero = _global_rank(devices) == 0
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
            "wall_time_s": round(clock.seconds(), 1),
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
        if not rank_zero:
            return []
        stage_record = {"stages": [{"stage": name, "steps": steps, "dir": str(folder.stage_dir(name))}
                                   for name, steps in trained.stage_steps.items()]} if folder.multi_stage else {}
        write_text_atomically(result_file, json.dumps({"config_hash": digest, "rows": rows, "test": results, "resumed": folder.resumed,
                                                       **stage_record}, indent=1, default=str))
    append_rows(leaderboard, rows)
    archive_per_case(leaderboard, config["dataset"], folder.path, [row["checkpoint"] for row in rows])
    archive_validation_curve(leaderboard, config["dataset"], folder, list(trained.stage_steps))
    write_run_report_safely(folder.path, config, rows, [(stage, folder.stage_dir(stage)) for stage in stages])
    return rows


def validation_curve(folder: RunFolder, stages: list[str]) -> pd.DataFrame:
    """The run's validation Dice (mean and per class) against its step, stages one after another (a later stage's
    steps continue the earlier ones' count, so the curve reads as one run)."""
    parts, offset = [], 0
    for stage in stages:
        log = read_log(folder.stage_dir(stage) / "logs" / "metrics.csv")
        columns = [c for c in log.columns if c == "val/dice" or c.startswith("val/dice_")]
        if "val/dice" in columns:
            part = log.dropna(subset=["val/dice"])[["step", *columns]].copy()
            part["step"] = part["step"].astype(int) + 1 + offset
            part.insert(0, "stage", stage)
            parts.append(part)
        steps = log["step"].dropna()
        offset += int(steps.max()) + 1 if len(steps) else 0
    return stack_logs(*parts) if parts else pd.DataFrame(columns=["stage", "step", "val/dice"])


def archive_validation_curve(leaderboard: Path, dataset: str, folder: RunFolder, stages: list[str]) -> None:
    curve = validation_curve(folder, stages)
    with replaced_atomically(curve_archive(leaderboard.parent, dataset, folder.path.name)) as out:
        curve.to_csv(out, index=False)


def archive_per_case(leaderboard: Path, dataset: str, run_dir: Path, kinds: list[str]) -> None:
    """Copy the run's per-case test metrics beside the leaderboard once its rows are there, so the paired tests
    of ``make leaderboard`` can be recomputed from the repository alone (the run folders stay local)."""
    for kind in kinds:
        archived = per_case_archive(leaderboard.parent, dataset, run_dir.name, kind)
        with replaced_atomically(archived, "wb") as out:
            out.write((run_dir / f"test_per_case_{kind}.csv").read_bytes())
