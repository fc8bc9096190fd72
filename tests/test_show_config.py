"""``run --show-config`` answers from the catalogue and the data set's lists: neither torch nor Lightning is imported,
nothing is written, and it names the labeled count and the hash the run will have."""
from __future__ import annotations


from benchmark.catalogue import catalogue
from benchmark.config import config_hash
from benchmark.run_request import RunRequest
from tests.conftest import cli_in_fresh_interpreter


def test_show_config_imports_neither_torch_nor_lightning_and_names_the_runs_hash(tmp_path):
    catalogue()  # the subprocess reads this session's catalogue (building it would import every method)
    argv = ["run", "--method", "mean_teacher", "--dataset", "synthetic_acdc", "--profile", "cpu", "--ratio", "0.1",
            "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"), "--set", "optim.lr=0.02", "--show-config"]
    heavy, shown = cli_in_fresh_interpreter(argv)
    assert heavy == [], heavy
    finished = RunRequest(method="mean_teacher", dataset="synthetic_acdc", profile="cpu", ratio=0.1, out=str(tmp_path / "runs"),
                          leaderboard_dir=str(tmp_path / "lb"), overrides=["optim.lr=0.02"]).finalized()
    assert f"# labeled: {finished['data']['labeled']} patients" in shown
    assert f"# config hash: {config_hash(finished)}" in shown
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lb").exists()


def test_a_missing_data_root_is_reported_without_importing_torch_or_lightning(tmp_path):
    """Nothing can be read from a data root that is not set or not there, so the message comes at once (building the
    DataModule to list layout problems imported Lightning first: 10 s for one line)."""
    catalogue()
    common = ["run", "--method", "supervised", "--dataset", "acdc", "--profile", "cpu", "--ratio", "0.1",
              "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"), "--show-config"]
    heavy, printed = cli_in_fresh_interpreter(common, [*common, "--data-root", str(tmp_path / "absent")], expected_code=2)
    assert heavy == [], heavy
    assert "needs DATA_ROOT" in printed and "data root does not exist" in printed and str(tmp_path / "absent") in printed
