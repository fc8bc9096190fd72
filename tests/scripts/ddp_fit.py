"""Shared by the DDP check scripts: a 2-rank CPU DDP run (smoke profile, synthetic_acdc, RATIO=0.5) of one method
through the suite's own run(), with an extra Lightning callback that records what the check needs on every rank."""
from pathlib import Path

from pytorch_lightning.callbacks import Callback

from benchmark import run as run_module
from benchmark.config import resolve_config
from methods.registry import get_method


def two_rank_run(method: str, callback: Callback, out: Path, max_steps: int) -> None:
    config = resolve_config("synthetic_acdc", method, "smoke", [
        "data.ratio=0.5", "trainer.devices=2", "trainer.accelerator=cpu", f"trainer.max_steps={max_steps}",
        f"run.out={out / 'runs'}", f"run.leaderboard_dir={out / 'lb'}", "run.progress=false",
    ], get_method(method).defaults, family="acdc")
    original = run_module.build_trainer

    def with_callback(*args, **kwargs):
        trainer, best = original(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer, best

    run_module.build_trainer = with_callback
    run_module.run(config)
