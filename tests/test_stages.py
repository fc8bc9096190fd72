"""The run machinery's stages, independent of any one method: planning, per-stage config, the hash of
single-stage configs, and the flat layout single-stage methods keep."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.config import apply_overrides, config_hash, resolve_config, stage_config
from benchmark.run import plan_stages
from core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ThreeStages:
    stages = ("a", "b", "c")


def config_with(**run):
    config = resolve_config("synthetic_acdc", "supervised", "smoke", family="acdc")
    config["method_name"] = "three"
    config["run"].update(run)
    return config


def test_plan_is_every_stage_by_default_or_the_asked_ones_in_order(tmp_path):
    assert plan_stages(ThreeStages, config_with()) == ["a", "b", "c"]
    assert plan_stages(ThreeStages, config_with(stages="a")) == ["a"]
    assert plan_stages(ThreeStages, config_with(stages=["a", "c"])) == ["a", "c"]
    checkpoint = tmp_path / "b.ckpt"
    checkpoint.write_bytes(b"")
    assert plan_stages(ThreeStages, config_with(stages=["b", "c"], init_from=str(checkpoint))) == ["b", "c"]


@pytest.mark.parametrize("run, message", [
    ({"stages": "z"}, "has no stage 'z'"),
    ({"stages": ["c", "b"]}, "in their order"),
    ({"stages": ["a", "a"]}, "in their order"),
    ({"stages": []}, "in their order"),
    ({"stages": "c"}, "continues from stage 'b'"),
    ({"stages": "c", "init_from": "/no/such.ckpt"}, "checkpoint not found"),
])
def test_plan_rejects_bad_stage_settings(run, message):
    with pytest.raises(UserError, match=message):
        plan_stages(ThreeStages, config_with(**run))


def test_per_stage_values_apply_to_their_stage_only():
    config = apply_overrides(config_with(), ["per_stage.b.trainer.max_steps=7", "per_stage.b.optim.nesterov=true"])
    assert config["per_stage"] == {"b": {"trainer": {"max_steps": 7}, "optim": {"nesterov": True}}}
    staged_a, staged_b = stage_config(config, "a"), stage_config(config, "b")
    assert staged_a["trainer"]["max_steps"] == config["trainer"]["max_steps"] == 4 and not staged_a["optim"]["nesterov"]
    assert staged_b["trainer"]["max_steps"] == 7 and staged_b["optim"]["nesterov"]
    assert (staged_a["run"]["stage"], staged_b["run"]["stage"]) == ("a", "b")
    with pytest.raises(UserError, match="wrong type"):
        apply_overrides(config, ["per_stage.b.trainer.max_steps=many"])
    with pytest.raises(UserError, match="per_stage.<stage>.<section>.<key>"):
        apply_overrides(config, ["per_stage.b.trainer=3"])


def test_new_keys_at_their_neutral_value_leave_the_hash_unchanged():
    config = resolve_config("synthetic_acdc", "supervised", "cpu", family="acdc")
    before = config_hash(config)
    legacy = {**config, "optim": {k: v for k, v in config["optim"].items() if k != "nesterov"},
              "run": {k: v for k, v in config["run"].items() if k not in ("stages", "init_from")}}
    assert config_hash(legacy) == before
    assert config_hash(apply_overrides(config, ["optim.nesterov=true"])) != before
    assert config_hash(apply_overrides(config, ["run.stages=train"])) != before


def test_single_stage_method_keeps_the_flat_layout_and_takes_a_per_stage_budget(tmp_path):
    assert main(["run", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "runs"), "--leaderboard-dir",
                 str(tmp_path / "lb"), "--ratio", "0.2", "--set", "per_stage.train.trainer.max_steps=3"]) == 0
    table = pd.read_csv(tmp_path / "lb" / "synthetic_acdc.csv")
    assert "stages" not in table.columns and table["steps"][0] == 3
    run_dir = Path(table["run_dir"][0])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "train").exists()
