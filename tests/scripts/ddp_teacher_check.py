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

from ddp_fit import two_rank_run  # tests/scripts/ddp_fit.py, beside this script


class TeacherChecksums(Callback):
    def on_train_end(self, trainer, module):
        checksum = torch.stack([p.detach().double().sum() for p in module.teacher.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(trainer.world_size)]
        dist.all_gather(gathered, checksum)
        student = torch.stack([p.detach().double().sum() for p in module.net.parameters()]).sum().item()
        if trainer.is_global_zero:
            (Path(sys.argv[1]) / "checksums.json").write_text(json.dumps(
                {"teacher": [g.item() for g in gathered], "student": student, "world_size": trainer.world_size}))


two_rank_run("mean_teacher", TeacherChecksums(), Path(sys.argv[1]), max_steps=6)
