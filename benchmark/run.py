"""One run: config -> DataModule -> method -> Trainer.fit -> test of the last and best-on-val checkpoints
-> run folder + leaderboard rows.

The run folder holds the resolved config, the split, Lightning's CSV logs, the checkpoints, per-case metrics of
both checkpoints and result.json. Only rank 0 evaluates and writes; under DDP (``trainer.devices > 1``) Lightning
re-launches this same command once per rank, and the ranks agree on the run folder through an environment
variable set before the launch.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from benchmark.config import config_hash
from benchmark.errors import UserError
from benchmark.evaluation import Evaluator, summarize
from benchmark.leaderboard import append_rows, check_writable
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


def _global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", 0))))


def prepare(config: dict[str, Any]):
    """Validate everything a user can get wrong, before anything is written or trained."""
    entry = get_dataset(config["dataset"])
    method_cls = get_method(config["method_name"])
    if entry.spec.spatial_dims not in method_cls.spatial_dims:
        raise UserError(
            f"method '{config['method_name']}' is {'/'.join(f'{d}-D' for d in method_cls.spatial_dims)} only, "
            f"but dataset '{config['dataset']}' is {entry.spec.spatial_dims}-D",
            fix="choose a dataset of a supported dimensionality (`python -m benchmark list datasets`)",
        )
    if config["data"]["patch_size"] is None:
        config["data"]["patch_size"] = list(entry.spec.patch_size)
    datamodule = build_datamodule(
        config["dataset"], config, use_unlabeled=method_cls.uses_unlabeled, labeled_partitions=method_cls.labeled_partitions
    )
    # The hash covers the resolved labeled count, not how it was asked for (RATIO or LABELED).
    config["data"]["labeled"] = datamodule.split.labeled_count
    trainer = config["trainer"]
    if trainer["val_every"] > trainer["max_steps"]:
        trainer["val_every"] = trainer["max_steps"]
    check_writable(Path(config["run"]["out"]))
    check_writable(Path(config["run"]["leaderboard_dir"]))
    return entry, method_cls, datamodule


def make_run_dir(config: dict[str, Any], digest: str) -> Path:
    """A new folder per run; DDP ranks other than 0 (re-launched copies of this command) reuse rank 0's."""
    if _global_rank() != 0 and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"L{config['data']['labeled']}_s{config['run']['seed']}_{digest}_{stamp}_{os.getpid()}"
    run_dir = Path(config["run"]["out"]).resolve() / config["dataset"] / config["method_name"] / name
    run_dir.mkdir(parents=True, exist_ok=False)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the DDP ranks Lightning launches
    return run_dir


def build_loggers(config: dict[str, Any], run_dir: Path, digest: str) -> list:
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version="logs")]
    mode = config["run"]["wandb"]
    if mode not in ("disabled", "offline", "online"):
        raise UserError(f"run.wandb must be disabled, offline or online (got {mode!r})")
    if mode != "disabled":
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=os.environ.get("WANDB_PROJECT", "ssl-medseg-bench"),
                name=run_dir.name,
                group=f"{config['dataset']}-{config['profile']}",
                tags=[config["dataset"], config["method_name"], f"labeled={config['data']['labeled']}", f"seed={config['run']['seed']}"],
                save_dir=str(run_dir),
                offline=mode == "offline",
                config={**config, "config_hash": digest},
            )
        )
    return loggers


def build_trainer(
    config: dict[str, Any], run_dir: Path, digest: str, callbacks: Sequence[pl.Callback] = ()
) -> tuple[pl.Trainer, ModelCheckpoint]:
    trainer_cfg = config["trainer"]
    devices = int(trainer_cfg["devices"])
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val/dice", mode="max", save_top_k=1
    )
    trainer = pl.Trainer(
        accelerator=trainer_cfg["accelerator"],
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=trainer_cfg["max_steps"],
        val_check_interval=trainer_cfg["val_every"],
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        precision=trainer_cfg["precision"],
        deterministic=trainer_cfg["deterministic"],
        # The DataModule's own step-indexed samplers are already per rank (ecosystem.md B1).
        use_distributed_sampler=False,
        logger=build_loggers(config, run_dir, digest),
        callbacks=[best, *callbacks],
        enable_progress_bar=config["run"]["progress"],
        enable_model_summary=False,
        log_every_n_steps=trainer_cfg["log_every"],
        default_root_dir=str(run_dir),
    )
    return trainer, best


def load_weights(model: pl.LightningModule, checkpoint: Path) -> int:
    """Weights only (no pickled code from disk); returns the checkpoint's global step."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    return int(state.get("global_step", -1))


def peak_memory() -> tuple[float, float]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return rss_mb, gpu_mb


def run(config: dict[str, Any], callbacks: Sequence[pl.Callback] = ()) -> list[dict[str, Any]]:
    """Train and test one configuration; returns the leaderboard rows written (empty on non-zero ranks).

    ``run.test=false`` stops after training and validation (tuning trials: the test set is never looked at) and
    writes no leaderboard row; ``callbacks`` are added to the Trainer's (the tuner's validation reporter)."""
    started = time.time()
    devices = int(config["trainer"]["devices"])
    if devices > 1 and not torch.cuda.is_available():
        # CPU DDP: every rank's OpenMP pool defaults to all cores; oversubscribed spinning pools slow a step
        # down by an order of magnitude, so split the cores between the ranks.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    entry, method_cls, datamodule = prepare(config)
    spec = entry.spec
    digest = config_hash(config)
    run_dir = make_run_dir(config, digest)
    is_rank_zero = _global_rank() == 0
    if is_rank_zero:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "config_hash": digest}, sort_keys=False))
        datamodule.split.write(run_dir / "split.json")

    pl.seed_everything(config["run"]["seed"], workers=True, verbose=False)
    model = method_cls(spec, config)
    trainer, best_callback = build_trainer(config, run_dir, digest, callbacks)
    base_row = {
        "dataset": config["dataset"], "method": config["method_name"], "profile": config["profile"],
        "labeled_cases": datamodule.split.labeled_count, "labeled_unit": spec.labeled_unit,
        "ratio": config["data"].get("ratio") or "", "seed": config["run"]["seed"], "config_hash": digest,
        "empty_policy": config["eval"]["empty_policy"], "lcc": config["eval"]["lcc"],
        "units": "mm" if config["eval"]["use_spacing"] else "voxel",
        "devices": config["trainer"]["devices"],
        "global_batch": config["data"]["labeled_batch_size"] + (config["data"]["unlabeled_batch_size"] if datamodule.has_unlabeled else 0),
        "git_rev": git_revision(), "torch": torch.__version__, "lightning": pl.__version__, "host": socket.gethostname(),
        "run_dir": str(run_dir),
    }
    leaderboard = Path(config["run"]["leaderboard_dir"]) / f"{config['dataset']}.csv"
    try:
        trainer.fit(model, datamodule=datamodule)
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as error:
        if trainer.is_global_zero and config["run"]["test"]:
            failed = {**base_row, "checkpoint": "none", "status": "failed", "error": f"{type(error).__name__}: {error}"[:500],
                      "steps": trainer.global_step, "wall_time_s": round(time.time() - started, 1),
                      "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            append_rows(leaderboard, [failed])
        raise
    # Saved here rather than by ModelCheckpoint(save_last=True), which skips the final step when the last
    # validation does not improve the monitored score. A collective call under DDP; rank 0 writes.
    last_checkpoint = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last_checkpoint, weights_only=False)  # full state: a later --resume needs the loops
    if not trainer.is_global_zero:
        return []
    if not config["run"]["test"]:
        best_score = best_callback.best_model_score
        validation = {"best_dice": None if best_score is None else float(best_score), "steps": trainer.global_step}
        (run_dir / "result.json").write_text(json.dumps({"config_hash": digest, "rows": [], "validation": validation}, indent=1))
        return []

    evaluator = Evaluator.from_config(spec, config)
    model.eval()
    device = model.device
    test_cases = datamodule.cases("test")
    checkpoints = {"last": last_checkpoint}
    if best_callback.best_model_path:
        checkpoints["best"] = Path(best_callback.best_model_path)
    rows, results = [], {}
    for kind, path in checkpoints.items():
        step = load_weights(model, path)
        per_case = evaluator.evaluate(model.predict_logits, test_cases, progress=config["run"]["progress"], device=device, desc=f"test ({kind})")
        per_case.to_csv(run_dir / f"test_per_case_{kind}.csv", index=False)
        summary = summarize(per_case, spec.extra_metrics)
        results[kind] = {"step": step, **summary}
        rss, gpu = peak_memory()
        rows.append({
            **base_row, "checkpoint": kind, "step": step, **summary, "status": "ok",
            "steps": trainer.global_step, "wall_time_s": round(time.time() - started, 1),
            "peak_rss_mb": round(rss, 1), "peak_gpu_mb": round(gpu, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    for logger in trainer.loggers:
        for kind, summary in results.items():
            logger.log_metrics({f"test_{kind}/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}, step=trainer.global_step)
        logger.finalize("success")
    if config["run"]["wandb"] != "disabled":
        import wandb

        wandb.finish()  # several runs in one process (sweeps) must not log into one W&B run
    (run_dir / "result.json").write_text(json.dumps({"config_hash": digest, "rows": rows, "test": results}, indent=1, default=str))
    append_rows(leaderboard, rows)
    return rows
