"""Preset layering, overrides and the config hash."""
from __future__ import annotations

import pytest

from benchmark.config import config_hash, resolve_config
from core.errors import UserError


def test_layers_dataset_then_profile_then_overrides():
    paper = resolve_config("acdc", "supervised", "paper")
    assert paper["data"]["labeled_batch_size"] == 12 and paper["trainer"]["max_steps"] == 30000
    cpu = resolve_config("acdc", "supervised", "cpu")
    assert cpu["data"]["patch_size"] == [128, 128] and cpu["trainer"]["max_steps"] < 30000
    smoke = resolve_config("synthetic_acdc", "supervised", "smoke", ["trainer.max_steps=7"], family="acdc")
    assert smoke["trainer"]["max_steps"] == 7 and smoke["data"]["patch_size"] == [32, 32]
    la = resolve_config("la", "supervised", "paper")
    assert la["data"]["val_holdout"] == 8 and la["optim"]["schedule"] == "step" and la["trainer"]["max_steps"] == 6000


def test_method_defaults_are_overridable_and_checked():
    config = resolve_config("acdc", "supervised", "cpu", ["method.alpha=0.5"], method_defaults={"alpha": 0.1})
    assert config["method"]["alpha"] == 0.5
    with pytest.raises(UserError, match="unknown config key 'method.beta'"):
        resolve_config("acdc", "supervised", "cpu", ["method.beta=1"], method_defaults={"alpha": 0.1})


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=abc", "expected a whole number"),
    ("optim.lr=fast", "expected a number"),
    ("eval.lcc=maybe", "expected true or false"),
    ("data.patch_size=64", "expected a list"),
    ("trainer.nonsense=1", "unknown config key 'trainer.nonsense'"),
    ("nosection.x=1", "unknown config key"),
    ("max_steps=3", "must name a section and a key"),
    ("trainer.max_steps", "not of the form section.key=value"),
])
def test_bad_overrides_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        resolve_config("acdc", "supervised", "cpu", [override])


def test_unknown_profile():
    with pytest.raises(UserError, match="unknown profile 'gpu'"):
        resolve_config("acdc", "supervised", "gpu")


def test_hash_ignores_seed_paths_and_devices_but_not_hyperparameters():
    base = resolve_config("acdc", "supervised", "cpu")
    same = resolve_config("acdc", "supervised", "cpu", ["run.seed=3", "run.out=/x", "data.root=/y", "trainer.devices=2"])
    other = resolve_config("acdc", "supervised", "cpu", ["optim.lr=0.02"])
    assert config_hash(base) == config_hash(same) != config_hash(other)
    assert config_hash(base) != config_hash(resolve_config("acdc", "supervised", "smoke"))


def committed_leaderboard_experiments():
    """(dataset, method, profile, labeled, hash) of every committed leaderboard row that ran to the end."""
    import pandas as pd
    from pathlib import Path

    experiments = set()
    for csv in sorted((Path(__file__).resolve().parent.parent / "leaderboards").glob("*.csv")):
        if csv.name == "reported.csv":
            continue
        rows = pd.read_csv(csv, dtype=str)
        rows = rows[rows["status"] == "ok"]
        for row in rows.itertuples():
            experiments.add((row.dataset, row.method, row.profile, int(row.labeled_cases), row.config_hash))
    return sorted(experiments)


@pytest.mark.parametrize("dataset,method,profile,labeled,digest", committed_leaderboard_experiments())
def test_committed_rows_keep_the_hash_of_their_default_config(dataset, method, profile, labeled, digest):
    # A config key added later must be hash-neutral at its default (config.HASH_NEUTRAL_VALUES), or every
    # committed row silently stops counting as done and `make sweep` re-runs it.
    from datamodules import get_dataset
    from methods.registry import get_method

    config = resolve_config(dataset, method, profile, [f"data.labeled={labeled}"], get_method(method).defaults,
                            family=get_dataset(dataset).family)
    assert config_hash(config) == digest


@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_consistency_ramp_ups_and_delays_fit_the_budget(profile):
    # A preset sized for one family's budget does not carry to another: on Kvasir-SEG's 1500 cpu steps Mean
    # Teacher kept the paper's 200 x 150 ramp-up and 1000-step delay (weight 0.1 % of its maximum at the end) and
    # FBA-Net+ its 40 x 150 (6 %); on the endoscopy sets' paper budgets (11 682 to 27 819 steps) SSL4MIS's
    # 30 000-iteration ramp-up ended at 15-97 %. Every method on every real data set must reach its full weight
    # within the run (ramp-ups count 150-iteration units as SSL4MIS does, or a fraction of max_steps) and start
    # it early (SSL4MIS's Mean Teacher delay is 1000 of 30 000 iterations).
    from datamodules import dataset_names, get_dataset
    from methods.registry import get_method, method_names

    too_late = []
    for dataset in (name for name in dataset_names() if not name.startswith("synthetic")):
        for method in method_names():
            config = resolve_config(dataset, method, profile, [], get_method(method).defaults,
                                    family=get_dataset(dataset).family)
            hp, steps = config["method"], config["trainer"]["max_steps"]
            if "consistency_rampup" in hp:
                fraction = hp.get("consistency_rampup_fraction")
                length = fraction * steps if fraction is not None else hp["consistency_rampup"] * 150
                if length > steps:
                    too_late.append(f"{method} on {dataset}: ramp-up {length:.0f} steps > {steps}")
            if hp.get("consistency_start_step", 0) > 0.1 * steps:
                too_late.append(f"{method} on {dataset}: delay {hp['consistency_start_step']} of {steps} steps")
    assert not too_late, "\n".join(too_late)


def _recipe_view(config: dict) -> dict:
    """The values the cpu recipe shares across methods, read from a resolved config (every stage included)."""
    from benchmark.config import PER_STAGE, RECIPE_SECTIONS

    view = {section: dict(config[section]) for section in RECIPE_SECTIONS}
    view["stages"] = {stage: {section: values for section, values in overrides.items() if section != "trainer"}
                      for stage, overrides in config.get(PER_STAGE, {}).items()}
    view["inits"] = sorted({str(config["method"][key]) for key in ("network_init", "network_inits") if key in config["method"]})
    return view


def test_every_method_trains_with_the_shared_cpu_recipe():
    # The cpu profile ranks methods only if they are trained alike: backbone, initialisation, optimizer, schedule,
    # batch composition, budget and validation cadence must be the same for every method on a data set.
    from benchmark.config import shared_recipe
    from datamodules import dataset_names, get_dataset
    from methods.registry import get_method, method_names

    for dataset in dataset_names():
        family = get_dataset(dataset).family
        recipe = shared_recipe("cpu", dataset, family)
        assert recipe is not None, f"{dataset} has no cpu recipe"
        views = {}
        for method in method_names():
            config = resolve_config(dataset, method, "cpu", [], get_method(method).defaults, family=family)
            view = _recipe_view(config)
            for section in ("data", "model", "optim", "trainer"):
                for key, value in recipe.get(section, {}).items():
                    assert view[section][key] == value, f"{method} on {dataset}: {section}.{key}"
            assert not any(view["stages"].values()), f"{method} on {dataset}: a stage overrides the recipe"
            assert view["inits"] in ([], ["default"], ["['default', 'default']"]), f"{method} on {dataset}: {view['inits']}"
            views[method] = {s: view[s] for s in ("data", "model", "optim")} | {
                "trainer": {k: view["trainer"][k] for k in ("max_steps", "val_every", "precision")}}
        first = next(iter(views.values()))
        assert all(v == first for v in views.values()), f"{dataset}: methods differ in the shared keys"


def test_multi_stage_methods_split_the_cpu_budget():
    from methods.registry import get_method

    config = resolve_config("acdc", "action", "cpu", [], get_method("action").defaults, family="acdc")
    stages = {stage: values["trainer"]["max_steps"] for stage, values in config["per_stage"].items()}
    assert set(stages) == {"pretrain_global", "pretrain_local", "finetune"}
    assert abs(sum(stages.values()) - config["trainer"]["max_steps"]) <= len(stages)


def test_cpu_recipe_scales_upstream_schedules_to_its_budget():
    # Upstream's ramp-ups keep their proportion of the run: SSL4MIS's ACDC ramp-up spans its whole 30 000
    # iterations, MC-Net's LA one 6 000 of 15 000; Mean Teacher's 1 000-iteration delay scales with the budget.
    from methods.registry import get_method

    def hp(dataset, method, profile):
        return resolve_config(dataset, method, profile, [], get_method(method).defaults, family=dataset)

    steps = hp("acdc", "supervised", "cpu")["trainer"]["max_steps"]
    assert hp("acdc", "cps", "cpu")["method"]["consistency_rampup_fraction"] == 1.0
    assert hp("la", "mc_net_plus", "cpu")["method"]["consistency_rampup_fraction"] == pytest.approx(40 * 150 / 15000)
    paper = hp("acdc", "mean_teacher", "paper")
    expected = round(paper["method"]["consistency_start_step"] * steps / paper["trainer"]["max_steps"])
    assert hp("acdc", "mean_teacher", "cpu")["method"]["consistency_start_step"] == expected
    # Overrides still win over the recipe (a user can leave it on purpose; such rows get their own hash).
    changed = resolve_config("acdc", "cps", "cpu", ["optim.lr=0.01"], get_method("cps").defaults, family="acdc")
    assert changed["optim"]["lr"] == 0.01
