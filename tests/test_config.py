"""Preset layering, overrides and the config hash."""
from __future__ import annotations

import pytest

from benchmark.config import config_hash, resolve_config
from benchmark.errors import UserError


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
    from methods.registry import get_method
    from datamodules import get_dataset

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
