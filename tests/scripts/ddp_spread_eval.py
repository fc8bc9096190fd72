"""Run by tests/test_ddp.py in a subprocess: a 2-rank CPU DDP smoke run that records, per rank, which validation
and test cases that rank scored (seen_rank<R>.json), to show evaluation is spread over the ranks.

Usage: python ddp_spread_eval.py OUT_DIR
"""
import json
import os
import sys
from pathlib import Path

from benchmark import run as run_module
from benchmark.config import resolve_config
from core.evaluation import Evaluator
from methods.base import SemiSupervisedMethod
from methods.registry import get_method

out = Path(sys.argv[1])
rank = int(os.environ.get("LOCAL_RANK", 0))  # Lightning re-launches this script once per extra rank
seen = {"val": [], "test": []}

evaluate, validation_step = Evaluator.evaluate, SemiSupervisedMethod.validation_step


def recording_evaluate(self, predictor, cases, **kwargs):
    seen["test"].append(list(cases.case_ids))
    return evaluate(self, predictor, cases, **kwargs)


def recording_validation_step(self, case, batch_idx):
    seen["val"].append(case["case"])
    return validation_step(self, case, batch_idx)


Evaluator.evaluate, SemiSupervisedMethod.validation_step = recording_evaluate, recording_validation_step
config = resolve_config("synthetic_acdc", "supervised", "smoke", [
    "data.ratio=0.2", "data.max_eval_cases=4", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=2",
    "trainer.val_every=2", f"run.out={out / 'runs'}", f"run.leaderboard_dir={out / 'lb'}", "run.progress=false",
], get_method("supervised").defaults, family="acdc")
run_module.run(config)
(out / f"seen_rank{rank}.json").write_text(json.dumps(seen))
