"""A stand-in for a tuning trial (``python -m benchmark.tune TRIAL_JSON``) that trains nothing: it writes the
validation scores a trial would, fast, so that the worker's logic (budget, pruning, crashes, killed workers) is
tested without the cost of training. Score of a validation at step s (1..STEPS): s / STEPS * quality, with the
quality falling with the distance of log10(optim.lr) from -2 (lr 0.01 is best).

Environment: FAKE_TRIAL_CRASH / FAKE_TRIAL_HANG = comma-separated trial numbers that exit with an error / never
finish; FAKE_TRIAL_DELAY = seconds between two validations (default 0.2).
"""
import json
import math
import os
import sys
import time
from pathlib import Path

STEPS = 4


def numbers(name: str) -> set[int]:
    return {int(n) for n in os.environ.get(name, "").split(",") if n.strip()}


def main(path: str) -> int:
    spec = json.loads(Path(path).read_text())
    trial_dir = Path(path).parent
    (trial_dir / "pid").write_text(str(os.getpid()))
    number = spec["trial"]
    if number in numbers("FAKE_TRIAL_CRASH"):
        print("RuntimeError: fake out-of-memory in trial", number, file=sys.stderr)
        return 1
    if number in numbers("FAKE_TRIAL_HANG"):
        while True:
            time.sleep(1)
    quality = max(0.0, 1.0 - abs(math.log10(spec["config"]["optim"]["lr"]) + 2.0))
    for step in range(1, STEPS + 1):
        time.sleep(float(os.environ.get("FAKE_TRIAL_DELAY", "0.2")))
        with open(spec["progress"], "a") as handle:
            handle.write(json.dumps({"step": step, "val_dice": step / STEPS * quality}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
