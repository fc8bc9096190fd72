"""ACCELERATOR and PRECISION (``trainer.accelerator``, ``trainer.precision``): checked against this machine before
a run folder exists, so that asking for a GPU where there is none is one message and exit code 2."""
from __future__ import annotations

from typing import Any

from benchmark.schema import RULES
from core.errors import UserError

ACCELERATORS = RULES["trainer.accelerator"].choices
GPU_NAMES = ("gpu", "cuda")
# fp16 autocast does not exist on CPU; Lightning would silently train in bf16 instead, under a config that says fp16.
FP16 = ("16-mixed", "16", 16)


def gpu_count() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1 if torch.backends.mps.is_available() else 0


def check_hardware(trainer: dict[str, Any]) -> None:
    """A UserError if ``trainer``'s accelerator, precision or device count cannot run on this machine."""
    accelerator, precision = trainer["accelerator"], trainer["precision"]
    if accelerator not in ACCELERATORS:
        raise UserError(f"unknown accelerator {accelerator!r}", where="ACCELERATOR= (--accelerator, trainer.accelerator)",
                        fix=f"one of {', '.join(ACCELERATORS)}")
    gpus = gpu_count()
    if accelerator in GPU_NAMES and gpus == 0:
        raise UserError("ACCELERATOR=gpu asks for a GPU, but this machine has none that PyTorch can use "
                        "(torch.cuda.is_available() is false)", where="ACCELERATOR= (--accelerator, trainer.accelerator)",
                        fix="use ACCELERATOR=cpu or auto here, or run on a machine with a GPU and a CUDA build of torch")
    devices = int(trainer["devices"])
    if accelerator in GPU_NAMES and devices > gpus:
        raise UserError(f"DEVICES={devices} asks for more GPUs than this machine has ({gpus})", where="DEVICES= (--devices, trainer.devices)",
                        fix=f"use DEVICES={gpus} or fewer")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and gpus == 0)
    if on_cpu and precision in FP16:
        raise UserError(f"precision {precision} (fp16 mixed) does not run on CPU", where="PRECISION= (--precision, trainer.precision)",
                        fix="use PRECISION=bf16-mixed or 32-true on CPU")
