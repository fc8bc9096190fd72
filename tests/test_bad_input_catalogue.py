"""Every case of the bad-input catalogue (tests/bad_input_catalogue.py) through the CLI: exit code 2, one message
saying what, where and how to fix, and nothing that was on disk before changed (data, leaderboards, earlier runs).

Some of these were first tested elsewhere at the level of one function (tests/test_datamodules.py,
tests/test_leaderboard.py, tests/test_stages.py); here each goes through the command a user types.
"""
from __future__ import annotations

import pytest

from core.errors import EXIT_USER_ERROR
from tests.bad_input_catalogue import CASES, build_sources, documented_cases, run_case
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, acdc_root, la_root):
    return build_sources(tmp_path_factory.mktemp("catalogue-sources"), acdc=acdc_root, la=la_root)


def test_the_catalogue_covers_at_least_25_distinct_cases():
    assert len(CASES) >= 25 and len({case.name for case in CASES}) == len(CASES)


def test_the_documented_table_lists_exactly_these_cases():
    """docs/reliability.md is written by `python -m tests.bad_input_catalogue --update docs/reliability.md`."""
    assert documented_cases(PROJECT_ROOT / "docs" / "reliability.md") == [case.name for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_clear_message_exit_2_and_changes_nothing_on_disk(case, sources, tmp_path):
    outcome = run_case(case, sources, tmp_path / "ws")
    assert outcome.code == EXIT_USER_ERROR, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    error_lines = [line for line in outcome.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, outcome.stderr[-3000:]
    message = outcome.message
    assert case.expect in message, message
    assert "\n  where: " in message and "\n  fix:   " in message, message
    assert not outcome.changed, f"files changed: {outcome.changed}"
    new_files = outcome.new_files
    if case.keeps_run:
        # Stopped after training: the new run folder keeps its checkpoints and the message says how to resume it.
        assert "--resume" in message and any(name.endswith("last.ckpt") for name in new_files), message
        assert all(name.startswith("runs/") for name in new_files), new_files
    else:
        assert not new_files, f"new files: {new_files}"
