"""Checkpoints: what a run saves, how it is written, and how it is read back (weights only, never code).

Each training stage keeps two full-state checkpoints in ``<stage dir>/checkpoints/``:

- ``resume.ckpt``, rewritten at every validation while the stage trains (model, optimizer, scheduler, loop
  counters, callbacks and the global random states): what ``--resume`` continues from. A stage that validates
  only at its end (ACTION's pretraining stages) writes it every ``trainer.val_every`` steps of the run instead;
- ``last.ckpt``, written once the stage has trained all its steps. Its presence marks the stage as finished
  (``resume.ckpt`` is then deleted), and the next stage or the test starts from it.

``best.ckpt`` (best validation Dice; the stage's last step is always validated) is kept beside them. Every
checkpoint is written through :class:`AtomicCheckpointIO` (core/atomic.py), so a run killed while saving leaves the
previous file.

All of them are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a checkpoint
file cannot run code when it is loaded, whoever wrote it (``run.init_from`` may name any file). The full training
state Lightning resumes from fits in that too, so ``--resume`` loads with ``weights_only=True`` as well.
"""
from __future__ import annotations

import pickle
import random
import resource
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from core.atomic import replaced_atomically
from core.errors import UserError

RESUME_CHECKPOINT = "resume.ckpt"
LAST_CHECKPOINT = "last.ckpt"
BEST_NAME = "best"


def checkpoint_folder(stage_dir: Path) -> Path:
    return Path(stage_dir) / "checkpoints"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, replacing files atomically in their own folder; loads weights only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with replaced_atomically(path, "wb") as out:
            torch.save(checkpoint, out)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(Path(path), "the checkpoint to resume from", map_location)


# What torch.save writes first in its legacy (non-zip) format: a pickled magic number.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def is_torch_file(path: Path) -> bool:
    """``path`` starts like a file torch.save writes (a zip archive, or the legacy pickle format)."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(LEGACY_TORCH_MAGIC))
    except OSError:
        return False
    return zipfile.is_zipfile(path) or head == LEGACY_TORCH_MAGIC


def read_checkpoint(path: Path, what: str, map_location=None) -> dict[str, Any]:
    """A checkpoint as tensors and plain containers; a damaged file or one holding other objects (which a
    weights-only load refuses, as it could run code) is a UserError naming it."""
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except FileNotFoundError as error:
        raise UserError(f"{what} does not exist", where=str(path), fix="give the path of an existing .ckpt file") from error
    except pickle.UnpicklingError as error:
        if not is_torch_file(path):  # random bytes, a text file, ...: unpickling fails on the first byte
            raise UserError(f"{what} is not a PyTorch checkpoint file (neither its zip archive nor its legacy format)",
                            where=str(path), fix="give a .ckpt written by this suite (a truncated download? copy it again)") from error
        raise UserError(
            f"refusing to load {what}: it holds Python objects other than tensors and plain values, which a "
            "weights-only load refuses (unpickling them could run code)",
            where=str(path),
            fix="give a .ckpt written by this suite (only a file from a source you trust could be loaded otherwise, by hand)",
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        reason = str(error).split(". ")[0].splitlines()[0][:200]
        raise UserError(
            f"cannot read {what}: damaged, or not a checkpoint ({type(error).__name__}: {reason})",
            where=str(path),
            fix="give a .ckpt written by this suite; a damaged resume.ckpt can be deleted to restart its stage",
        ) from error


def checkpoint_step_and_clock(path: Path) -> tuple[int, dict[str, float]]:
    """A finished stage's global step and the run clock's state when it was saved (``RunClock.state_dict``; empty
    if saved before the run clock was kept in checkpoints)."""
    checkpoint = read_checkpoint(path, "a finished stage's checkpoint")
    return int(checkpoint.get("global_step", -1)), dict(checkpoint.get("callbacks", {}).get(RunClock.__qualname__, {}))


def best_validation_score(path: Path) -> float | None:
    """The best val/dice recorded in a checkpoint's best-model callback state (None if never validated)."""
    for key, state in read_checkpoint(path, "a finished stage's checkpoint").get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and "'val/dice'" in key and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None


def checkpoint_callbacks(stage_dir: Path, every_n_steps: int | None = None) -> tuple[ModelCheckpoint, ModelCheckpoint, "RandomStates"]:
    """(best on validation, resumable state, the random states they carry).

    The resumable state is saved at every validation, or every ``every_n_steps`` steps for a stage that validates
    only at its end. It comes after the best one in the Trainer's list, so it saves the best one's updated state.
    Fixed names (no version counter): a resumed run overwrites its own files."""
    folder = checkpoint_folder(stage_dir)
    best = ModelCheckpoint(dirpath=folder, filename=BEST_NAME, monitor="val/dice", mode="max", save_top_k=1,
                           enable_version_counter=False)
    resumable_name = dict(dirpath=folder, filename=Path(RESUME_CHECKPOINT).stem, monitor=None, save_top_k=1, enable_version_counter=False)
    if every_n_steps is None:
        resumable = ModelCheckpoint(**resumable_name, save_on_train_epoch_end=False)
    else:
        resumable = BetweenValidations(**resumable_name, every_n_train_steps=every_n_steps)
    return best, resumable, RandomStates()


class BetweenValidations(ModelCheckpoint):
    """Every n training steps, except the final one (its validation and last.ckpt follow). Saved right after a
    step that no validation follows (the stage validates only at its end), so the random states it carries are
    those the next step starts from."""

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step < trainer.max_steps:
            super().on_train_batch_end(trainer, *args, **kwargs)


class RandomStates(pl.Callback):
    """Saves the global random states (torch, CUDA, numpy, random) in every checkpoint and puts them back right
    before the first training batch after a resume, so the steps after it draw what the uninterrupted run drew
    (dropout and any other global draws; data augmentation has its own per-sample seeds, datamodules/base.py).

    Not at load time: between loading and the first batch Lightning draws from torch's generator (a base seed for
    each new DataLoader iterator), which the uninterrupted run did once at its start. Stored as tensors and
    plain numbers, so checkpoints stay loadable with ``weights_only=True``."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        states = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        torch.set_rng_state(states["torch"])
        numpy = states["numpy"]
        np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                             numpy["has_gauss"], numpy["cached_gaussian"]))
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def _process_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its children that have ended and been
    waited for (DataLoader workers once their loader shuts them down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class RunClock(pl.Callback):
    """The run's wall time and CPU time across invocations: the seconds recorded in the checkpoint a resume starts
    from, plus this invocation's. Without it a resumed run's ``wall_time_s`` would count its last invocation only.
    CPU time (``cpu_time_s``) is what a run costs on a shared machine, where wall time grows with the other jobs'
    load; it counts this process and its ended loader workers (under DDP, rank 0's).

    Every checkpoint stores ``seconds()`` at its saving (Lightning saves a callback's ``state_dict``); loading a
    resume checkpoint, or a finished stage's ``last.ckpt`` that a resume skips, carries that value over. Steps
    trained after the last checkpoint of a killed invocation are not counted there: they are trained again, and
    counted, by the resume. One clock serves all stages of a run; a checkpoint written before this clock existed
    carries nothing (its run's earlier time is then missing, as before)."""

    def __init__(self) -> None:
        self.started, self.cpu_started = time.time(), _process_cpu_seconds()
        self.carried: float = 0.0
        self.cpu_carried: float | None = 0.0

    def seconds(self) -> float:
        return self.carried + time.time() - self.started

    def cpu_seconds(self) -> float | None:
        """None when the run continues from a checkpoint that recorded wall time but not CPU time (an older run)."""
        if self.cpu_carried is None:
            return None
        return self.cpu_carried + _process_cpu_seconds() - self.cpu_started

    def carry(self, seconds: float, cpu_seconds: float | None = None) -> None:
        """Continue from a checkpoint saved ``seconds`` (``cpu_seconds`` of CPU time) into the run: this
        invocation's time is added to them."""
        self.carried = float(seconds)
        self.cpu_carried = float(cpu_seconds) if cpu_seconds is not None else (0.0 if not seconds else None)

    def state_dict(self) -> dict[str, float]:
        state, cpu_seconds = {"seconds": self.seconds()}, self.cpu_seconds()
        if cpu_seconds is not None:
            state["cpu_seconds"] = cpu_seconds
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.carry(state_dict.get("seconds", 0.0), state_dict.get("cpu_seconds"))


def checkpoint_space_needed(folder: Path, model: torch.nn.Module | None = None) -> int:
    """Bytes a run needs free to write its next checkpoints: two of its largest checkpoint so far (a file is written
    beside the one it replaces), or, before any exists, two full-state checkpoints estimated from the model
    (weights plus two optimizer moments), plus room for the logs."""
    sizes = [path.stat().st_size for path in Path(folder).rglob("*.ckpt") if path.is_file()]
    if sizes:
        checkpoint = max(sizes)
    elif model is not None:
        checkpoint = 3 * sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    else:
        checkpoint = 0
    return 2 * checkpoint + 16 * 2**20
