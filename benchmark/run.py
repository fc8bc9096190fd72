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

import pandas as pd
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from benchmark.config import PER_STAGE, config_hash, merge
from benchmark.distributed import broadcast_from_rank_zero, gather_to_all, my_share, rank_and_world
from benchmark.errors import UserError
from benchmark.evaluation import Evaluator, summarize
from benchmark.leaderboard import append_rows, check_writable, per_case_archive
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
    """Validate everything a user can get wrong, before anything is written or trained."""
    entry = get_dataset(config["dataset"])
    method_cls = get_method(config["method_name"])
    method_cls.check_dataset(entry.spec)
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
        raise UserError(f"run.stages={asked!r} must name distinct stages in their order: {', '.join(declared)}")
    init_from = config["run"].get("init_from")
    if init_from is not None and not Path(init_from).is_file():
        raise UserError(f"run.init_from checkpoint not found: {init_from}", fix="give the path of a .ckpt file (e.g. <run>/<stage>/checkpoints/last.ckpt)")
    if positions[0] > 0 and init_from is None:
        raise UserError(f"stage {chosen[0]!r} continues from stage {declared[positions[0] - 1]!r} but no checkpoint was given",
                        fix=f"set run.init_from=<run>/{declared[positions[0] - 1]}/checkpoints/last.ckpt")
    return chosen


def stage_config(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The config one stage trains with: ``per_stage.<stage>`` merged in and ``run.stage`` set."""
    staged = merge(config, config.get(PER_STAGE, {}).get(stage, {}))
    staged["run"]["stage"] = stage
    trainer = staged["trainer"]
    trainer["val_every"] = min(trainer["val_every"], trainer["max_steps"])
    return staged


def make_run_dir(config: dict[str, Any], digest: str) -> Path:
    """A new folder per run; DDP ranks other than 0 (re-launched copies of this command) reuse rank 0's.

    Ranks started by torchrun or srun on other nodes do not inherit rank 0's environment; they write nothing
    (Lightning's loggers and checkpoint saving are rank-zero only), so they get a path that is never created."""
    rank = _global_rank(int(config["trainer"]["devices"]))
    if rank != 0 and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"L{config['data']['labeled']}_s{config['run']['seed']}_{digest}_{stamp}_{os.getpid()}"
    run_dir = Path(config["run"]["out"]).resolve() / config["dataset"] / config["method_name"] / name
    if rank != 0:
        return run_dir.with_name(f"{name}_rank{rank}")
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
    config: dict[str, Any], run_dir: Path, digest: str, callbacks: Sequence[pl.Callback] = ()
) -> tuple[pl.Trainer, ModelCheckpoint]:
    trainer_cfg = config["trainer"]
    devices, num_nodes = int(trainer_cfg["devices"]), int(trainer_cfg["num_nodes"])
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val/dice", mode="max", save_top_k=1
    )
    trainer = pl.Trainer(
        accelerator=trainer_cfg["accelerator"],
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        max_steps=trainer_cfg["max_steps"],
        val_check_interval=trainer_cfg["val_every"],
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        precision=trainer_cfg["precision"],
        deterministic=trainer_cfg["deterministic"],
        # The DataModule's own step-indexed samplers are already per rank (ecosystem.md B1).
        use_distributed_sampler=False,
        logger=build_loggers(config, run_dir, digest),
        callbacks=[best, *overlay_callbacks(config), *callbacks],
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


def load_weights_from_rank_zero(model: pl.LightningModule, checkpoint: Path) -> int:
    """:func:`load_weights` on rank 0, its weights broadcast to the other ranks (which may not see rank 0's disk:
    other nodes); returns the checkpoint's global step."""
    rank, world = rank_and_world()
    if world == 1:
        return load_weights(model, checkpoint)
    payload = None
    if rank == 0:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
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
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as error:
        raise UserError(f"cannot start stage {model.stage!r} of {model.name} from {checkpoint}: {str(error)[:300]}",
                        fix="give a checkpoint of the same method, dataset and model settings") from error
    return state.get("hyper_parameters", {}).get("config", {}).get("run", {}).get("stage")


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
    stages = plan_stages(method_cls, config)
    multi_stage = len(method_cls.stages) > 1
    spec = entry.spec
    digest = config_hash(config)
    run_dir = make_run_dir(config, digest)
    is_rank_zero = _global_rank(devices) == 0
    if is_rank_zero:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "config_hash": digest}, sort_keys=False))
        datamodule.split.write(run_dir / "split.json")

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
    base_row.update(datamodule.leaderboard_fields())
    if multi_stage:
        base_row["stages"] = "+".join(stages)
    leaderboard = Path(config["run"]["leaderboard_dir"]) / f"{config['dataset']}.csv"
    init_from = config["run"].get("init_from")
    previous_checkpoint = Path(init_from) if init_from else None
    stage_steps: dict[str, int] = {}
    for stage in stages:
        # A multi-stage run keeps each stage's config, logs and checkpoints in its own sub-folder.
        stage_dir = run_dir / stage if multi_stage else run_dir
        staged = stage_config(config, stage)
        if multi_stage and is_rank_zero:
            stage_dir.mkdir(exist_ok=True)
            (stage_dir / "config.yaml").write_text(yaml.safe_dump({**staged, "config_hash": digest}, sort_keys=False))
        pl.seed_everything(config["run"]["seed"], workers=True, verbose=False)
        model = method_cls(spec, staged)
        model.on_stage_start(init_stage(model, previous_checkpoint))
        # Extra callbacks (the tuner's validation reporter) watch the final stage only: the earlier stages'
        # validation scores an unfinished model.
        trainer, best_callback = build_trainer(staged, stage_dir, digest, callbacks if stage == stages[-1] else ())
        # A stage with its own data settings or budget (the samplers are step-indexed) gets its own loaders over
        # the same split.
        same_loaders = staged["data"] == config["data"] and staged["trainer"]["max_steps"] == config["trainer"]["max_steps"]
        stage_data = datamodule if same_loaders else build_datamodule(
            config["dataset"], staged, use_unlabeled=method_cls.uses_unlabeled)
        try:
            trainer.fit(model, datamodule=stage_data)
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as error:
            if trainer.is_global_zero and config["run"]["test"]:
                failed = {**base_row, "checkpoint": "none", "status": "failed", "error": f"{type(error).__name__}: {error}"[:500],
                          "steps": sum(stage_steps.values()) + trainer.global_step, "wall_time_s": round(time.time() - started, 1),
                          "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                if multi_stage:
                    failed["error"] = f"stage {stage}: {failed['error']}"[:500]
                append_rows(leaderboard, [failed])
            raise
        # Saved here rather than by ModelCheckpoint(save_last=True), which skips the final step when the last
        # validation does not improve the monitored score. A collective call under DDP; rank 0 writes.
        last_checkpoint = stage_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(last_checkpoint, weights_only=False)  # full state: a later --resume needs the loops
        stage_steps[stage] = trainer.global_step
        previous_checkpoint = last_checkpoint
    if not config["run"]["test"]:
        if not trainer.is_global_zero:
            return []
        best_score = best_callback.best_model_score
        validation = {"best_dice": None if best_score is None else float(best_score), "steps": trainer.global_step}
        (run_dir / "result.json").write_text(json.dumps({"config_hash": digest, "rows": [], "validation": validation}, indent=1))
        return []
    if multi_stage:
        base_row["stage_steps"] = "+".join(str(steps) for steps in stage_steps.values())

    # Every rank scores its share of the test cases with rank 0's weights; rank 0 gathers, writes and returns rows.
    evaluator = Evaluator.from_config(spec, config)
    model.eval()
    device = model.device
    test_cases = datamodule.cases("test")
    if len(test_cases) < trainer.world_size:
        raise UserError(f"the test set has {len(test_cases)} cases, fewer than the {trainer.world_size} devices that share it",
                        fix="use fewer DEVICES")
    checkpoints = broadcast_from_rank_zero(
        {"last": last_checkpoint, **({"best": Path(best_callback.best_model_path)} if best_callback.best_model_path else {})})
    rows, results = [], {}
    for kind, path in checkpoints.items():
        step = load_weights_from_rank_zero(model, path)
        per_case = evaluate_spread(evaluator, model, test_cases, progress=config["run"]["progress"], desc=f"test ({kind})")
        if not trainer.is_global_zero:
            continue
        per_case.to_csv(run_dir / f"test_per_case_{kind}.csv", index=False)
        # A copy beside the leaderboard, so its paired tests can be recomputed from the repository alone.
        archived = per_case_archive(leaderboard.parent, config["dataset"], run_dir.name, kind)
        archived.parent.mkdir(parents=True, exist_ok=True)
        per_case.to_csv(archived, index=False)
        summary = summarize(per_case)
        results[kind] = {"step": step, **summary}
        rss, gpu = peak_memory()
        rows.append({
            **base_row, "checkpoint": kind, "step": step, **summary, "status": "ok",
            "steps": sum(stage_steps.values()), "wall_time_s": round(time.time() - started, 1),
            "peak_rss_mb": round(rss, 1), "peak_gpu_mb": round(gpu, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    if not trainer.is_global_zero:
        return []
    for logger in trainer.loggers:
        for kind, summary in results.items():
            logger.log_metrics({f"test_{kind}/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}, step=trainer.global_step)
        logger.finalize("success")
    if config["run"]["wandb"] != "disabled":
        import wandb

        wandb.finish()  # several runs in one process (sweeps) must not log into one W&B run
    stage_record = {"stages": [{"stage": name, "steps": steps, "dir": str(run_dir / name)} for name, steps in stage_steps.items()]} if multi_stage else {}
    (run_dir / "result.json").write_text(json.dumps({"config_hash": digest, "rows": rows, "test": results, **stage_record}, indent=1, default=str))
    append_rows(leaderboard, rows)
    return rows
