"""Run by tests/test_mean_teacher.py in a subprocess: a 2-rank CPU DDP fit of mean_teacher (smoke profile) that
records, on every rank, a checksum of the EMA teacher's parameters after training, then all-gathers them.

Usage: python ddp_teacher_check.py OUT_DIR CACHE_DIR
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from benchmark import run as run_module
from benchmark.config import resolve_config
from methods.registry import get_method


class TeacherChecksums(Callback):
    def on_train_end(self, trainer, module):
        checksum = torch.stack([p.detach().double().sum() for p in module.teacher.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(trainer.world_size)]
        dist.all_gather(gathered, checksum)
        student = torch.stack([p.detach().double().sum() for p in module.net.parameters()]).sum().item()
        if trainer.is_global_zero:
            (Path(sys.argv[1]) / "checksums.json").write_text(json.dumps(
                {"teacher": [g.item() for g in gathered], "student": student, "world_size": trainer.world_size}))


out = Path(sys.argv[1])
method = get_method("mean_teacher")
config = resolve_config("synthetic_acdc", "mean_teacher", "smoke", [
    "data.ratio=0.5", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=6",
    f"run.out={out / 'runs'}", f"run.leaderboard_dir={out / 'lb'}", "run.progress=false",
], method.defaults, family="acdc")
original = run_module.build_trainer


def with_checksums(*args, **kwargs):
    trainer, best = original(*args, **kwargs)
    trainer.callbacks.append(TeacherChecksums())
    return trainer, best


run_module.build_trainer = with_checksums
run_module.run(config)
