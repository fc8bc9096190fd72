"""What one run is asked to be, as the command line, the sweep and the tuner give it: a :class:`RunRequest`.

``RunRequest.finalized()`` turns it into the complete, hashed config (resolve_config, then benchmark/finalize.py)
without importing a method or a DataModule, so a sweep plans its grid and ``run --show-config`` answers fast.
``argv()`` is the same request as a ``python -m benchmark run`` command line, for a run in a process of its own.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from benchmark.catalogue import catalogue
from benchmark.config import resolve_config
from benchmark.finalize import DatasetDescription, finalize
from benchmark.overrides import join_split_overrides
from core.errors import UserError, unknown_name

WANDB_MODES_FROM_ENV = {"offline": "offline", "dryrun": "offline", "online": "online", "run": "online"}
# Request fields that set one config key each, in the order they are applied (user overrides come after them).
OPTION_KEYS = (
    ("data_root", "data.root"), ("ratio", "data.ratio"), ("labeled", "data.labeled"), ("seed", "run.seed"),
    ("devices", "trainer.devices"), ("num_nodes", "trainer.num_nodes"), ("accelerator", "trainer.accelerator"),
    ("precision", "trainer.precision"), ("out", "run.out"), ("leaderboard_dir", "run.leaderboard_dir"),
)


@dataclass
class RunRequest:
    """The options of one run (`python -m benchmark run --help` says what each means); ``None`` = the config's value."""

    method: str = "supervised"
    dataset: str = "synthetic_acdc"
    profile: str = "cpu"
    data_root: str | None = None
    ratio: float | None = None
    labeled: int | None = None
    seed: int = 0
    devices: int | None = None
    accelerator: str | None = None
    precision: str | None = None
    num_nodes: int | None = None
    out: str | None = None
    leaderboard_dir: str | None = None
    wandb: str | None = None
    progress: bool = True
    overrides: list[str] = field(default_factory=list)  # SECTION.KEY=VALUE, applied last (they win)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunRequest":
        """The request of parsed run options (``add_run_options``)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "progress"}
        return cls(**values, progress=not args.no_progress)

    def option_overrides(self) -> list[str]:
        """The options as config overrides. W&B stays off unless asked for, by the request or by the environment
        W&B itself reads."""
        wandb = self.wandb or WANDB_MODES_FROM_ENV.get(os.environ.get("WANDB_MODE", ""))
        overrides = [] if self.progress else ["run.progress=false"]
        for name, key in (*OPTION_KEYS, ("wandb", "run.wandb")):
            value = wandb if name == "wandb" else getattr(self, name)
            if value is not None and value != "":
                overrides.append(f"{key}={value}")
        return overrides

    def resolve(self, first_overrides: Sequence[str] = ()) -> dict[str, Any]:
        """The resolved config (not yet finished); ``first_overrides`` come before the request's own (which win)."""
        methods = catalogue()["method_facts"]
        if self.method not in methods:
            raise unknown_name("method", self.method, methods)
        description = DatasetDescription.of(self.dataset)
        refused = methods[self.method]["refuses"].get(self.dataset)
        if refused:  # the method's check_dataset, as the catalogue recorded it
            raise UserError(*refused)
        overrides = [*self.option_overrides(), *first_overrides, *join_split_overrides(self.overrides)]
        return resolve_config(self.dataset, self.method, self.profile, overrides, methods[self.method]["defaults"],
                              family=description.family)

    def finalized(self, first_overrides: Sequence[str] = ()) -> dict[str, Any]:
        """The complete config the run trains with, its hash final (benchmark/finalize.py)."""
        return finalize(self.resolve(first_overrides))

    def argv(self) -> list[str]:
        """The ``python -m benchmark run`` command line of this request (without the program)."""
        argv = ["run", "--method", self.method, "--dataset", self.dataset, "--profile", self.profile, "--seed", str(self.seed)]
        for name, flag in (("data_root", "--data-root"), ("ratio", "--ratio"), ("labeled", "--labeled"),
                           ("devices", "--devices"), ("accelerator", "--accelerator"), ("precision", "--precision"),
                           ("num_nodes", "--num-nodes"), ("out", "--out"), ("leaderboard_dir", "--leaderboard-dir"),
                           ("wandb", "--wandb")):
            value = getattr(self, name)
            if value is not None:
                argv += [flag, repr(value) if isinstance(value, float) else str(value)]
        if not self.progress:
            argv.append("--no-progress")
        for override in self.overrides:
            argv += ["--set", override]
        return argv
