"""A run's folder: its name (``L<labeled>_s<seed>_<hash>_<time>_<pid>``), the one DDP ranks share, the checks before a
``--resume`` continues it, the lock that keeps it to one process, and what is left of it when a run stops early.
A killed run's folder (a checkpoint, no rows) is what a sweep resumes instead of training again."""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from benchmark.checkpoints import BEST_NAME, LAST_CHECKPOINT, RESUME_CHECKPOINT, checkpoint_folder
from benchmark.config import NON_SEMANTIC_KEYS
from benchmark.leaderboard import recorded_rows
from benchmark.resume import read_run_config
from core.errors import UserError


RUN_DIR_ENV = "SSL_BENCH_RUN_DIR"


def global_rank(devices_per_node: int = 1) -> int:
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


def leaderboard_path(config: dict[str, Any]) -> Path:
    return Path(config["run"]["leaderboard_dir"]) / f"{config['dataset']}.csv"


def make_run_dir(config: dict[str, Any], digest: str) -> Path:
    """A new folder per run; DDP ranks other than 0 (re-launched copies of this command) reuse rank 0's.

    Ranks started by torchrun or srun on other nodes do not inherit rank 0's environment; they write nothing
    (Lightning's loggers and checkpoint saving are rank-zero only), so they get a path that is never created."""
    rank = global_rank(int(config["trainer"]["devices"]))
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


def resume_hint(folder: RunFolder) -> str:
    """What a stopped run left: nothing (a fresh run without a checkpoint yet; its folder is removed) or a
    folder to resume."""
    if not folder.resumed and not folder.has_checkpoints():
        shutil.rmtree(folder.path, ignore_errors=True)
        return "no checkpoint had been written, so nothing was kept and no row written; run the same command again"
    return (f"no row was written; the run folder keeps its checkpoints: repeat the same command with "
            f"`--resume {folder.path}` (make: RESUME={folder.path}) to continue from the last one")
