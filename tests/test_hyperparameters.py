"""Typed hyperparameters (methods/hyperparameters.py): defaults from the fields, the type check, subclassing."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from benchmark.config import PROFILES, _load_method_yaml, resolve_config, stage_config
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


def test_every_method_gets_its_defaults_from_its_dataclass_and_hp_is_an_instance():
    assert "action" in method_names()
    for name in method_names():
        cls = get_method(name)
        assert cls.hyperparameters is not Hyperparameters, name  # a dataclass of its own, not the empty base
        assert cls.defaults == cls.hyperparameters.defaults()
    model = build_method("ua_mt", overrides=["method.threshold_start=0.5"], patch=(32, 32))
    assert isinstance(model.hp, get_method("ua_mt").hyperparameters)
    assert model.hp.threshold_start == 0.5 and model.hp.consistency_start_step == 0 and model.hp.ema_decay == 0.99


def test_a_subclass_with_a_dataclass_takes_its_defaults_and_one_with_a_defaults_dict_is_refused():
    mean_teacher = get_method("mean_teacher")

    class WithDataclass(mean_teacher):
        hyperparameters = Child

    assert WithDataclass.defaults == Child.defaults()
    assert mean_teacher.defaults == mean_teacher.hyperparameters.defaults()  # the parent keeps its own
    with pytest.raises(TypeError, match="WithDict writes a defaults dict: declare a Hyperparameters dataclass"):
        class WithDict(mean_teacher):
            defaults = {**mean_teacher.defaults, "extra": 1}


def test_a_bad_value_in_a_config_file_stops_a_typed_method_before_it_builds():
    # --set overrides are checked against the current value's type already; a config file's value (a run
    # folder's config.yaml, a preset, a hand-built config) is checked here. None is the type-free case.
    entry = get_dataset("synthetic_acdc")
    config = resolve_config("synthetic_acdc", "mean_teacher", "smoke", [], get_method("mean_teacher").defaults,
                            family=entry.family)
    config["method"]["consistency_rampup_fraction"] = "all"
    with pytest.raises(UserError, match="method.consistency_rampup_fraction='all' for mean_teacher: expected a number or null"):
        get_method("mean_teacher")(entry.spec, config)


@pytest.mark.parametrize("name", method_names())
def test_every_preset_of_every_method_passes_the_type_check(name):
    # Every profile on every family the method's file has presets for, plus ACDC and LA (the cpu recipe's 2-D and
    # 3-D entries), in every stage (ACTION's per_stage presets): the resolved values are the ones a run builds its
    # dataclass from, kept as given.
    cls = get_method(name)
    for dataset in sorted(set(_load_method_yaml(name).get("datasets", {})) | {"acdc", "la"}):
        for profile in PROFILES:
            config = resolve_config(dataset, name, profile, [], cls.defaults, family=get_dataset(dataset).family)
            for stage in cls.stages:
                values = stage_config(config, stage)["method"]
                hp = cls.hyperparameters.from_values({**cls.defaults, **values}, name)
                assert dataclasses.asdict(hp) == values, (dataset, profile, stage)


CONSISTENCY_KEYS = {"consistency", "consistency_rampup", "consistency_rampup_fraction", "temperature",
                    "detach_sharpened_targets"}


def test_fba_net_has_exactly_its_own_keys_and_fba_net_plus_adds_mc_net_plus_consistency():
    mc_net_plus, fba_net, fba_net_plus = (get_method(name).hyperparameters
                                          for name in ("mc_net_plus", "fba_net", "fba_net_plus"))
    mc_keys, single_keys, plus_keys = (list(cls.defaults()) for cls in (mc_net_plus, fba_net, fba_net_plus))
    assert CONSISTENCY_KEYS <= set(mc_keys) and not CONSISTENCY_KEYS & set(single_keys)
    contrast_keys = [key for key in single_keys if key not in mc_keys]
    assert contrast_keys and plus_keys == mc_keys + contrast_keys  # MC-Net+'s order, then the contrastive keys
    assert single_keys == [key for key in plus_keys if key not in CONSISTENCY_KEYS]
    # The keys they share mean the same: same type and default, but for FBA's own lambda and consistency schedule.
    fba_own = {"supervised_weight", "consistency", "consistency_rampup"}
    for other, keys in ((mc_net_plus, set(mc_keys) - fba_own), (fba_net, set(single_keys) - fba_own)):
        for key in keys:
            assert fba_net_plus.defaults()[key] == other.defaults()[key], key
            assert fba_net_plus.__dataclass_fields__[key].type == other.__dataclass_fields__[key].type, key


@pytest.mark.parametrize("name, key, value, message", [
    ("mc_net_plus", "supervised_weight", "high",
     r"method\.supervised_weight='high' for mc_net_plus: expected a number or null"),
    ("mc_net_plus", "supervised_loss", "dice", r"unknown method\.supervised_loss 'dice' for mc_net_plus"),
    ("mc_net_plus", "predict_with", "decoder2", r"unknown method\.predict_with 'decoder2' for mc_net_plus"),
    ("mc_net_plus", "detach_sharpened_targets", "yes",
     r"method\.detach_sharpened_targets='yes' .*: expected true or false"),
    ("fba_net_plus", "supervised_weight", None,  # "a number", not "a number or null"
     r"method\.supervised_weight=None for fba_net_plus: expected a number\n"),
    ("fba_net_plus", "contrast", "pixel", r"unknown method\.contrast 'pixel' for fba_net_plus"),
    ("fba_net", "projection_dim", 1.5, r"method\.projection_dim=1\.5 for fba_net: expected a whole number"),
    ("fba_net", "sim_min_alpha", "2.5", r"method\.sim_min_alpha='2\.5' for fba_net: expected a number\n"),
])
def test_a_wrong_value_for_mc_net_plus_and_fba_is_a_user_error_before_the_build(name, key, value, message):
    entry = get_dataset("synthetic_la")
    config = resolve_config("synthetic_la", name, "smoke", [], get_method(name).defaults, family=entry.family)
    config["method"][key] = value
    with pytest.raises(UserError, match=message):
        get_method(name)(entry.spec, config)


def test_fba_supervised_weight_null_is_refused_when_given_on_the_command_line():
    # A null override passes the override's own type check (any key may be set to null there); the dataclass
    # refuses it for FBA, whose loss multiplies the number directly (MC-Net+'s null means upstream's lamda).
    with pytest.raises(UserError, match=r"method\.supervised_weight=None for fba_net: expected a number\n") as error:
        build_method("fba_net", overrides=["method.supervised_weight=null"], patch=(32, 32))
    assert "method.supervised_weight=1.0" in error.value.fix
    mc_net_plus = build_method("mc_net_plus", overrides=["method.supervised_weight=null"], patch=(32, 32))
    assert mc_net_plus.supervised_weight() == 1.0


@pytest.mark.parametrize("key, value, message", [
    ("mix", "mixup", r"unknown method\.mix 'mixup' for action"),
    ("augment_view", "both", r"unknown method\.augment_view 'both' for action"),
    ("queue_size", 36.0, r"method\.queue_size=36\.0 for action: expected a whole number"),
    ("blur_sigma", [0.15, "1.15"], r"method\.blur_sigma=\[0\.15, '1\.15'\] for action: expected a list of a number"),
    ("dice_include_background", "no", r"method\.dice_include_background='no' for action: expected true or false"),
    ("reco_weight", None, r"method\.reco_weight=None for action: expected a number\n"),
])
def test_a_wrong_value_for_action_is_a_user_error_before_the_build(monkeypatch, key, value, message):
    # ACTION's build checked mix and augment_view itself; the dataclass now refuses them (and every other wrong
    # type) in the constructor, before the build: a build that ran would fail this test with its AssertionError.
    method = get_method("action")
    monkeypatch.setattr(method, "build", lambda self: pytest.fail("the build ran with a wrong hyperparameter"))
    entry = get_dataset("synthetic_la")
    config = resolve_config("synthetic_la", "action", "smoke", [], method.defaults, family=entry.family)
    config["method"][key] = value
    with pytest.raises(UserError, match=message) as error:
        method(entry.spec, config)
    known = {"mix": "cutmix, classmix, none", "augment_view": "student, teacher"}
    if key in known:
        assert error.value.where == f"known: {known[key]}"
