"""The user's path: where smoke rows go, resuming by folder alone, accelerator and precision, a fast CLI, overrides
with spaces, warm starts across methods."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark import finalize
from benchmark.cli import main
from benchmark.leaderboard import REPOSITORY_LEADERBOARDS, leaderboard_dir_for
from tests.conftest import PROJECT_ROOT, cli_in_fresh_interpreter


def test_smoke_rows_aimed_at_the_repository_leaderboards_go_to_a_scratch_folder(tmp_path):
    assert REPOSITORY_LEADERBOARDS == PROJECT_ROOT / "leaderboards"
    assert leaderboard_dir_for("smoke", PROJECT_ROOT / "leaderboards", tmp_path) == tmp_path / "leaderboards-smoke"
    # Other profiles, and smoke rows sent anywhere else, go where they are sent.
    assert leaderboard_dir_for("cpu", PROJECT_ROOT / "leaderboards", tmp_path) == PROJECT_ROOT / "leaderboards"
    assert leaderboard_dir_for("smoke", tmp_path / "lb", tmp_path) == tmp_path / "lb"


def test_a_smoke_run_never_writes_into_the_repository_leaderboards(tmp_path, monkeypatch):
    # A stand-in for the repository's folder, so that a failure of this test cannot touch the real one.
    tracked = tmp_path / "tracked"
    tracked.mkdir()
    monkeypatch.setattr(finalize, "REPOSITORY_LEADERBOARDS", tracked.resolve())
    assert main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tracked), "--dataset", "synthetic_acdc", "--ratio", "0.2"]) == 0
    assert list(tracked.iterdir()) == []
    table = pd.read_csv(tmp_path / "runs" / "leaderboards-smoke" / "synthetic_acdc.csv")
    assert table["profile"].tolist() == ["smoke", "smoke"]
    assert (tmp_path / "runs" / "leaderboards-smoke" / "per_case" / "synthetic_acdc").is_dir()


def smoke_run(tmp_path: Path, *args: str) -> Path:
    """A smoke run into tmp_path/runs and tmp_path/lb; returns its run folder."""
    assert main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), *args]) == 0
    table = pd.read_csv(next((tmp_path / "lb").glob("*.csv")))
    return Path(table["run_dir"].iloc[-1])


def test_a_run_folder_alone_is_enough_to_resume_and_other_options_are_refused(tmp_path, capsys, monkeypatch):
    run_dir = smoke_run(tmp_path, "--method", "mean_teacher", "--dataset", "synthetic_acdc", "--labeled", "2",
                        "--seed", "1", "--set", "method.ema_decay=0.9")
    board = tmp_path / "lb" / "synthetic_acdc.csv"
    board.unlink()  # as if killed after its test, before its rows were written: the resume writes them
    monkeypatch.chdir(tmp_path)  # nothing of the original command line is at hand
    assert main(["run", "--resume", str(run_dir)]) == 0
    table = pd.read_csv(board)
    assert table["method"].tolist() == ["mean_teacher"] * 2 and (table["seed"] == 1).all()
    assert (table["labeled_cases"] == 2).all() and (table["run_dir"] == str(run_dir)).all()
    capsys.readouterr()
    # An option that changes what the run computes is refused, and nothing is written.
    assert main(["run", "--resume", str(run_dir), "--set", "method.ema_decay=0.99"]) == 2
    assert "method.ema_decay: 0.9 -> 0.99" in capsys.readouterr().err
    assert main(["run", "--resume", str(run_dir), "--method", "supervised"]) == 2
    assert "method_name: 'mean_teacher' -> 'supervised'" in capsys.readouterr().err
    assert len(pd.read_csv(board)) == 2
    # Options that do not change it are taken: the finished folder is recognised as this run's.
    assert main(["run", "--resume", str(run_dir), "--seed", "1", "--no-progress"]) == 0
    assert "is finished" in capsys.readouterr().out


def test_make_bench_with_resume_passes_only_the_variables_given(tmp_path):
    import subprocess

    def dry_run(*variables: str) -> str:
        result = subprocess.run(["make", "-n", "bench", "STAMP=", "PY=python", *variables], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    alone = dry_run("RESUME=runs/x")
    assert alone.split() == ["python", "-m", "benchmark", "run", "--resume", '"runs/x"']
    assert dry_run("RESUME=runs/x", "SEED=3").split()[4:] == ["--seed", "3", "--resume", '"runs/x"']
    assert "--method supervised" in dry_run()  # without RESUME every variable is passed, defaults included
    assert "--accelerator gpu --precision bf16-mixed" in dry_run("ACCELERATOR=gpu", "PRECISION=bf16-mixed")
    assert "--accelerator" not in dry_run() and "--precision" not in dry_run()


@pytest.mark.parametrize("options, message", [
    (["--accelerator", "gpu"], "ACCELERATOR=gpu asks for a GPU, but this machine has none"),
    (["--precision", "16-mixed"], "precision 16-mixed (fp16 mixed) does not run on CPU"),
    (["--precision", "half"], "trainer.precision must be one of 32-true"),
    (["--accelerator", "tpu"], "trainer.accelerator must be one of auto"),
])
def test_hardware_this_machine_lacks_is_one_message_before_any_run_folder(tmp_path, capsys, monkeypatch, options, message):
    from benchmark import hardware

    monkeypatch.setattr(hardware, "gpu_count", lambda: 0)  # the same answer on a machine that has a GPU
    assert main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"),
                 "--leaderboard-dir", str(tmp_path / "lb"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lb").exists()


def test_accelerator_and_precision_reach_the_trainer_config():
    from benchmark.cli import build_parser
    from benchmark.run_command import config_from_args

    args = build_parser().parse_args(["run", "--profile", "smoke", "--accelerator", "cpu", "--precision", "bf16-mixed"])
    trainer = config_from_args(args)["trainer"]
    assert (trainer["accelerator"], trainer["precision"]) == ("cpu", "bf16-mixed")


def test_help_and_list_import_neither_torch_nor_the_registries_and_name_what_the_registries_hold():
    from benchmark.catalogue import build, catalogue
    from datamodules import dataset_names
    from methods.registry import method_names

    assert catalogue() == build()  # stored in this session's cache folder, read back equal
    assert catalogue()["methods"] == method_names() and sorted(catalogue()["datasets"]) == dataset_names()
    heavy, printed = cli_in_fresh_interpreter(["list", "methods"], ["list", "datasets"], ["--help"])
    assert heavy == [], heavy
    assert "mean_teacher" in printed and "synthetic_acdc" in printed and "verify" in printed


def test_show_config_names_the_labeled_count_and_the_hash_the_run_gets(tmp_path, capsys):
    options = ["--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"), "--leaderboard-dir", str(tmp_path / "lb"),
               "--dataset", "synthetic_acdc", "--ratio", "0.2", "--set", "optim.lr=0.02"]
    assert main(["run", "--show-config", *options]) == 0
    shown = capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # nothing written
    run_dir = smoke_run(tmp_path, *options[9:])
    row = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv").iloc[0]
    assert f"# labeled: {row['labeled_cases']} patients" in shown and "labeled: 4\n" in shown
    assert f"# config hash: {row['config_hash']}" in shown and row["config_hash"] in run_dir.name


def test_an_override_with_spaces_survives_make_word_splitting():
    import shlex
    import subprocess

    from benchmark.cli import build_parser
    from benchmark.run_command import config_from_args

    result = subprocess.run(["make", "-n", "bench", "STAMP=", "PY=python", "PROFILE=smoke",
                             "OVERRIDES=method.network_inits=[default, xavier] optim.lr=0.02"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    argv = shlex.split(result.stdout.strip().splitlines()[-1])[3:]
    assert argv.count("--set") == 3  # split by Make into three pieces
    config = config_from_args(build_parser().parse_args([*argv, "--method", "cps"]))
    assert config["method"]["network_inits"] == ["default", "xavier"] and config["optim"]["lr"] == 0.02


def test_what_the_message_on_a_broken_override_suggests_works(capsys):
    from benchmark.cli import build_parser
    from benchmark.run_command import config_from_args

    assert main(["run", "--show-config", "--method", "cps", "--set", "method.network_inits=[default,"]) == 2
    err = capsys.readouterr().err
    suggested = err.split("method.network_inits=")[-1].split()[0]
    assert suggested == "[default,default]"
    config = config_from_args(build_parser().parse_args(["run", "--method", "cps", "--set", f"method.network_inits={suggested}"]))
    assert config["method"]["network_inits"] == ["default", "default"]


def smoke_model(method: str, checkpoint: Path | None = None):
    from benchmark.config import resolve_config
    from datamodules import get_dataset
    from methods.registry import get_method

    cls, entry = get_method(method), get_dataset("synthetic_acdc")
    overrides = ["data.patch_size=[32,32]", *([f"run.init_from={checkpoint}"] if checkpoint else [])]
    return cls(entry.spec, resolve_config("synthetic_acdc", method, "smoke", overrides, cls.defaults, family="acdc"))


@pytest.fixture(scope="module")
def supervised_checkpoint(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("supervised")
    run_dir = smoke_run(tmp_path, "--dataset", "synthetic_acdc", "--ratio", "0.2")
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("method, networks", [("mean_teacher", ("net", "teacher.module")), ("cps", ("net1", "net2"))])
def test_a_supervised_checkpoint_warm_starts_every_network_of_another_method(supervised_checkpoint, method, networks, capsys):
    import torch

    from benchmark.run import init_stage

    trained = torch.load(supervised_checkpoint, weights_only=True)["state_dict"]
    model = smoke_model(method, supervised_checkpoint)
    assert init_stage(model, supervised_checkpoint) is None
    state = model.state_dict()
    for network in networks:
        for key, tensor in trained.items():
            assert torch.equal(state[f"{network}.{key[len('net.'):]}"], tensor), (network, key)
    out = capsys.readouterr().out
    for network in networks:
        assert f"{network} <- net: {len(trained)} of {len(trained)} tensors" in out


def test_a_plain_weights_file_of_the_backbone_warm_starts_and_what_does_not_fit_is_named(supervised_checkpoint, tmp_path, capsys):
    import torch

    from benchmark.run import init_stage

    backbone = {key[len("net."):]: tensor for key, tensor in torch.load(supervised_checkpoint, weights_only=True)["state_dict"].items()}
    head = next(key for key in backbone if key.endswith("out_conv.weight"))
    backbone[head] = torch.zeros(1, *backbone[head].shape[1:])  # another number of classes
    weights = tmp_path / "unet.pt"
    torch.save(backbone, weights)
    model = smoke_model("cps", weights)
    init_stage(model, weights)
    assert torch.equal(model.state_dict()[f"net2.{next(iter(backbone))}"], backbone[next(iter(backbone))])
    out = capsys.readouterr().out
    assert f"net1 <- the weights file: {len(backbone) - 1} of {len(backbone)} tensors; not loaded: 1 (e.g. {head})" in out


def test_mean_teacher_runs_from_a_supervised_checkpoint(supervised_checkpoint, tmp_path, capsys):
    run_dir = smoke_run(tmp_path, "--method", "mean_teacher", "--dataset", "synthetic_acdc", "--ratio", "0.2",
                        "--set", f"run.init_from={supervised_checkpoint}")
    assert (run_dir / "result.json").is_file()
    assert "teacher.module <- net" in capsys.readouterr().out


def test_a_checkpoint_without_any_network_weights_is_refused(tmp_path):
    import torch

    from benchmark.run import init_stage
    from core.errors import UserError

    weights = tmp_path / "other.pt"
    torch.save({"something.weight": torch.zeros(3)}, weights)
    with pytest.raises(UserError, match="holds no weights of this method's networks"):
        init_stage(smoke_model("cps", weights), weights)


def test_every_finished_run_leaves_its_curves_and_a_summary(tmp_path):
    import yaml

    from benchmark.run_report import training_log

    run_dir = smoke_run(tmp_path, "--method", "mean_teacher", "--dataset", "synthetic_acdc", "--ratio", "0.2",
                        "--set", "optim.lr=0.02", "--set", "trainer.max_steps=6", "--set", "trainer.val_every=3")
    assert (run_dir / "report.png").stat().st_size > 10_000
    summary = (run_dir / "summary.md").read_text()
    row = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv").iloc[0]
    # What the command changed, and nothing the run resolved itself (labeled count, patch size).
    assert "| `optim.lr` | `0.01` | `0.02` |" in summary and "| `trainer.max_steps` | `4` | `6` |" in summary
    assert "| `trainer.val_every` | `2` | `3` |" in summary
    assert "data.labeled" not in summary and "run.out" not in summary and "patch_size" not in summary
    assert f"| last | {row['step']} | {row['dice'] * 100:.2f} | {row['jaccard'] * 100:.2f} |" in summary
    assert f"wall time: {row['wall_time_s']:.0f} s" in summary and f"{row['peak_rss_mb']:.0f} MB resident" in summary
    # The plotted learning rate is the poly schedule: 0.02 (1 - step / 6) ** 0.9.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    log = training_log(config, [("train", run_dir)]).drop_duplicates("step").set_index("step")
    assert log.loc[0, "lr"] == pytest.approx(0.02) and log.loc[3, "lr"] == pytest.approx(0.02 * 0.5 ** 0.9)
    assert {"train/loss", "val/dice", "val/dice_RV"} <= set(log.columns)


def test_dice_error_bars_stay_within_0_and_100_percent():
    from benchmark.report import clipped_error_bars

    bars = clipped_error_bars(pd.Series([5.0, 95.0, 50.0]), pd.Series([10.0, 10.0, None]))
    assert bars.tolist() == [[5.0, 10.0, 0.0], [10.0, 5.0, 0.0]]


def test_seeds_of_methods_with_equal_dice_are_drawn_side_by_side(tmp_path):
    from benchmark.report import plot_dice, seed_offsets

    offsets = seed_offsets(["supervised", "cps", "mean_teacher"])
    assert len(set(offsets.values())) == 3 and all(0.9 < value < 1.1 for value in offsets.values())
    summary = pd.DataFrame({"method": ["supervised", "cps"], "checkpoint": "last", "labeled_cases": 3,
                            "dice_mean": [0.0, 0.0], "dice_std": [0.0, 0.0]})
    seeds = pd.DataFrame({"method": ["supervised", "cps"] * 2, "checkpoint": "last", "labeled_cases": 3, "dice": 0.0})
    assert plot_dice(summary, tmp_path / "dice.png", "test", seeds=seeds).stat().st_size > 0


def test_the_leaderboard_config_column_names_what_differs_from_the_profile(tmp_path):
    import yaml

    from benchmark.config import resolve_config
    from benchmark.report import config_cell, config_descriptions

    config = resolve_config("synthetic_acdc", "supervised", "smoke", ["optim.lr=0.02"], {"network_init": "default"}, family="acdc")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "config_hash": "abc"}))
    table = pd.DataFrame([{"dataset": "synthetic_acdc", "config_hash": "abc", "seed": 0, "checkpoint": "last",
                           "status": "ok", "dice": 0.5, "jaccard": 0.3, "hd95": 1.0, "asd": 1.0, "labeled_cases": 4,
                           "run_dir": str(run_dir)}])
    configs = config_descriptions(table)
    assert config_cell("abc", configs) == "optim.lr=0.02 (`abc`)"
    assert config_cell("def", configs) == "`def`"  # no run folder at hand: the hash alone

    # A run written before a hash-neutral key existed lacks it: it ran that key's neutral value, not a change.
    from methods.registry import get_method

    older = resolve_config("synthetic_acdc", "mean_teacher", "smoke", [], get_method("mean_teacher").defaults, family="acdc")
    del older["method"]["joint_student_pass"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**older, "config_hash": "abc"}))
    assert config_cell("abc", config_descriptions(table)) == "profile defaults (`abc`)"
    older["method"]["joint_student_pass"] = False
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**older, "config_hash": "abc"}))
    assert config_cell("abc", config_descriptions(table)) == "method.joint_student_pass=False (`abc`)"


def test_the_importance_plot_warns_when_every_trial_scored_zero(tmp_path):
    import optuna

    from benchmark.tune_results import ALL_ZERO_WARNING, _write_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: 0.0 * trial.suggest_float("lr", 0.001, 0.1) * trial.suggest_float("decay", 0.9, 1.0), n_trials=4)
    assert ALL_ZERO_WARNING in _write_plots(study, tmp_path)["importance"]
    scored = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    scored.optimize(lambda trial: trial.suggest_float("lr", 0.001, 0.1) + trial.suggest_float("decay", 0.9, 1.0), n_trials=4)
    assert _write_plots(scored, tmp_path)["importance"] == "importance.png"
