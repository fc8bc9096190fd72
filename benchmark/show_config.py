"""``run --show-config``: the finished configuration a run would train with (benchmark/finalize.py: the labeled
count from the data set's lists, the patch size, the leaderboard folder) and the config hash its rows would carry.
Nothing is built or written, and neither a method nor a DataModule is imported (about a second)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from benchmark.config import config_hash
from benchmark.finalize import DatasetDescription


def show_config(config: dict[str, Any]) -> str:
    """The YAML of a finished config, with its labeled count and hash as comments."""
    digest = config_hash(config)
    unit = DatasetDescription.of(config["dataset"]).labeled_unit + "s"
    return (yaml.safe_dump(config, sort_keys=False)
            + f"# labeled: {config['data']['labeled']} {unit} (resolved from the split)\n"
            + f"# config hash: {digest} (the run folder will be {Path(config['run']['out']) / config['dataset'] / config['method_name']}"
            + f"/L{config['data']['labeled']}_s{config['run']['seed']}_{digest}_...)\n")
