"""The Lightning Trainer of one stage and its loggers (CSV always, W&B when asked for), and ``fit``, which continues
an interrupted stage from its resumable checkpoint with the stage's logs joined into one metrics.csv."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from benchmark.checkpoints import AtomicCheckpointIO, checkpoint_callbacks, read_checkpoint
from benchmark.run_logs import join_interrupted_metrics
from benchmark.stops import raise_if_stopped
from benchmark.wandb_overlays import overlay_callbacks
from core.errors import UserError


class StopAtNextBatch(pl.Callback):
    """Stops the run at the next batch when a stop signal arrived but its :class:`RunStopped` never got out.

    Python prints and drops an exception raised while a finalizer runs, and a signal handler runs wherever the main
    thread is: a DataLoader iterator's ``__del__`` joins its workers, and a signal that lands there would be lost, so
    a Ctrl+C would let the training go on and a SIGTERM would end it through Lightning's own flag as if finished."""

    def on_train_batch_start(self, *args: Any) -> None:
        raise_if_stopped()

    def on_train_batch_end(self, *args: Any) -> None:
        raise_if_stopped()

    def on_validation_batch_start(self, *args: Any) -> None:
        raise_if_stopped()


class ValidateAtFinalStep(pl.Callback):
    """Validates after a stage's last step when its budget is not a multiple of its validation interval.

    Lightning validates every ``val_every`` steps only, so a stage of 1 333 steps validated every 500 (ACTION's
    fine-tuning stage at the ``cpu`` profile) would end 333 steps after its last validation: its last checkpoint would
    never be scored and the best checkpoint would be chosen among steps 500 and 1 000 alone. Lightning validates
    after any step at which ``should_stop`` is set, so setting it after the final step (where training stops anyway)
    adds exactly that one validation. The step count is the same on every DDP rank, so all ranks validate together.
    Only added to a stage whose budget needs it (:func:`build_trainer`)."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


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
    final_validation = [ValidateAtFinalStep()] if trainer_cfg["max_steps"] % trainer_cfg["val_every"] else []
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
        callbacks=[StopAtNextBatch(), *final_validation, random_states, best, resumable, *overlay_callbacks(config),
                   *callbacks],
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
