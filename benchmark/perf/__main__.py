"""``python -m benchmark.perf [--quick] [--out perf] [--only section ...]``: measure and write the report."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmark.perf import data, report
from benchmark.perf.timing import machine
from core.errors import EXIT_USER_ERROR, UserError

SECTIONS = ("metrics", "score", "sliding_window", "training_step", "loading", "memory", "inference_speed", "precision",
            "paper_cost", "cli_startup")


def measure(quick: bool, acdc_root: Path, work: Path, only: list[str], methods: list[str] | None, out: Path, threads: int,
            cost_protocols: list[str] | None = None, compile_too: bool = False) -> dict:
    from benchmark.perf import (cli_startup, inference_speed, loading, memory, metrics_section, paper_cost, precision,
                                score_section, sliding_window, training_step)

    la_root = data.write_la_sized(work / "la-sized", n_train=3 if quick else 6, n_test=1 if quick else 2,
                                  shape=(48, 40, 24) if quick else data.LA_SIZED_SHAPE)
    runners = {
        "metrics": lambda: metrics_section.run(acdc_root, la_root, quick),
        "score": lambda: score_section.run(la_root, work, quick),
        "sliding_window": lambda: sliding_window.run(la_root, quick),
        "training_step": lambda: training_step.run(quick, methods),
        "loading": lambda: loading.run(acdc_root, la_root, quick),
        "memory": lambda: memory.run(acdc_root, quick, methods),
        "inference_speed": lambda: inference_speed.run(quick, results["sections"].get("sliding_window")),
        "precision": lambda: precision.run(quick, methods, compile_too),
        "paper_cost": lambda: paper_cost.run(quick, methods, cost_protocols),
        "cli_startup": lambda: cli_startup.run(quick),
    }
    results = {"quick": quick, "threads": threads, "machine": machine(), "sections": {}, "section_seconds": {}, "errors": {}}
    started = time.perf_counter()
    for name in SECTIONS:
        if only and name not in only:
            continue
        print(f"[perf] {name} ...", file=sys.stderr, flush=True)
        section_started = time.perf_counter()
        try:
            results["sections"][name] = runners[name]()
        except AssertionError:
            raise  # a broken equality (metrics vs medpy, batched vs per-window) is a bug, not a slow machine
        except Exception as error:
            traceback.print_exc()
            results["errors"][name] = f"{type(error).__name__}: {error}"[:500]
        results["section_seconds"][name] = round(time.perf_counter() - section_started, 1)
        results["duration_s"] = time.perf_counter() - started
        report.write(results, out)  # after every section: a long run killed half way keeps what it measured
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the tests (structure only, figures meaningless)")
    parser.add_argument("--out", default="perf", help="folder for report.json and report.md (default perf/)")
    parser.add_argument("--acdc-root", default=None, help="the real ACDC copy (default ../shared/datasets/ACDC)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=[], help="run only these sections")
    parser.add_argument("--methods", nargs="+", default=None, help="methods for the step, memory and paper_cost sections (default: all registered)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for the timed sections (default 1: on a shared machine a pool of 2+ "
                             "OpenMP threads stalls whenever one of them is preempted, which swamps every ratio)")
    parser.add_argument("--cost-protocols", nargs="+", choices=("acdc", "la"), default=None,
                        help="protocols the paper_cost section counts (default: acdc; la costs tens of CPU minutes)")
    parser.add_argument("--compile", action="store_true",
                        help="the precision section also times torch.compile of the 2-D U-Net (its first step compiles "
                             "for minutes on a shared CPU)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        acdc_root = data.acdc_root(args.acdc_root)
        with tempfile.TemporaryDirectory(prefix="perf-") as work:
            results = measure(args.quick, acdc_root, Path(work), args.only, args.methods, Path(args.out), args.threads,
                              args.cost_protocols, args.compile)
    except UserError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    json_path, md_path = report.write(results, Path(args.out))  # the final duration
    print(f"written: {json_path} and {md_path} ({results['duration_s']:.0f} s)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
