"""Loading weights into a run's model: a checkpoint of this run (on rank 0, broadcast to the others under DDP), and
the checkpoint a stage starts from (the previous stage's, or ``run.init_from``: a checkpoint of another method or a
weights file goes through benchmark/warm_start.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from benchmark.checkpoints import read_checkpoint
from core.distributed import broadcast_from_rank_zero, rank_and_world
from core.errors import UserError


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
