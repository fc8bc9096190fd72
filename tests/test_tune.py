"""Optuna search: search spaces, storages (sqlite, journal, a real PostgreSQL server), the ask/tell worker
(budget over several workers, pruning, crashes, killed workers) and a tiny real study on the smoke profile.

Most worker tests run tests/scripts/fake_trial.py in place of the training subprocess: it writes the validation
scores a trial would, in a fraction of a second, so that the driver's logic is tested without training. The
smoke-profile tests run the real trial command end to end.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from benchmark.cli import main
from benchmark.config import resolve_config
from benchmark.search_space import load_search_space
from core.errors import UserError
from benchmark.tune import TuneSettings, _worker_process, create_study, run_worker, trial_config, tune
from benchmark.tune_results import best_trial_overrides, write_report
from benchmark.tune_storage import StorageSpec
from datamodules import get_dataset
from methods.registry import get_method, method_names
from tests.conftest import PROJECT_ROOT

FAKE_TRIAL = PROJECT_ROOT / "tests" / "scripts" / "fake_trial.py"
POSTGRES_SCRIPT = PROJECT_ROOT / "tests" / "scripts" / "postgres.sh"
LR_SPACE = "params:\n  optim.lr: {low: 1.0e-3, high: 1.0e-1, log: true}\n"


@pytest.fixture(autouse=True)
def _one_thread_per_trial(monkeypatch):
    # Trials are subprocesses: the one-thread fixture of the test process does not reach them.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def smoke_config(method: str = "supervised", out: Path | None = None) -> dict:
    config = resolve_config("synthetic_acdc", method, "smoke", ["data.ratio=0.2"], get_method(method).defaults,
                            family=get_dataset("synthetic_acdc").family)
    config["data"]["labeled"] = 4
    if out is not None:
        config["run"]["out"] = str(out)
    return config


def fake_settings(tmp_path: Path, storage: str | None = None, **changes) -> TuneSettings:
    space = tmp_path / "space.yaml"
    space.write_text(LR_SPACE)
    study_dir = tmp_path / "study"
    options = dict(
        config=smoke_config(out=tmp_path), study_name=f"fake-{uuid.uuid4().hex[:8]}", study_dir=study_dir,
        storage=StorageSpec.parse(storage, study_dir, changes.get("workers", 1)), n_trials=4, space_path=str(space),
        pruner="none", poll_seconds=0.05, trial_command=(sys.executable, str(FAKE_TRIAL)),
        heartbeat_interval=1, grace_period=3,
    )
    options.update(changes)
    return TuneSettings(**options)


def load(settings: TuneSettings) -> optuna.Study:
    return optuna.load_study(study_name=settings.study_name, storage=settings.storage.open())


# ---- PostgreSQL -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server on loopback (installed from Debian's packages if missing), stopped afterwards.
    Outside CI a machine that cannot have one skips with the reason; in CI that fails."""
    started = subprocess.run(["bash", str(POSTGRES_SCRIPT), "start", str(_free_port())], capture_output=True, text=True, timeout=1200)
    if started.returncode != 0:
        message = f"no PostgreSQL server from {POSTGRES_SCRIPT}:\n{started.stderr[-3000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder, url = started.stdout.split()[-2:]
    yield url
    subprocess.run(["bash", str(POSTGRES_SCRIPT), "stop", folder], capture_output=True, timeout=300)


def storage_for(kind: str, request) -> str | None:
    return request.getfixturevalue("postgres_url") if kind == "postgresql" else kind


# ---- search spaces ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", method_names())
def test_every_method_has_a_search_space_that_fits_its_config(method):
    config = smoke_config(method)
    space = load_search_space(method, config)
    assert "optim.lr" in space
    # Every sampled value is a valid override of the method's config (types and keys), at both ends of each range.
    for params in ({k: d.low if hasattr(d, "low") else d.choices[0] for k, d in space.items()},
                   {k: d.high if hasattr(d, "high") else d.choices[-1] for k, d in space.items()}):
        trial = trial_config(TuneSettings(config, "s", Path("/tmp"), StorageSpec("sqlite", "sqlite:///x.db"), 1), params, 3, Path("/tmp/t"))
        assert all(_get(trial, key) == value for key, value in params.items())
        assert trial["run"]["test"] is False and trial["run"]["seed"] == 3


def _get(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def test_extends_and_generic_fallback():
    ua_mt = load_search_space("ua_mt", smoke_config("ua_mt"))
    assert {"optim.lr", "method.consistency", "method.ema_decay", "method.threshold_start"} <= set(ua_mt)
    assert ua_mt["method.ema_decay"].choices == (0.99, 0.995, 0.999)
    # The generic space drops the consistency weight the supervised baseline does not have.
    generic = load_search_space("no_such_file", smoke_config("supervised"))
    assert set(generic) == {"optim.lr"} and generic["optim.lr"].log


@pytest.mark.parametrize("content, message", [
    ("params: [optim.lr]\n", "holds `params:`"),
    ("params:\n  optim.lr: {low: 0.1, high: 0.01}\n", "low 0.1 is above high 0.01"),
    ("params:\n  optim.learning_rate: {low: 0.001, high: 0.1}\n", "'optim.learning_rate', which is not a key"),
    ("params:\n  trainer.max_steps: {low: 2.5, high: 8}\n", "must be whole numbers"),
    ("params:\n  optim.lr: {low: 0.001, hihg: 0.1}\n", "keys among"),
    ("params:\n  optim.lr: {choices: []}\n", "non-empty list"),
    ("params:\n  optim.schedule: {low: 1, high: 2}\n", "does not fit the config"),
    ("params: {optim.lr: {low: 0.001, high: 0.1}\n", "not valid YAML"),
    ("extends: nothing_like_it\n", "names no search space"),
    ("params: {}\n", "the search space is empty"),
])
def test_bad_search_space_file_is_a_user_error_and_writes_nothing(tmp_path, capsys, content, message):
    space = tmp_path / "space.yaml"
    space.write_text(content)
    code = main(["tune", "--profile", "smoke", "--ratio", "0.2", "--out", str(tmp_path / "runs"), "--space", str(space)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and str(space) in err
    assert not (tmp_path / "runs" / "tune").exists()


# ---- storages ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage, message", [
    ("mysql://root@localhost/optuna", "unknown storage"),
    ("redis://localhost", "unknown storage"),
    ("sqlite://relative.db", "sqlite:///relative/path.db"),
    ("journal:", "the journal file path is missing"),
    ("postgresql://localhost", "names the host and the database"),
    ("sqlite:////nonexistent/folder/study.db", "folder of the sqlite file does not exist"),
    ("journal:/nonexistent/folder/journal.log", "folder of the journal file does not exist"),
    ("postgresql://nobody:secret@127.0.0.1:1/optuna", "cannot open the study storage"),
])
def test_bad_storage_is_a_user_error(tmp_path, capsys, storage, message):
    code = main(["tune", "--profile", "smoke", "--ratio", "0.2", "--out", str(tmp_path / "runs"), "--storage", storage])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err
    assert "secret" not in err  # passwords never printed
    if storage.startswith("postgresql"):
        assert not (tmp_path / "runs" / "tune").exists()


def test_storage_defaults_and_password_masking(tmp_path):
    assert StorageSpec.parse(None, tmp_path).target == f"sqlite:///{tmp_path}/study.db"
    assert StorageSpec.parse(None, tmp_path, workers=2) == StorageSpec("journal", str(tmp_path / "journal.log"))
    assert StorageSpec.parse("journal:///tmp/j.log", tmp_path).target == "/tmp/j.log"
    spec = StorageSpec.parse("postgres://ann:pw@db.example:5433/optuna", None)
    assert spec.target == "postgresql+psycopg2://ann:pw@db.example:5433/optuna"
    assert spec.display() == "postgresql://ann:***@db.example:5433/optuna"


# ---- the worker ---------------------------------------------------------------------------------------------------
def test_pruning_and_a_crashed_trial_do_not_stop_the_study(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRIAL_CRASH", "2")
    settings = fake_settings(tmp_path, pruner="median", pruner_startup_trials=1)
    study = create_study(settings)
    for lr in (0.01, 0.001, 0.02, 0.01):  # good, bad (pruned at its first validation), crash, good
        study.enqueue_trial({"optim.lr": lr})
    assert run_worker(settings) == 4
    trials = load(settings).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].value == trials[3].value == pytest.approx(1.0)
    assert list(trials[1].intermediate_values) == [1]  # pruned as soon as it fell below the median
    assert "fake out-of-memory" in trials[2].user_attrs["error"] and trials[2].user_attrs["exit_code"] == 1
    assert all(t.user_attrs["seed"] == 0 and "sampler_seed" in t.user_attrs for t in trials)
    summary = write_report(settings)
    assert (summary["trials"], summary["complete"], summary["pruned"], summary["fail"]) == (4, 2, 1, 1)
    assert summary["best"]["number"] == 0 and summary["best"]["params"] == {"optim.lr": 0.01}


POSTGRES = pytest.param("postgresql", marks=pytest.mark.slow)  # the server's start-up and spawned workers: > 10 s


@pytest.mark.parametrize("kind", ["journal", POSTGRES])
def test_two_workers_use_up_the_budget_exactly_once(tmp_path, request, kind):
    settings = fake_settings(tmp_path, storage_for(kind, request), workers=2, n_trials=6, sampler_startup_trials=2)
    summary = tune(settings)
    trials = load(settings).trials
    assert summary["trials"] == summary["complete"] == 6
    assert sorted(t.number for t in trials) == list(range(6))
    assert len({t.params["optim.lr"] for t in trials}) == 6  # constant liar + one sampler seed per worker
    assert sorted(p.parent.name for p in (settings.study_dir / "trials").glob("*/trial.json")) == [f"{n:04d}" for n in range(6)]
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} <= {"0", "1"}
    assert json.loads((settings.study_dir / "summary.json").read_text())["trials"] == 6
    assert (settings.study_dir / "history.png").stat().st_size > 0 and (settings.study_dir / "importance.png").is_file()


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").is_file() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("kind", ["sqlite", "journal", POSTGRES])
def test_a_killed_workers_trial_is_failed_and_retried(tmp_path, request, monkeypatch, kind):
    monkeypatch.setenv("FAKE_TRIAL_HANG", "0")  # trial 0 never finishes: its worker is killed while it runs
    settings = fake_settings(tmp_path, storage_for(kind, request), n_trials=2, grace_period=2)
    create_study(settings)
    doomed = multiprocessing.get_context("spawn").Process(target=_worker_process, args=(settings, 0))
    doomed.start()
    pid_file = settings.study_dir / "trials" / "0000" / "pid"
    _wait_for(pid_file.is_file, "trial 0 to start")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join()
    _wait_for(lambda: not _alive(int(pid_file.read_text())), "the orphaned trial to die with its worker")
    assert load(settings).trials[0].state == TrialState.RUNNING  # what a killed worker leaves behind

    assert run_worker(settings, 1) == 2  # trial 1, then the retry of the stale trial 0
    trials = load(settings).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == trials[0].params
    assert retry.user_attrs["seed"] == trials[0].user_attrs["seed"]


# ---- end to end on the smoke profile ------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_study_on_the_smoke_profile_with_sqlite(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["tune", "--method", "mean_teacher", "--profile", "smoke", "--ratio", "0.2", "--out", str(out),
                 "--no-progress", "--trials", "2", "--seed", "3"]) == 0
    study_dir = out / "tune" / "mean_teacher-synthetic_acdc-L4-smoke"
    printed = capsys.readouterr().out
    assert "best: trial" in printed and f"FROM_STUDY={study_dir}" in printed
    summary = json.loads((study_dir / "summary.json").read_text())
    assert (summary["trials"], summary["complete"], summary["storage"]) == (2, 2, f"sqlite:///{study_dir}/study.db")
    assert (study_dir / "summary.md").read_text().startswith("# Study `mean_teacher-synthetic_acdc-L4-smoke`")
    for row in summary["trial_table"]:
        trial_dir = study_dir / "trials" / f"{row['number']:04d}"
        assert row["seed"] == 3 and row["last_step"] == 4
        assert [json.loads(line)["step"] for line in (trial_dir / "progress.jsonl").read_text().splitlines()] == [2, 4]
        result = json.loads(next(trial_dir.rglob("result.json")).read_text())
        assert result["rows"] == [] and result["validation"]["best_dice"] == pytest.approx(row["value"])
        assert not list(trial_dir.rglob("test_per_case_*.csv")) and not list(trial_dir.glob("*.csv"))  # no test, no row
        assert not list(trial_dir.rglob("*.ckpt"))  # deleted after the trial
    # The best trial's values go into a run.
    assert main(["run", "--method", "mean_teacher", "--profile", "smoke", "--ratio", "0.2", "--from-study", str(study_dir),
                 "--set", "optim.momentum=0.8", "--show-config"]) == 0
    shown = capsys.readouterr().out
    best = summary["best"]["params"]
    assert f"hyperparameters of trial {summary['best']['number']}" in shown and "momentum: 0.8" in shown
    assert f"ema_decay: {best['method.ema_decay']}" in shown
    assert main(["run", "--method", "cps", "--profile", "smoke", "--from-study", str(study_dir), "--show-config"]) == 2
    assert "tuned method 'mean_teacher', not 'cps'" in capsys.readouterr().err
    (study_dir / "summary.json").unlink()
    assert main(["tune", "--method", "mean_teacher", "--profile", "smoke", "--ratio", "0.2", "--out", str(out), "--report-only"]) == 0
    assert json.loads((study_dir / "summary.json").read_text())["trials"] == 2


@pytest.mark.parametrize("reference, message", [
    ("{tmp}", "neither a study folder"),
    ("mysql://root@localhost/optuna#x", "unknown storage"),
    ("sqlite:///{tmp}/empty.db#nothing", "no study 'nothing'"),
])
def test_bad_from_study_is_a_user_error(tmp_path, capsys, reference, message):
    assert main(["run", "--profile", "smoke", "--from-study", reference.format(tmp=tmp_path), "--show-config"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_postgres_serves_two_workers_of_a_real_study(tmp_path, postgres_url, capsys):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    assert main(["tune", "--method", "supervised", "--profile", "smoke", "--ratio", "0.2", "--out", str(tmp_path),
                 "--no-progress", "--trials", "2", "--workers", "2", "--storage", postgres_url, "--study-name", name]) == 0
    study = optuna.load_study(study_name=name, storage=StorageSpec.parse(postgres_url, None).open())
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert json.loads((tmp_path / "tune" / name / "study.json").read_text())["storage"] == postgres_url
    overrides, origin = best_trial_overrides(f"{postgres_url}#{name}", "supervised")
    assert origin.startswith(f"hyperparameters of trial {study.best_trial.number} of study '{name}'")
    assert sorted(o.split("=")[0] for o in overrides) == ["optim.lr", "optim.weight_decay"]
    optuna.create_study(study_name=f"{name}-other", storage=StorageSpec.parse(postgres_url, None).open())
    with pytest.raises(UserError, match="say which"):
        best_trial_overrides(postgres_url, "supervised")


def test_hyperband_resources_follow_the_validation_schedule(tmp_path):
    from benchmark.tune import make_pruner

    settings = fake_settings(tmp_path, pruner="hyperband")
    settings.config["trainer"].update(max_steps=2500, val_every=250)
    pruner = make_pruner(settings)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource) == (250, 2500)


def test_trials_do_not_inherit_the_launcher_environment_of_a_torchrun_or_srun_parent(monkeypatch):
    # A trial is its own run: inheriting TORCHELASTIC_RUN_ID or SLURM_PROCID would make Lightning take the
    # parent's rank for its own.
    from benchmark.tune import _trial_environment

    for name in ("TORCHELASTIC_RUN_ID", "RANK", "SLURM_PROCID", "MASTER_PORT"):
        monkeypatch.setenv(name, "3")
    environment = _trial_environment()
    assert not {"TORCHELASTIC_RUN_ID", "RANK", "SLURM_PROCID", "MASTER_PORT"} & set(environment)
