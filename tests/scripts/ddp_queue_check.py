"""Run by tests/test_action.py in a subprocess: a 2-rank CPU DDP run of ACTION's two distillation stages (smoke
profile) that records, on every rank after the final one, checksums of the memory banks (filled by both stages),
all-gathered to rank 0.

Usage: python ddp_queue_check.py OUT_DIR
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

out = Path(sys.argv[1])
records = []


class QueueChecksums(Callback):
    def on_train_end(self, trainer, module):
        local = torch.stack([module.latent_queue.keys.double().sum(), module.window_queue.keys.double().sum(),
                             module.latent_queue.pointer.double()])
        gathered = [torch.zeros_like(local) for _ in range(trainer.world_size)]
        dist.all_gather(gathered, local)
        records.append({"stage": module.stage, "ranks": [g.tolist() for g in gathered], "world_size": trainer.world_size})
        if trainer.is_global_zero:
            (out / "queues.json").write_text(json.dumps(records))


config = resolve_config("synthetic_acdc", "action", "smoke", [
    "data.ratio=0.5", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=3", "method.queue_size=8",
    "run.stages=[pretrain_global, pretrain_local]",
    f"run.out={out / 'runs'}", f"run.leaderboard_dir={out / 'lb'}", "run.progress=false",
], get_method("action").defaults, family="acdc")
run_module.run(config, callbacks=[QueueChecksums()])  # extra callbacks watch the final stage
