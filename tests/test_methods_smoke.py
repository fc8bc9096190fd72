"""Every registered method trains and tests end to end on 2D and 3D data, and with full supervision (RATIO=1.0)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from core.errors import EXIT_USER_ERROR
from datamodules import get_dataset
from methods.registry import get_method, method_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(tmp_path: Path, *args: str) -> int:
    return main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), *args])


@pytest.mark.parametrize("dataset", ["synthetic_acdc", "synthetic_la"])
@pytest.mark.parametrize("name", method_names())
def test_smoke_fit_writes_two_rows(tmp_path, name, dataset):
    if get_dataset(dataset).spec.spatial_dims not in get_method(name).spatial_dims:
        # A method defined for other dimensionalities (MMS: 2-D) refuses with a user error before writing anything.
        assert run_cli(tmp_path, "--method", name, "--dataset", dataset, "--ratio", "0.5") == EXIT_USER_ERROR
        assert not (tmp_path / "lb" / f"{dataset}.csv").exists()
        return
    assert run_cli(tmp_path, "--method", name, "--dataset", dataset, "--ratio", "0.5") == 0
    table = pd.read_csv(tmp_path / "lb" / f"{dataset}.csv")
    assert table["checkpoint"].tolist() == ["last", "best"] and (table["status"] == "ok").all()
    assert (table["method"] == name).all() and table["dice"].between(0, 1).all()


@pytest.mark.parametrize("name", method_names())
def test_smoke_fit_with_full_supervision(tmp_path, name):
    assert run_cli(tmp_path, "--method", name, "--dataset", "synthetic_acdc", "--ratio", "1.0") == 0
    table = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    assert len(table) == 2 and (table["status"] == "ok").all()
