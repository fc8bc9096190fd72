"""Run by tests/test_co_da.py in a subprocess: a 2-rank CPU DDP fit of co_da (smoke profile) that records, on
every rank, Co-DA's running class statistics right after the last training step (before DDP could broadcast rank
0's buffers again) and a sum of the rank's last unlabeled images, then all-gathers both.

Usage: python ddp_co_da_check.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from ddp_fit import two_rank_run  # tests/scripts/ddp_fit.py, beside this script


def gather(trainer, tensor: torch.Tensor) -> list[list[float]]:
    gathered = [torch.zeros_like(tensor) for _ in range(trainer.world_size)]
    dist.all_gather(gathered, tensor)
    return [g.tolist() for g in gathered]


class StatisticsOnEveryRank(Callback):
    def __init__(self):
        self.input_sum = torch.zeros(1, dtype=torch.float64)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.input_sum = batch["unlabeled"]["image"].double().sum().reshape(1)

    def on_train_end(self, trainer, module):
        values = torch.cat([s.value.double() for s in module.statistics.modules() if hasattr(s, "updates")])
        updates = module.statistics[0].unlabeled_marginal.updates.clone()
        report = {"statistics": gather(trainer, values), "updates": gather(trainer, updates),
                  "unlabeled_input_sums": gather(trainer, self.input_sum), "world_size": trainer.world_size,
                  "steps": trainer.global_step}
        if trainer.is_global_zero:
            (Path(sys.argv[1]) / "ddp_statistics.json").write_text(json.dumps(report))


two_rank_run("co_da", StatisticsOnEveryRank(), Path(sys.argv[1]), max_steps=3)
