"""Hyperparameter search with Optuna: an ask/tell driver outside Lightning, one subprocess per trial.

``python -m benchmark tune --method cps --dataset acdc --ratio 0.1 --trials 50 [--workers 2] [--storage ...]``
(``make tune``). Design (docs/design.md#tuning): Optuna never runs inside a Lightning process, so DDP trials, crashes
and out-of-memory kills cannot confuse it.

- A **worker** loops: under the study's budget lock it fails stale trials of killed workers, counts the trials
  and, while the budget (``--trials``) is not used up, asks for one (TPE with ``constant_liar``, so concurrent
  workers spread out). The lock makes the count exact with any number of workers on any storage.
- The **trial** runs ``python -m benchmark.tune TRIAL_JSON`` in its own process group, dying with its worker
  (benchmark/child_processes.py): the resolved config with
  the trial's parameters, ``run.test=false`` (the test set is never evaluated), its own folder. A Lightning
  callback appends every validation score (``val/dice`` at a global step) to ``progress.jsonl``.
- The worker reads those lines as they come, reports them to the trial and asks the pruner (median or
  Hyperband); a pruned trial's process group is killed. A non-zero exit (exception, out-of-memory kill) is a
  failed trial and the study goes on. The objective is the best validation Dice of the trial (the score the
  best-on-validation checkpoint is selected by).
- Seeds: every trial trains with ``--seed`` (``--seed-per-trial``: seed + trial number), recorded in the trial's
  ``user_attrs`` with the sampler's seed, the worker and the trial folder.
- ``--workers N`` starts N worker processes on one storage (a journal file by default); on a cluster, start one
  ``python -m benchmark tune ... --workers 1 --storage postgresql://...`` per GPU or node.
- At the end: ``summary.json``, ``summary.md`` and plots (history, importance, intermediate values) in the study
  folder ``<out>/tune/<study>/``; ``--report-only`` rewrites them from the storage.

``python -m benchmark run ... --from-study STUDY`` (``make bench FROM_STUDY=...``) trains with the best trial's
parameters, STUDY being the study folder or ``STORAGE_URL#STUDY_NAME``. What a study found (summary, plots, the best
trial) is read in benchmark/tune_results.py.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from benchmark import child_processes
from benchmark.config import apply_overrides, config_hash
from benchmark.search_space import load_search_space, override_text
from benchmark.tune_results import OBJECTIVE, STUDY_FILE, print_summary, quiet_optuna, write_atomic, write_report
from benchmark.tune_storage import RETRIED_FROM_ATTR, Liveness, StorageSpec
from core.errors import UserError

PRUNERS = ("median", "hyperband", "none")


@dataclass
class TuneSettings:
    config: dict[str, Any]          # the prepared base config of every trial (no tuned values applied)
    study_name: str
    study_dir: Path
    storage: StorageSpec
    n_trials: int
    workers: int = 1
    space_path: str | None = None
    seed_per_trial: bool = False
    pruner: str = "median"
    pruner_startup_trials: int = 5  # median pruner: trials that finish before any is pruned
    sampler_startup_trials: int = 10  # TPE: random trials before the model takes over
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 2
    keep_checkpoints: bool = False
    poll_seconds: float = 0.5
    trial_command: tuple[str, ...] = field(default_factory=lambda: (sys.executable, "-m", "benchmark.tune"))

    @property
    def space(self):
        return load_search_space(self.config["method_name"], self.config, self.space_path)


# ---- study ----------------------------------------------------------------------------------------------
def default_study_name(config: dict[str, Any]) -> str:
    return f"{config['method_name']}-{config['dataset']}-L{config['data']['labeled']}-{config['profile']}"


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    if settings.pruner == "median":
        # No pruning in the first quarter of the budget: while the unlabeled terms ramp up, early scores say little.
        warmup = settings.config["trainer"]["max_steps"] // 4
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials, n_warmup_steps=warmup)
    if settings.pruner == "hyperband":
        trainer = settings.config["trainer"]
        return optuna.pruners.HyperbandPruner(min_resource=trainer["val_every"], max_resource=trainer["max_steps"], reduction_factor=3)
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown pruner '{settings.pruner}'", fix=f"one of: {', '.join(PRUNERS)}")


def open_study(settings: TuneSettings, sampler_seed: int | None = None) -> tuple[optuna.Study, Liveness]:
    quiet_optuna()
    storage = settings.storage.open(settings.heartbeat_interval, settings.grace_period, settings.max_retry)
    sampler = optuna.samplers.TPESampler(constant_liar=True, seed=sampler_seed, n_startup_trials=settings.sampler_startup_trials)
    study = optuna.create_study(study_name=settings.study_name, storage=storage, direction="maximize", sampler=sampler,
                                pruner=make_pruner(settings), load_if_exists=True)
    return study, Liveness(storage)


def create_study(settings: TuneSettings) -> optuna.Study:
    """Create the study (or check that an existing one of that name tunes the same thing) and its folder."""
    space = settings.space
    if settings.storage.kind == "postgresql":
        study, _ = open_study(settings)  # a wrong URL fails before anything is written
        settings.study_dir.mkdir(parents=True, exist_ok=True)
    else:
        settings.study_dir.mkdir(parents=True, exist_ok=True)
        study, _ = open_study(settings)
    identity = {
        "method": settings.config["method_name"], "dataset": settings.config["dataset"], "profile": settings.config["profile"],
        "labeled": settings.config["data"]["labeled"], "base_config_hash": config_hash(settings.config),
    }
    existing = {key: study.user_attrs.get(key) for key in identity}
    if any(value is not None for value in existing.values()):
        differs = {key: (existing[key], identity[key]) for key in identity if existing[key] != identity[key]}
        if differs:
            what = ", ".join(f"{key} {old!r} (now {new!r})" for key, (old, new) in differs.items())
            raise UserError(f"study '{settings.study_name}' already exists and tunes something else: {what}",
                            where=settings.storage.display(), fix="pass another --study-name (STUDY=), or the same settings")
    else:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.set_user_attr("objective", OBJECTIVE)
        study.set_user_attr("search_space", {key: repr(dist) for key, dist in space.items()})
    local = settings.storage.kind != "postgresql" and Path(settings.storage.target.removeprefix("sqlite:///")).parent == settings.study_dir.resolve()
    study_file = {
        "study_name": settings.study_name,
        # Local files are found again relative to this folder; a server URL is kept without its password.
        "storage": settings.storage.kind if local else settings.storage.display(),
        **identity,
    }
    write_atomic(settings.study_dir / STUDY_FILE, json.dumps(study_file, indent=1))
    return study


# ---- workers ----------------------------------------------------------------------------------------------
def _budget_allows(trials: list[optuna.trial.FrozenTrial], n_trials: int) -> bool:
    """A queued (WAITING) trial is always run; otherwise trials count against the budget, except the copies a
    retry makes of a killed worker's trial (the original already counted)."""
    if any(trial.state == TrialState.WAITING for trial in trials):
        return True
    return sum(1 for trial in trials if RETRIED_FROM_ATTR not in trial.system_attrs) < n_trials


def run_worker(settings: TuneSettings, worker_index: int = 0) -> int:
    """Take trials until the budget is used up; returns how many this worker ran."""
    space = settings.space
    probe, _ = open_study(settings)
    # Distinct per worker, and per start, so that a restarted worker does not repeat the random start-up draws.
    sampler_seed = zlib.crc32(f"{settings.config['run']['seed']}:{worker_index}:{len(probe.trials)}".encode())
    study, liveness = open_study(settings, sampler_seed)
    done, idle_since = 0, None
    while True:
        with settings.storage.budget_lock(settings.study_name):
            liveness.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            trial = study.ask(fixed_distributions=space) if _budget_allows(trials, settings.n_trials) else None
            if trial is not None:
                liveness.beat(trial._trial_id)
        if trial is None:
            # The budget is used up. Trials still running may belong to a worker that was killed: look again until
            # a dead worker's trial would have gone stale (then it is retried here), and stop.
            idle_since = idle_since or time.monotonic()
            waited = time.monotonic() - idle_since
            if not any(t.state == TrialState.RUNNING for t in trials) or waited > settings.grace_period + 2 * settings.heartbeat_interval:
                break
            time.sleep(min(settings.heartbeat_interval, 10))
            continue
        idle_since = None
        execute_trial(settings, study, trial, liveness, worker_index, sampler_seed)
        done += 1
    return done


def _worker_process(settings: TuneSettings, worker_index: int) -> None:
    run_worker(settings, worker_index)


def trial_config(settings: TuneSettings, params: dict[str, Any], seed: int, trial_dir: Path) -> dict[str, Any]:
    config = apply_overrides(settings.config, [override_text(key, value) for key, value in params.items()])
    config["run"].update(seed=seed, out=str(trial_dir), leaderboard_dir=str(trial_dir), test=False, progress=False)
    return config


def execute_trial(settings: TuneSettings, study: optuna.Study, trial: optuna.Trial, liveness: Liveness,
                  worker_index: int, sampler_seed: int) -> TrialState:
    """Run one trial in a subprocess, report its validation scores as they come, prune or tell the result."""
    base_seed = settings.config["run"]["seed"]
    # A retried trial keeps its original's seed (its user_attrs are copied along).
    seed = trial.user_attrs.get("seed", base_seed + (trial.number if settings.seed_per_trial else 0))
    trial_dir = settings.study_dir / "trials" / f"{trial.number:04d}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    progress = trial_dir / "progress.jsonl"
    progress.unlink(missing_ok=True)
    spec = {"config": trial_config(settings, trial.params, seed, trial_dir), "progress": str(progress),
            "study": settings.study_name, "trial": trial.number, "params": trial.params}
    (trial_dir / "trial.json").write_text(json.dumps(spec, indent=1, default=str))
    for key, value in {"seed": seed, "sampler_seed": sampler_seed, "worker": f"{socket.gethostname()}:{os.getpid()}:{worker_index}",
                       "trial_dir": str(trial_dir)}.items():
        trial.set_user_attr(key, value)

    log = open(trial_dir / "trial.log", "ab")
    process = child_processes.start([*settings.trial_command, str(trial_dir / "trial.json")], own_group=True, stdout=log,
                                    stderr=subprocess.STDOUT, env=_trial_environment())
    scores: list[float] = []
    seen_lines, last_beat = 0, time.monotonic()
    try:
        while True:
            finished = process.poll() is not None
            lines = progress.read_text().split("\n")[:-1] if progress.exists() else []  # complete lines only
            for line in lines[seen_lines:]:
                record = json.loads(line)
                scores.append(float(record["val_dice"]))
                trial.report(float(record["val_dice"]), int(record["step"]))
                if trial.should_prune():
                    child_processes.kill_group(process)
                    return _finish(study, trial, TrialState.PRUNED, f"pruned at step {record['step']}", scores)
            seen_lines = len(lines)
            if finished:
                break
            if liveness.enabled and time.monotonic() - last_beat >= liveness.interval:
                liveness.beat(trial._trial_id)
                last_beat = time.monotonic()
            time.sleep(settings.poll_seconds)
    except BaseException:
        child_processes.kill_group(process)
        trial.set_user_attr("error", "the worker was interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        log.close()
    if process.returncode != 0:
        trial.set_user_attr("exit_code", process.returncode)
        trial.set_user_attr("error", _tail(trial_dir / "trial.log"))
        return _finish(study, trial, TrialState.FAIL, f"failed (exit code {process.returncode}; see {trial_dir / 'trial.log'})", scores)
    if not scores:
        trial.set_user_attr("error", "the trial finished without a validation score")
        return _finish(study, trial, TrialState.FAIL, "failed: no validation score", scores)
    if not settings.keep_checkpoints:
        for checkpoint in trial_dir.rglob("*.ckpt"):
            checkpoint.unlink()
    return _finish(study, trial, TrialState.COMPLETE, f"val Dice {max(scores):.4f}", scores)


def _trial_environment() -> dict[str, str]:
    return child_processes.environment(own_job=True)


def _finish(study, trial, state: TrialState, what: str, scores: list[float]) -> TrialState:
    if state == TrialState.COMPLETE:
        study.tell(trial, max(scores))
    else:
        study.tell(trial, state=state)
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    print(f"[{study.study_name}] trial {trial.number} {state.name.lower()}: {what}  ({params})", flush=True)
    return state


def _tail(path: Path, lines: int = 15, chars: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


# ---- the trial process ---------------------------------------------------------------------------------------
def _validation_reporter(progress: Path):
    import pytorch_lightning as pl

    class ValidationReporter(pl.Callback):
        """Appends ``{"step", "val_dice"}`` per validation (rank 0), for the worker to report and prune on."""

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or not trainer.is_global_zero or "val/dice" not in trainer.callback_metrics:
                return
            record = {"step": trainer.global_step, "val_dice": float(trainer.callback_metrics["val/dice"])}
            with open(progress, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    return ValidationReporter()


def trial_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    from benchmark.run import run

    run(spec["config"], callbacks=[_validation_reporter(Path(spec["progress"]))])
    return 0


# ---- orchestration -------------------------------------------------------------------------------------------
def tune(settings: TuneSettings) -> dict[str, Any]:
    """Create the study, run ``settings.workers`` workers on it, write and return the summary."""
    create_study(settings)
    started = time.time()
    print(f"study '{settings.study_name}' on {settings.storage.display()}: {settings.n_trials} trials, "
          f"{settings.workers} worker(s), pruner {settings.pruner}; folder {settings.study_dir}", flush=True)
    if settings.workers == 1:
        run_worker(settings, 0)
    else:
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_worker_process, args=(settings, index), name=f"tune-worker-{index}")
                     for index in range(settings.workers)]
        for process in processes:
            process.start()
        try:
            for process in processes:
                process.join()
        except KeyboardInterrupt:
            for process in processes:
                process.join(timeout=30)
            raise
        failed = [p.name for p in processes if p.exitcode != 0]
        if failed:
            print(f"warning: worker(s) {', '.join(failed)} stopped with an error (see above)", file=sys.stderr)
    summary = write_report(settings)
    summary["wall_time_s"] = round(time.time() - started, 1)
    print_summary(summary)
    return summary


# ---- the best trial for `run --from-study` ---------------------------------------------------------------------


def settings_from_args(args, config: dict[str, Any]) -> TuneSettings:
    from benchmark.finalize import finalize
    from benchmark.run import prepare

    if args.trials < 1 or args.workers < 1:
        raise UserError("--trials (TRIALS) and --workers (WORKERS) must be at least 1")
    if args.pruner not in PRUNERS:
        raise UserError(f"unknown pruner '{args.pruner}'", fix=f"one of: {', '.join(PRUNERS)}")
    if args.heartbeat_interval < 1 or args.grace_period <= args.heartbeat_interval:
        raise UserError("--heartbeat-interval must be >= 1 s and --grace-period longer than it")
    config = finalize(config)
    prepare(config)  # bad data, names and values stop here, before a study exists
    name = args.study_name or default_study_name(config)
    study_dir = Path(config["run"]["out"]).resolve() / "tune" / name
    storage = args.storage
    if storage is None and (study_dir / STUDY_FILE).is_file():  # continuing (or reporting on) an existing study
        storage = json.loads((study_dir / STUDY_FILE).read_text())["storage"]
    load_search_space(config["method_name"], config, args.space)  # a bad file stops here, before a study exists
    return TuneSettings(
        config=config, study_name=name, study_dir=study_dir,
        storage=StorageSpec.parse(storage, study_dir, args.workers), n_trials=args.trials, workers=args.workers,
        space_path=args.space, seed_per_trial=args.seed_per_trial, pruner=args.pruner,
        pruner_startup_trials=args.pruner_startup_trials, sampler_startup_trials=args.sampler_startup_trials,
        heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period, max_retry=args.max_retry,
        keep_checkpoints=args.keep_checkpoints,
    )


def command_tune(args, config: dict[str, Any]) -> int:
    settings = settings_from_args(args, config)
    if args.report_only:
        settings.study_dir.mkdir(parents=True, exist_ok=True)
        print_summary(write_report(settings))
        return 0
    tune(settings)
    return 0


if __name__ == "__main__":
    sys.exit(trial_main(sys.argv[1:]))
