"""Peak memory (RSS) of short cpu runs per method and of evaluating the largest test volume, each in a fresh
subprocess (``python -m benchmark.perf.memory ...`` prints one JSON line), so one measurement cannot inflate another."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def _rss_mb(who: int) -> float:
    """Peak RSS. For this process from /proc (VmHWM): getrusage's ru_maxrss survives exec, so a subprocess would
    report the forking parent's size. Loader workers are forks sharing the parent's pages, so theirs include those."""
    if who == resource.RUSAGE_SELF:
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024.0
        except (OSError, StopIteration):
            pass
    return resource.getrusage(who).ru_maxrss / 1024.0


def run_method(method: str, dataset: str, profile: str, steps: int) -> dict[str, Any]:
    """A whole cpu run of ``steps`` steps (fit, validation, test of last and best) as ``make bench`` does it,
    with one validation and one test case (peak memory is reached within the first steps and cases)."""
    from benchmark.perf.training_step import method_config
    from benchmark.run import run

    with tempfile.TemporaryDirectory(prefix="perf-memory-") as out:
        run(method_config(method, dataset, profile, steps, Path(out)))
    return {"peak_rss_mb": _rss_mb(resource.RUSAGE_SELF), "largest_worker_peak_rss_mb": _rss_mb(resource.RUSAGE_CHILDREN)}


def evaluate_acdc_volume(root: Path, width: int) -> dict[str, Any]:
    """The slice-wise evaluation (prediction + four metrics per class) of the largest ACDC test volume."""
    import h5py
    import numpy as np

    from core.evaluation import Evaluator
    from datamodules.acdc import ACDC_SPEC
    from methods.networks import build_network

    names = (root / "test.list").read_text().split()
    sizes = {}
    for name in names:
        with h5py.File(root / "data" / f"{name}.h5", "r") as file:
            sizes[name] = int(np.prod(file["image"].shape))
    largest = max(sizes, key=sizes.get)
    with h5py.File(root / "data" / f"{largest}.h5", "r") as file:
        image, label = file["image"][()], file["label"][()]
    net = build_network(2, 1, 4, base_features=width).eval()
    evaluator = Evaluator(ACDC_SPEC, patch_size=(256, 256), stride=None)
    before = _rss_mb(resource.RUSAGE_SELF)
    evaluator.score(evaluator.predict(net, image), label, None)
    return {"case": largest, "shape": list(image.shape), "network": f"U-Net base_features={width}",
            "peak_rss_mb": _rss_mb(resource.RUSAGE_SELF), "peak_before_evaluation_mb": before}


def evaluate_la_volume(shape: list[int], width: int) -> dict[str, Any]:
    """The LA protocol (patch 112x112x80, stride 18/18/4, 4 windows per pass) with the V-Net, then the metrics."""
    import numpy as np
    import torch

    from core.evaluation import Evaluator
    from datamodules.la import LA_SPEC
    from methods.networks import build_network

    torch.manual_seed(0)
    net = build_network(3, 1, 2, base_features=width).eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(s // 4, 3 * s // 4) for s in shape)] = 1
    evaluator = Evaluator(LA_SPEC, patch_size=(112, 112, 80), stride=(18, 18, 4))
    before = _rss_mb(resource.RUSAGE_SELF)
    prediction = evaluator.predict(net, image)
    evaluator.score(prediction, label, None)
    return {"shape": list(shape), "network": f"V-Net base_features={width}", "window_batch": evaluator.window_batch,
            "peak_rss_mb": _rss_mb(resource.RUSAGE_SELF), "peak_before_evaluation_mb": before}


def in_subprocess(*args: str) -> dict[str, Any]:
    import os

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the thread count make perf runs with
    completed = subprocess.run([sys.executable, "-m", "benchmark.perf.memory", *args], cwd=REPO_ROOT,
                               capture_output=True, text=True, env=env)
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:  # (Lightning turns a SIGTERM into a clean exit without output)
        return {"error": completed.stderr.strip().splitlines()[-1][:300] if completed.stderr.strip() else "failed without output"}
    return json.loads(lines[-1])


def run(acdc_root: Path, quick: bool, methods: list[str] | None = None) -> dict[str, Any]:
    from methods.registry import method_names

    profile, steps = ("smoke", 2) if quick else ("cpu", 10)
    names = methods or method_names()
    results: dict[str, Any] = {"dataset": "synthetic_acdc", "profile": profile, "steps": steps, "methods": {}}
    for name in names:
        results["methods"][name] = in_subprocess("method", name, "--profile", profile, "--steps", str(steps))
    results["evaluation_largest_acdc_test_volume"] = in_subprocess("acdc", str(acdc_root), "--width", "4" if quick else "16")
    # 130x112x88 has 6 windows (batches of 4 and 2): the peak of a 4-window pass at the paper's width 16 plus the
    # volume's maps; a whole 200x150x88 volume adds only larger maps (~3 x 2.6 M floats) and 66 more windows of time.
    la_shape = ["40", "36", "24"] if quick else ["130", "112", "88"]
    results["evaluation_la_protocol_volume"] = in_subprocess("la", *la_shape, "--width", "2" if quick else "16")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="what", required=True)
    method = commands.add_parser("method")
    method.add_argument("name")
    method.add_argument("--profile", default="cpu")
    method.add_argument("--steps", type=int, default=20)
    acdc = commands.add_parser("acdc")
    acdc.add_argument("root")
    acdc.add_argument("--width", type=int, default=16)
    la = commands.add_parser("la")
    la.add_argument("shape", nargs=3, type=int)
    la.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    if args.what == "method":
        result = run_method(args.name, "synthetic_acdc", args.profile, args.steps)
    elif args.what == "acdc":
        result = evaluate_acdc_volume(Path(args.root), args.width)
    else:
        result = evaluate_la_volume(args.shape, args.width)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
