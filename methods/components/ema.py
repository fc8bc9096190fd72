"""The EMA teacher of Mean Teacher and its descendants (UA-MT, ACTION), as a Lightning submodule.

A torch ``AveragedModel`` kept as a submodule (docs/design.md#ema-teacher): saved and restored with the checkpoint,
moved with the module, and identical on every DDP rank because DDP keeps the students in sync and every rank applies
the same deterministic update. The averaging function is a module-level function bound with ``partial`` so the
module pickles under ``ddp_spawn`` (a closure from ``get_ema_multi_avg_fn`` does not).

SSL4MIS semantics: ``alpha = min(1 - 1 / (n + 1), decay)`` with ``n`` the number of updates so far (a true average
early on), parameters only; the teacher's BatchNorm statistics come from its own forward passes.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from methods.losses.precision import float32_island


@float32_island
def ssl4mis_ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor, decay: float) -> torch.Tensor:
    alpha = min(1.0 - 1.0 / (float(num_averaged) + 1.0), decay)
    return alpha * averaged + (1.0 - alpha) * current


@float32_island
def constant_ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor, decay: float) -> torch.Tensor:
    """``decay * averaged + (1 - decay) * current`` from the first update on (MoCo / ISD / ACTION)."""
    return decay * averaged + (1.0 - decay) * current


def make_ema_teacher(student: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An EMA copy of ``student``; ``warmup`` False uses the constant decay instead of SSL4MIS's true average
    early on. Note: AveragedModel's first update copies the student whatever the rule."""
    average = ssl4mis_ema if warmup else constant_ema
    teacher = AveragedModel(student, avg_fn=partial(average, decay=decay), use_buffers=False)
    teacher.requires_grad_(False)
    return teacher
