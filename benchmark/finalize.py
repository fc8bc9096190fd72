"""The one step that finishes a run's configuration, before anything is built: what ``resolve_config`` leaves
open is decided here from the data set's description, so that the config (and its hash) is complete when the run,
the sweep's planning or ``run --show-config`` first sees it.

What it decides:

- ``data.patch_size``: the dataset spec's when the presets leave it null;
- ``data.labeled``: the labeled count RATIO or LABELED asks for, under the dataset's published convention
  (datamodules/listing.py: ``resolve_labeled_count``), from the count of training units its lists hold (read from
  the lists and folders only, no images, no Lightning); the hash covers this count, not how it was asked for;
- ``trainer.val_every``: at most ``trainer.max_steps``;
- ``run.leaderboard_dir``: where the rows go (smoke rows never into the repository's leaderboards/).

Finishing is idempotent (a finished config, e.g. a run folder's config.yaml, finishes to itself). ``run.prepare``
builds the DataModule and checks that its split has the count decided here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.catalogue import catalogue
from core.errors import UserError, unknown_name
from datamodules.listing import count_training_units, data_root, resolve_labeled_count

# The repository's own, tracked leaderboards: rows of the `smoke` profile (seconds-long runs for tests and trying
# things out) never go there, so a trial run cannot slip into a committed table.
REPOSITORY_LEADERBOARDS = Path(__file__).resolve().parent.parent / "leaderboards"
SMOKE_LEADERBOARDS = "leaderboards-smoke"


def leaderboard_dir_for(profile: str, leaderboard_dir: str | Path, out: str | Path) -> Path:
    """Where a run of ``profile`` appends its rows: ``leaderboard_dir``, except that `smoke` rows aimed at the
    repository's leaderboards/ go to ``<out>/leaderboards-smoke`` instead."""
    if profile == "smoke" and Path(leaderboard_dir).expanduser().resolve() == REPOSITORY_LEADERBOARDS:
        return Path(out) / SMOKE_LEADERBOARDS
    return Path(leaderboard_dir)


@dataclass(frozen=True)
class DatasetDescription:
    """What finishing a config needs to know of a registered data set, without importing its DataModule: its
    spec's values (``resolve_labeled_count`` reads ``name``, ``labeled_unit`` and ``labeled_counts``) and how its
    training units are counted."""

    name: str
    family: str
    synthetic: bool
    layout_hint: str
    datamodule: str  # the DataModule class's name: which counter of datamodules/listing.py reads its lists
    patch_size: tuple[int, ...]
    labeled_unit: str
    labeled_counts: dict[float, int] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, dataset: str) -> "DatasetDescription":
        """The description of ``dataset`` from the catalogue (benchmark/catalogue.py); unknown names are a UserError."""
        datasets = catalogue()["datasets"]
        if dataset not in datasets:
            raise unknown_name("dataset", dataset, datasets)
        facts = datasets[dataset]
        spec = facts["spec"]
        return cls(name=spec["name"], family=facts["family"], synthetic=facts["synthetic"], layout_hint=facts["layout_hint"],
                   datamodule=facts["datamodule"], patch_size=tuple(spec["patch_size"]), labeled_unit=spec["labeled_unit"],
                   labeled_counts={float(ratio): int(count) for ratio, count in spec["labeled_counts"]},
                   data_options=dict(facts["data_options"]))

    def training_units(self, config: dict[str, Any]) -> tuple[int, int]:
        """(training units after any validation hold-out, units in the training list) of the config's data."""
        data = config["data"]
        root = data_root(config["dataset"], data.get("root"), self.synthetic, self.layout_hint)
        options = {**self.data_options, **{key: data[key] for key in self.data_options if key in data}}
        return count_training_units(self.datamodule, root, options, data.get("val_holdout", 0))


def finalize(config: dict[str, Any], description: DatasetDescription | None = None) -> dict[str, Any]:
    """The complete config of a run (a new dict): ``config`` as ``resolve_config`` (or a run folder) gives it with
    the values listed in the module docstring decided. Nothing is built or written (a synthetic data set is
    generated on its first use)."""
    config = copy.deepcopy(config)
    description = description or DatasetDescription.of(config["dataset"])
    data = config["data"]
    if data["patch_size"] is None:
        data["patch_size"] = list(description.patch_size)
    try:
        total, listed = description.training_units(config)
        if total < 1:
            raise UserError(f"found no training {description.labeled_unit}s for {config['dataset']}", where=str(data.get("root")),
                            fix=f"DATA_ROOT is the folder holding {description.layout_hint}")
    except UserError:
        if data.get("root") not in (None, "") and Path(data["root"]).expanduser().is_dir():
            report_layout_problems(config)  # a folder that exists but reads wrong: list every problem in it at once
        raise
    data["labeled"] = resolve_labeled_count(description, total, data.get("ratio"), data.get("labeled"), listed)
    trainer = config["trainer"]
    trainer["val_every"] = min(trainer["val_every"], trainer["max_steps"])
    run = config["run"]
    run["leaderboard_dir"] = str(leaderboard_dir_for(config["profile"], run["leaderboard_dir"], run["out"]))
    return config


def report_layout_problems(config: dict[str, Any]) -> None:
    """Data whose units cannot be counted: the DataModule's own reading of it reports every problem at once (and
    raises); if it finds none, the caller's error stands."""
    from datamodules import build_datamodule

    build_datamodule(config["dataset"], config)
