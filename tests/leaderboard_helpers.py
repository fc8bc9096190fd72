"""Per-case test files as a run folder holds them, for the leaderboard tests (tests/test_report.py,
tests/test_claims.py)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_per_case(folder: Path, case_dice: list[float]) -> str:
    """A run folder's ``test_per_case_last.csv`` with cases c0, c1, ...: each class of a case gets the same Dice,
    so the case mean is that value. Returns the folder, as a row's ``run_dir``."""
    folder.mkdir(parents=True)
    rows = [{"case": f"c{i}", "class": name, "dice": dice, "jaccard": dice, "hd95": 1.0, "asd": 1.0}
            for i, dice in enumerate(case_dice) for name in ("RV", "Myo", "LV")]
    pd.DataFrame(rows).to_csv(folder / "test_per_case_last.csv", index=False)
    return str(folder)
