"""Resolved run configuration: presets per dataset, method and profile, then command-line overrides.

Layers, later wins: ``configs/base.yaml`` -> ``configs/datasets/<family>.yaml`` -> ``configs/datasets/<name>.yaml``
-> the method's declared defaults (``Method.defaults``, under ``method:``) -> ``configs/methods/<method>.yaml``
-> the method file's ``datasets: {<family>: ...}`` section -> the ``profiles: {<profile>: ...}`` sections of all
of these, in the same order -> overrides
(``section.key=value``). The `paper` profile is the published protocol, so it usually overrides nothing.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
from importlib import resources
from typing import Any, Iterable

import yaml

from benchmark.schema import validate_config
from core.errors import UserError, unknown_name

PROFILES = ("paper", "cpu", "smoke")
PROFILE_HELP = {
    "paper": "the published protocol (iterations, batch, patch, schedule): for GPUs",
    "cpu": "one shared training recipe for every method, sized for a CPU: ranks methods (README, The cpu recipe)",
    "smoke": "seconds: tiny patches, networks and budgets, for tests",
}
# Keys that do not change what is computed: left out of the config hash.
NON_SEMANTIC_KEYS = (
    # The resolved labeled count (data.labeled) is hashed; RATIO is only how it was asked for.
    ("data", "root"), ("data", "num_workers"), ("data", "cache_decoded"), ("data", "ratio"),
    ("trainer", "devices"), ("trainer", "num_nodes"), ("trainer", "accelerator"), ("trainer", "log_every"),
    # What trainer.precision=auto picked on this machine (the request itself is hashed): benchmark/precision.py.
    ("trainer", "precision_chosen"),
    ("eval", "window_batch"),
    ("run", "seed"), ("run", "out"), ("run", "leaderboard_dir"), ("run", "wandb"), ("run", "sweep"), ("run", "progress"),
    ("run", "test"),
)
# Keys added after leaderboard rows existed: at these values they are left out of the hash, so the hashes of
# earlier rows stay valid (a sweep still recognises them as done). A value is neutral only while a config without
# the key computes the same thing: method.network_inits is not (its default became null, upstream's per
# dimensionality, where configs written before the key meant [kaiming, xavier]), so it is always hashed.
HASH_NEUTRAL_VALUES = {("optim", "name"): "sgd", ("optim", "nesterov"): False, ("run", "stages"): None, ("run", "init_from"): None,
                       ("trainer", "on_nonfinite_loss"): "stop", ("optim", "poly_step_lag"): 0,
                       ("method", "network_init"): "default", ("method", "consistency_rampup_fraction"): None,
                       ("optim", "poly_epochs"): None, ("trainer", "channels_last"): False,
                       ("method", "joint_student_pass"): True, ("method", "faithful_batch_statistics_at_test"): False,
                       ("method", "batch_statistics_at_test"): False, ("method", "pseudo_label_weight"): 1.0}


def add_keys_newer_than_the_run(config: dict[str, Any], method_defaults: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config with every hash-neutral key it predates set to its neutral value (what the run
    computed), so that a flag added later can be named when the run is looked at again. Method keys only where
    the method has them."""
    config = copy.deepcopy(config)
    for (section, key), neutral in HASH_NEUTRAL_VALUES.items():
        if section == "method" and key not in method_defaults:
            continue
        if isinstance(config.get(section), dict) and key not in config[section]:
            config[section][key] = neutral
    return config


OVERRIDE_OPTION = "OVERRIDES= (--set SECTION.KEY=VALUE)"
# `per_stage.<stage>.<section>.<key>=value` overrides one stage of a multi-stage method (see base.yaml).
PER_STAGE = "per_stage"


def _load_yaml(*parts: str) -> dict[str, Any]:
    path = resources.files("benchmark").joinpath("configs", *parts)
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _load_method_yaml(method: str) -> dict[str, Any]:
    """A method's presets; ``extends: <method>`` starts from another method's file (UA-MT from Mean Teacher)."""
    presets = _load_yaml("methods", f"{method}.yaml")
    parent = presets.pop("extends", None)
    return merge(_load_method_yaml(parent), presets) if parent else presets


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; lists and scalars in ``update`` replace those in ``base``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_config(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The config one stage trains with: ``per_stage.<stage>`` merged in and ``run.stage`` set."""
    staged = merge(config, config.get(PER_STAGE, {}).get(stage, {}))
    staged["run"]["stage"] = stage
    trainer = staged["trainer"]
    trainer["val_every"] = min(trainer["val_every"], trainer["max_steps"])
    return staged


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form section.key=value", where=OVERRIDE_OPTION, fix="e.g. trainer.max_steps=500")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise UserError(f"override key '{key}' must name a section and a key", where=OVERRIDE_OPTION,
                        fix="e.g. optim.lr=0.005 or method.ema_decay=0.999")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise UserError(f"cannot parse the value of override '{text}' ({error})", where=OVERRIDE_OPTION,
                        fix="write the value as YAML, e.g. data.patch_size=[64,64] or method.network_inits=[default,default]") from error
    return path, value


# Keys that take values of more than one type (Lightning's Trainer(deterministic=True | False | "warn")).
FLEXIBLE_KEYS = {"trainer.deterministic": (bool, str), "trainer.precision": (str, int)}  # precision=32 reads as a number


def _checked_value(key: str, old: Any, new: Any) -> Any:
    """The override's value if its type fits the existing one (int for int, number for float, ...)."""
    if old is None or new is None:
        return new
    if key in FLEXIBLE_KEYS and isinstance(new, FLEXIBLE_KEYS[key]):
        return new
    expected = None
    if isinstance(old, bool):
        expected = "true or false" if not isinstance(new, bool) else None
    elif isinstance(old, int):
        if isinstance(new, float) and new.is_integer():
            new = int(new)
        expected = "a whole number" if isinstance(new, bool) or not isinstance(new, int) else None
    elif isinstance(old, float):
        expected = "a number" if isinstance(new, bool) or not isinstance(new, (int, float)) else None
        new = float(new) if expected is None else new
    elif isinstance(old, str):
        expected = "a string" if not isinstance(new, str) else None
    elif isinstance(old, list):
        expected = "a list like [64, 64]" if not isinstance(new, list) else None
    if expected:
        raise UserError(f"override {key}={new!r} has the wrong type: expected {expected} (current value {old!r})",
                        where=OVERRIDE_OPTION, fix=f"give {expected}, e.g. {key}={old}")
    return new


def _apply_per_stage_override(config: dict, path: list[str], value: Any) -> None:
    """``per_stage.<stage>.<section>.<key>``: the key must exist in the main config (its type is checked
    against the main value); the stage's section is created if needed. Stage names are checked by the run."""
    if len(path) < 4:
        raise UserError(f"override key '{'.'.join(path)}' must read {PER_STAGE}.<stage>.<section>.<key>", where=OVERRIDE_OPTION,
                        fix=f"e.g. {PER_STAGE}.finetune.trainer.max_steps=500")
    main = config
    for part in path[2:]:
        if not isinstance(main, dict) or part not in main:
            raise _unknown_key(path[2:], config)
        main = main[part]
    node = config.setdefault(PER_STAGE, {})
    for part in path[1:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = _checked_value(".".join(path), main, value)


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    config = copy.deepcopy(config)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == PER_STAGE:
            _apply_per_stage_override(config, path, value)
            continue
        node = config
        for i, part in enumerate(path[:-1]):
            if not isinstance(node.get(part), dict):
                raise _unknown_key(path, config)
            node = node[part]
        leaf = path[-1]
        if leaf not in node:
            raise _unknown_key(path, config)
        node[leaf] = _checked_value(".".join(path), node[leaf], value)
    return config


def _unknown_key(path: list[str], config: dict) -> UserError:
    section = config.get(path[0])
    known = sorted(section) if isinstance(section, dict) else sorted(config)
    where = f"keys of '{path[0]}': {', '.join(known)}" if isinstance(section, dict) else f"sections: {', '.join(known)}"
    close = difflib.get_close_matches(path[1] if isinstance(section, dict) and len(path) > 1 else path[0], known, n=1)
    hint = f"did you mean {path[0] + '.' if isinstance(section, dict) else ''}{close[0]}? " if close else ""
    return UserError(f"unknown config key '{'.'.join(path)}'", where=where,
                     fix=f"{hint}`python -m benchmark run --show-config ...` prints every key")


def resolve_config(
    dataset: str,
    method: str,
    profile: str = "cpu",
    overrides: Iterable[str] = (),
    method_defaults: dict[str, Any] | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """The full configuration of one run (plain dicts/lists/scalars, JSON-serialisable)."""
    if profile not in PROFILES:
        raise unknown_name("profile", profile, PROFILES)
    family = family or dataset
    layers = [_load_yaml("datasets", f"{family}.yaml")]
    if dataset != family:
        layers.append(_load_yaml("datasets", f"{dataset}.yaml"))
    layers.append({"method": dict(method_defaults or {})})
    method_file = _load_method_yaml(method)
    layers.append(method_file)
    config = _load_yaml("base.yaml")
    for layer in layers:
        config = merge(config, {k: v for k, v in layer.items() if k not in ("profiles", "datasets")})
    # Method presets per dataset family (e.g. LA iterations of MC-Net+) come before the profiles, and may carry
    # their own `profiles:` (a cpu ramp-up length depends on the dataset's cpu budget).
    method_on_family = method_file.get("datasets", {}).get(family, {})
    config = merge(config, {k: v for k, v in method_on_family.items() if k != "profiles"})
    for layer in [*layers, method_on_family]:
        config = merge(config, layer.get("profiles", {}).get(profile, {}))
    recipe = shared_recipe(profile, dataset, family)
    if recipe is not None:
        paper = resolve_config(dataset, method, "paper", (), method_defaults, family)
        config = apply_recipe(config, recipe, paper, method, profile)
    config["dataset"], config["method_name"], config["profile"] = dataset, method, profile
    config = apply_overrides(config, overrides)
    validate_config(config)
    return config


# Profiles whose training recipe is shared by every method (configs/recipes/<profile>.yaml).
RECIPE_PROFILES = ("cpu",)
RECIPE_SECTIONS = ("data", "model", "optim", "trainer")


def recipe_file(profile: str) -> dict[str, Any]:
    return _load_yaml("recipes", f"{profile}.yaml") if profile in RECIPE_PROFILES else {}


def shared_recipe(profile: str, dataset: str, family: str) -> dict[str, Any] | None:
    """The recipe entry of ``dataset`` (else of its family) for a shared-recipe profile; None for other profiles."""
    recipes = recipe_file(profile).get("recipes", {})
    entry = recipes.get(dataset, recipes.get(family))
    return copy.deepcopy(entry) if entry is not None else None


def _scaled_schedule(method_hp: dict, paper_hp: dict, cpu_steps: int, paper_steps: int, unit: int) -> dict:
    """Upstream's ramp-up and delay lengths as the same proportion of the recipe's budget."""
    scaled = {}
    if "consistency_rampup_fraction" in method_hp:
        fraction = paper_hp.get("consistency_rampup_fraction")
        if fraction is None and "consistency_rampup" in paper_hp:
            fraction = min(1.0, paper_hp["consistency_rampup"] * unit / paper_steps)
        if fraction is not None:
            scaled["consistency_rampup_fraction"] = round(float(fraction), 6)
    elif "consistency_rampup" in method_hp:
        scaled["consistency_rampup"] = round(paper_hp["consistency_rampup"] * cpu_steps / paper_steps, 6)
    if "consistency_start_step" in method_hp:
        scaled["consistency_start_step"] = int(round(paper_hp["consistency_start_step"] * cpu_steps / paper_steps))
    return scaled


def apply_recipe(config: dict, recipe: dict, paper: dict, method: str, profile: str) -> dict:
    """Replace every shared key by the recipe's (in every stage), split the budget over a multi-stage method's
    stages, and scale upstream's schedule lengths (taken from the `paper` config) to the budget."""
    config = copy.deepcopy(config)
    for section in RECIPE_SECTIONS:
        config[section] = merge(config.get(section, {}), recipe.get(section, {}))
    hp = config.get("method", {})
    for key, value in recipe.get("method", {}).items():
        if key in hp:
            hp[key] = copy.deepcopy(value)
    # A stage keeps only its own trainer keys (validation cadence); everything else the recipe sets wins.
    for stage, values in config.get(PER_STAGE, {}).items():
        for section in ("data", "model", "optim"):
            for key in recipe.get(section, {}):
                values.get(section, {}).pop(key, None)
            if section in values and not values[section]:
                del values[section]
    budget = recipe.get("trainer", {}).get("max_steps", config["trainer"]["max_steps"])
    rules = recipe_file(profile)
    split = rules.get("stage_split", {}).get(method)
    if split:
        total = sum(split.values())
        for stage, weight in split.items():
            stage_values = config.setdefault(PER_STAGE, {}).setdefault(stage, {})
            stage_values.setdefault("trainer", {})["max_steps"] = max(1, int(round(budget * weight / total)))
    unit = rules.get("schedule_keys", {}).get("rampup_unit", 150)
    hp.update(_scaled_schedule(hp, paper.get("method", {}), budget, paper["trainer"]["max_steps"], unit))
    return config


def config_hash(config: dict[str, Any]) -> str:
    """Identifies what a run computes (everything but the seed, paths, devices and logging): rows with the
    same hash and different seeds are repeats of one experiment."""
    semantic = copy.deepcopy(config)
    for section, key in NON_SEMANTIC_KEYS:
        semantic.get(section, {}).pop(key, None)
    for (section, key), neutral in HASH_NEUTRAL_VALUES.items():
        if key in semantic.get(section, {}) and semantic[section][key] == neutral:
            del semantic[section][key]
    blob = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
