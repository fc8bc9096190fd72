"""Leaderboard appends: atomic, column-union, safe with concurrent writers, loud on damage."""
from __future__ import annotations

import multiprocessing
import pandas as pd
import pytest

from benchmark.leaderboard import CORE_COLUMNS, append_rows, check_writable, read_leaderboard
from core.errors import UserError


def row(i: int, **extra) -> dict:
    base = dict(dataset="acdc", method="supervised", profile="cpu", labeled_cases=7, seed=i, checkpoint="last",
                dice=0.5 + i / 1000, jaccard=0.4, hd95=3.0, asd=1.0, status="ok", config_hash="abc")
    return {**base, **extra}


def test_append_creates_then_extends_with_the_union_of_columns(tmp_path):
    path = tmp_path / "acdc.csv"
    append_rows(path, [row(0)])
    append_rows(path, [row(1, dice_RV=0.7)])
    table = read_leaderboard(path)
    assert list(table.columns[: len(CORE_COLUMNS)]) == CORE_COLUMNS
    assert table["seed"].tolist() == ["0", "1"] and table["dice_RV"].tolist() == ["", "0.7"]
    assert not list(tmp_path.glob("*.tmp"))


ROWS_PER_WRITER = 50


def _writer(path, worker):
    for i in range(ROWS_PER_WRITER):
        append_rows(path, [row(worker * 100 + i)])


def test_concurrent_writers_lose_no_rows(tmp_path):
    """4 processes appending 50 rows each to one leaderboard: exactly 200 well-formed rows."""
    path = tmp_path / "acdc.csv"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(path, w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    lines = path.read_text().splitlines()
    assert all(line.count(",") == lines[0].count(",") for line in lines)  # no value holds a comma: fields per line
    table = pd.read_csv(path)
    assert len(table) == 4 * ROWS_PER_WRITER and table["seed"].is_unique and not table.isna()[CORE_COLUMNS].any().any()
    assert not list(tmp_path.glob(".*.tmp"))


def test_damaged_csv_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "acdc.csv"
    path.write_text("dataset,method\n\"unterminated\n")
    before = path.read_bytes()
    with pytest.raises(UserError, match="damaged|lacks columns"):
        append_rows(path, [row(0)])
    assert path.read_bytes() == before


def test_folder_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        check_writable(blocker / "sub")
