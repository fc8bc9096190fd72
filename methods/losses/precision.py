"""Float32 islands inside a mixed-precision step (``trainer.precision=bf16-mixed`` / ``16-mixed``).

Under autocast, convolutions and matrix products run in bfloat16 (or float16 on a GPU), about three significant
digits. That is fine for a network's layers but not for what comes after them: a cosine similarity divided by a
temperature of 0.07 or 0.1 turns a 0.4 % rounding error into a logit error of several percent; softmax,
log-probabilities, KL, Dice ratios and entropy maps lose the small probabilities they are made of; and running
statistics (EMA teachers, memory banks, class statistics) would accumulate the rounding step after step.

Two measures keep these in float32 without touching the methods' code paths:

* every backbone's decoder returns float32 logits (methods/networks), so softmax, entropy, Dice and cross-entropy
  computed from logits inside a method are float32 whatever the autocast state;
* :func:`float32_island` wraps a loss (or any function of head outputs): autocast is off inside it and its
  half-precision tensor arguments are cast to float32, so a similarity matrix (a matrix product autocast would
  otherwise run in half precision) and everything computed from it is float32. Gradients flow back through the cast.
"""
from __future__ import annotations

import functools
from contextlib import ExitStack
from typing import Any, Callable, TypeVar

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
#: Device types whose autocast :func:`float32_island` switches off when it is on.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")

F = TypeVar("F", bound=Callable[..., Any])


def to_float32(value: Any) -> Any:
    """``value`` with every half-precision tensor in it (also inside lists, tuples and dicts) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in HALF_DTYPES else value
    if isinstance(value, (list, tuple)):
        converted = [to_float32(item) for item in value]
        return type(value)(converted) if not hasattr(value, "_fields") else type(value)(*converted)
    if isinstance(value, dict):
        return {key: to_float32(item) for key, item in value.items()}
    return value


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type this build of torch does not know
        return False


def autocast_disabled() -> ExitStack:
    """A context in which autocast is off on every device type where it was on."""
    stack = ExitStack()
    for device_type in AUTOCAST_DEVICE_TYPES:
        if _autocast_on(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def float32_island(function: F) -> F:
    """Decorator: run ``function`` with autocast off and its half-precision tensor arguments cast to float32."""

    @functools.wraps(function)
    def in_float32(*args: Any, **kwargs: Any) -> Any:
        with autocast_disabled():
            return function(*to_float32(args), **to_float32(kwargs))

    in_float32.runs_in_float32 = True  # tests find the islands by this mark
    return in_float32  # type: ignore[return-value]
