"""``run --resume RUN_DIR`` alone: the run folder's config.yaml holds the resolved configuration (method, dataset,
data root, labeled count, profile, seed, overrides), so nothing else needs repeating. Options given beside
``--resume`` are laid over it; one that changes what the run computes (or its seed) is refused by the run as
before (``run.check_resumable``), one that does not (devices, progress bars, W&B) applies to the resumed part.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml

from benchmark import run_request
from benchmark.config import apply_overrides
from benchmark.overrides import join_split_overrides
from core.errors import UserError

# Run options that set one config key (the option's dest -> the key); a new ratio is resolved anew (below).
OPTION_KEYS = {name: key for name, key in (*run_request.OPTION_KEYS, ("wandb", "run.wandb")) if name != "ratio"}
# Options naming the run itself: stored as top-level keys of the config.
NAME_KEYS = {"method": "method_name", "dataset": "dataset", "profile": "profile"}


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str], command: str = "run") -> set[str]:
    """The destinations of the options written on the command line of ``command`` (not those left at their
    defaults): the same command line parsed again with every default of that command suppressed."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for action in commands.choices[command]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv)))) - {"command"}


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The content of a run folder's config.yaml (the resolved configuration and its ``config_hash``); a UserError
    for a folder without one or an unreadable one."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError("--resume needs a run folder (one that holds config.yaml)", where=str(run_dir),
                        fix="give the folder a run printed as 'run folder:' (runs/<dataset>/<method>/L<n>_s<seed>_<hash>_...)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, OSError) as error:
        raise UserError(f"cannot read the run folder's config.yaml ({error})", where=str(path),
                        fix="start a new run (without --resume)") from error


def stored_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved configuration a run folder was started with (without its hash)."""
    stored = read_run_config(run_dir)
    if not isinstance(stored, dict) or not all(key in stored for key in ("method_name", "dataset", "profile", "run", "data")):
        raise UserError("the run folder's config.yaml is not a run's configuration",
                        where=str(Path(run_dir).expanduser().resolve() / "config.yaml"),
                        fix="give the folder of a run (it writes config.yaml when it starts), or start a new run")
    stored.pop("config_hash", None)
    return stored


def resumed_config(args: argparse.Namespace, given: set[str], first_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The stored configuration of ``args.resume`` with the options in ``given`` (and ``first_overrides``, then the
    user's --set) laid over it."""
    config = stored_config(args.resume)
    for option, key in NAME_KEYS.items():
        if option in given:
            config[key] = getattr(args, option)
    overrides = [f"{key}={getattr(args, option)}" for option, key in OPTION_KEYS.items()
                 if option in given and getattr(args, option) is not None]
    if "ratio" in given and "labeled" not in given:
        # The stored labeled count was resolved from the original ratio; a new ratio resolves it anew (and the
        # run refuses the folder if the count differs).
        config["data"]["labeled"] = None
        overrides.append(f"data.ratio={args.ratio}")
    if "no_progress" in given:
        overrides.append("run.progress=false")
    given_overrides = join_split_overrides(args.overrides) if "overrides" in given else []
    return apply_overrides(config, [*overrides, *first_overrides, *given_overrides])
