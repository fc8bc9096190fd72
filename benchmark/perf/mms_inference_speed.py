"""Inference speed of an MMS network at the paper's resolution (512x288, batch 1), against a plain forward pass.

MMS reports about 40 frames per second (GPU). What a user can check on their own hardware is how the suite's
inference path compares with the bare network on the same machine in the same process, so the numbers are given
as images per second and as ratios to the plain forward of network 1:

  plain_forward   ``net1(x)`` on a (1, 3, 512, 288) tensor: the network alone
  predict_logits  the method's prediction (network 1, or both networks with ``method.predict_with=average``)
  whole_image     the evaluator's path on a 622x529 frame (Kvasir-SEG's most common size): resize to 512x288,
                  predict, resize the logits back, argmax

Usage::

    python -m benchmark.perf.mms_inference_speed            # the paper-profile MMS network (U-Net 16), random weights
    python -m benchmark.perf.mms_inference_speed --run-dir runs/kvasir_seg/mms/<run>
                                                            # a trained run (config + last checkpoint)

Speed does not depend on the weights' values, so the first form measures the same network as a trained one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

PAPER_SIZE = (512, 288)
FRAME_SIZE = (529, 622)  # (H, W) of Kvasir-SEG's most common frame


def images_per_second(functions: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per path: (images per wall-clock second, images per CPU second of this process). The paths are timed in
    turn within every repeat, so a load change on a shared machine affects all of them alike; the CPU-second
    figure does not count time other processes hold the cores."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    wall = dict.fromkeys(functions, 0.0)
    cpu = dict.fromkeys(functions, 0.0)
    for _ in range(repeats):
        for name, function in functions.items():
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            function()
            wall[name] += time.perf_counter() - started_wall
            cpu[name] += time.process_time() - started_cpu
    return {name: (repeats / wall[name], repeats / max(cpu[name], 1e-9)) for name in functions}


def build_model(run_dir: Path | None, device: str):
    from benchmark.config import resolve_config
    from benchmark.run import load_weights
    from datamodules import get_dataset
    from methods.registry import get_method

    if run_dir is None:
        config = resolve_config("kvasir_seg", "mms", "paper", [], get_method("mms").defaults, family="kvasir_seg")
    else:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config.pop("config_hash", None)
    entry = get_dataset(config["dataset"])
    model = get_method(config["method_name"])(entry.spec, config)
    if run_dir is not None:
        load_weights(model, run_dir / "checkpoints" / "last.ckpt")
    return model.to(device).eval(), config


@torch.inference_mode()
def measure(model, size=PAPER_SIZE, frame=FRAME_SIZE, warmup: int = 3, repeats: int = 10, device: str = "cpu") -> dict:
    """Images per second of the three paths (module docstring) and their ratios to the plain forward."""
    from core.evaluation import Evaluator

    x = torch.randn(1, model.spec.in_channels, *size, device=device)
    image = np.random.default_rng(0).standard_normal((model.spec.in_channels, *frame)).astype(np.float32)
    evaluator = Evaluator(spec=model.spec, patch_size=tuple(size), stride=None)
    results = images_per_second(
        {
            "plain_forward": lambda: model.net1(x),
            "predict_logits": lambda: model.predict_logits(x),
            "whole_image": lambda: evaluator.predict(model.predict_logits, image, device),
        },
        warmup,
        repeats,
    )
    wall = {k: v[0] for k, v in results.items()}
    cpu = {k: v[1] for k, v in results.items()}
    return {
        "size": list(size), "batch": 1, "threads": torch.get_num_threads(), "device": device,
        "images_per_second": {k: round(v, 3) for k, v in wall.items()},
        "ratio_to_plain_forward": {k: round(v / wall["plain_forward"], 3) for k, v in wall.items()},
        "images_per_cpu_second": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_ratio_to_plain_forward": {k: round(v / cpu["plain_forward"], 3) for k, v in cpu.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.perf.mms_inference_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="a finished MMS run folder (default: paper network)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model, config = build_model(args.run_dir, args.device)
    result = measure(model, warmup=args.warmup, repeats=args.repeats, device=args.device)
    result["network"] = f"{config['method_name']} ({config['model']['name'] or 'unet'}, base_features {config['model']['base_features']})"
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
