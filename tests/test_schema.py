"""The config schema (benchmark/schema.py): every key has a rule, every preset passes it, bad values are refused."""
from __future__ import annotations

import pytest

from benchmark.config import resolve_config
from benchmark.schema import RULES, rule_for, validate_config
from core.errors import UserError
from datamodules import dataset_names, get_dataset
from methods.registry import get_method, method_names


def _presets():
    for dataset in dataset_names():
        for method in method_names():
            for profile in ("paper", "cpu", "smoke"):
                yield resolve_config(dataset, method, profile, [], get_method(method).defaults, family=get_dataset(dataset).family)


def test_every_preset_passes_and_every_non_method_key_has_a_rule():
    keys = set()
    for config in _presets():  # resolve_config validates each
        keys |= {f"{section}.{key}" for section, values in config.items() if isinstance(values, dict) and section not in ("method", "per_stage")
                 for key in values}
    assert keys - set(RULES) == set()


@pytest.mark.parametrize("override", ["trainer.precision=auto", "trainer.precision=32", "trainer.precision=bf16-mixed",
                                      "trainer.deterministic=true", "optim.lr=1", "data.num_workers=0"])
def test_accepted_values(override):
    resolve_config("synthetic_acdc", "supervised", "smoke", [override], family="acdc")


@pytest.mark.parametrize("key, value", [("method.ema_decay", 1.0), ("method.ema_decay", -0.1), ("method.consistency", -1.0),
                                        ("method.student_temperature", 0.0), ("method.consistency_rampup_fraction", 0.0),
                                        ("method.gridmask_probability", 1.5), ("method.supervised_weight", -0.5),
                                        ("trainer.precision", "16"), ("data.patch_size", [64, 0]), ("run.seed", -1),
                                        ("trainer.max_steps", float("nan"))])
def test_refused_values(key, value):
    config = resolve_config("synthetic_acdc", "supervised", "smoke", [], family="acdc")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=name):
        validate_config(config)


def test_method_rules_leave_unranged_keys_alone():
    assert rule_for("method.predict_with") is None and rule_for("method.diagonal_logit") is None
