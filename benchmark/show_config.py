"""``run --show-config``: the configuration a run would train with, as the run resolves it (the labeled count
from the split, the patch size, the leaderboard folder) and the config hash its rows would carry. Nothing is
written."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from benchmark.config import config_hash
from benchmark.leaderboard import leaderboard_dir_for


def resolved_for_run(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the config as ``run.prepare`` leaves it, its hash), without writing anything."""
    from datamodules import build_datamodule, get_dataset
    from methods.registry import get_method

    config = copy.deepcopy(config)
    entry = get_dataset(config["dataset"])
    method_cls = get_method(config["method_name"])
    method_cls.check_dataset(entry.spec)
    if config["data"]["patch_size"] is None:
        config["data"]["patch_size"] = list(entry.spec.patch_size)
    datamodule = build_datamodule(config["dataset"], config, use_unlabeled=method_cls.uses_unlabeled,
                                  labeled_partitions=method_cls.labeled_partitions)
    config["data"]["labeled"] = datamodule.split.labeled_count
    trainer = config["trainer"]
    trainer["val_every"] = min(trainer["val_every"], trainer["max_steps"])
    run = config["run"]
    run["leaderboard_dir"] = str(leaderboard_dir_for(config["profile"], run["leaderboard_dir"], run["out"]))
    return config, config_hash(config)


def show_config(config: dict[str, Any]) -> str:
    from datamodules import get_dataset

    resolved, digest = resolved_for_run(config)
    unit = get_dataset(resolved["dataset"]).spec.labeled_unit + "s"
    return (yaml.safe_dump(resolved, sort_keys=False)
            + f"# labeled: {resolved['data']['labeled']} {unit} (resolved from the split)\n"
            + f"# config hash: {digest} (the run folder will be {Path(resolved['run']['out']) / resolved['dataset'] / resolved['method_name']}"
            + f"/L{resolved['data']['labeled']}_s{resolved['run']['seed']}_{digest}_...)\n")
