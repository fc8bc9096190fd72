"""Typed hyperparameters (methods/hyperparameters.py): defaults from the fields, the type check, subclassing."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from benchmark.config import resolve_config
from core.errors import UserError
from datamodules import get_dataset
from methods.hyperparameters import Hyperparameters
from methods.registry import get_method, method_names
from tests.method_helpers import build_method


@dataclass(frozen=True)
class Parent(Hyperparameters):
    rate: float = 0.5
    steps: int = 10
    fraction: float | None = None
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=lambda: [4, 2])


@dataclass(frozen=True)
class Child(Parent):
    steps: int = 0  # a new default; the field keeps its place
    extra: str = "x"


def test_defaults_follow_the_fields_in_order_with_fresh_lists():
    assert list(Parent.defaults().items()) == [
        ("rate", 0.5), ("steps", 10), ("fraction", None), ("flag", False), ("mode", "a"), ("sizes", [4, 2])]
    assert list(Child.defaults()) == ["rate", "steps", "fraction", "flag", "mode", "sizes", "extra"]
    assert Child.defaults()["steps"] == 0
    first = Parent.defaults()
    first["sizes"].append(1)
    assert Parent.defaults()["sizes"] == [4, 2]


def test_values_are_kept_as_given_and_read_by_name_or_key():
    hp = Parent.from_values({**Parent.defaults(), "rate": 1, "fraction": 0.25}, "demo")
    assert hp.rate == 1 and type(hp.rate) is int  # a whole number is a number; not converted (same arithmetic)
    assert hp["fraction"] == 0.25 and "fraction" in hp and "missing" not in hp
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.rate = 2.0


@pytest.mark.parametrize("key, value, expected", [
    ("rate", "high", "expected a number"),
    ("rate", True, "expected a number"),
    ("steps", 2.5, "expected a whole number"),
    ("steps", None, "expected a whole number"),
    ("fraction", "all", "expected a number or null"),
    ("flag", 1, "expected true or false"),
    ("sizes", [4, "2"], "expected a list of a whole number"),
])
def test_a_value_of_the_wrong_type_is_a_user_error_naming_the_key(key, value, expected):
    with pytest.raises(UserError, match=rf"method\.{key}=.* for demo: {expected}") as error:
        Parent.from_values({**Parent.defaults(), key: value}, "demo")
    assert f"method.{key}=" in error.value.fix  # the fix shows the default


def test_a_choice_outside_the_literal_names_the_known_ones():
    with pytest.raises(UserError, match="unknown method.mode 'c' for demo") as error:
        Parent.from_values({**Parent.defaults(), "mode": "c"}, "demo")
    assert error.value.where == "known: a, b"


def test_typed_methods_get_their_defaults_from_the_dataclass_and_hp_is_an_instance():
    typed = [name for name in method_names() if get_method(name).hyperparameters is not None]
    assert {"mean_teacher", "ua_mt"} <= set(typed)
    for name in typed:
        cls = get_method(name)
        assert cls.defaults == cls.hyperparameters.defaults()
    model = build_method("ua_mt", overrides=["method.threshold_start=0.5"], patch=(32, 32))
    assert isinstance(model.hp, get_method("ua_mt").hyperparameters)
    assert model.hp.threshold_start == 0.5 and model.hp.consistency_start_step == 0 and model.hp.ema_decay == 0.99


def test_a_subclass_with_a_defaults_dict_of_its_own_is_untyped_and_one_with_a_dataclass_typed():
    mean_teacher = get_method("mean_teacher")

    class WithDict(mean_teacher):
        defaults = {**mean_teacher.defaults, "extra": 1}

    class WithDataclass(WithDict):
        hyperparameters = Child

    assert WithDict.hyperparameters is None and WithDict.defaults["extra"] == 1
    assert WithDataclass.defaults == Child.defaults()
    assert mean_teacher.hyperparameters is not None  # the parent keeps its own


def test_a_bad_value_in_a_config_file_stops_a_typed_method_before_it_builds():
    # --set overrides are checked against the current value's type already; a config file's value (a run
    # folder's config.yaml, a preset, a hand-built config) is checked here. None is the type-free case.
    entry = get_dataset("synthetic_acdc")
    config = resolve_config("synthetic_acdc", "mean_teacher", "smoke", [], get_method("mean_teacher").defaults,
                            family=entry.family)
    config["method"]["consistency_rampup_fraction"] = "all"
    with pytest.raises(UserError, match="method.consistency_rampup_fraction='all' for mean_teacher: expected a number or null"):
        get_method("mean_teacher")(entry.spec, config)
