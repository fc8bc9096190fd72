"""Search spaces of the hyperparameter search: one YAML file per method, next to the method presets.

``benchmark/configs/search_spaces/<method>.yaml`` names the config keys to tune (the ``--set`` form,
``section.key``) and their ranges::

    extends: mean_teacher            # optional: start from another method's space
    params:
      optim.lr: {low: 1.0e-3, high: 5.0e-2, log: true}
      method.ema_decay: {choices: [0.99, 0.995, 0.999]}
      method.uncertainty_passes: {low: 2, high: 8, step: 2}
      method.noise_std: null         # drop a key inherited through `extends`

A range is an integer range when the key's current value is an integer (or, for a key whose value is null, when
``low`` and ``high`` are), otherwise a float range; ``type: int|float|categorical`` says it explicitly. A method
without a file gets ``_generic.yaml`` (learning rate, and the consistency weight where the method has one).
``--space FILE`` replaces the method's space by a file in the same format.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from benchmark.config import apply_overrides
from core.errors import UserError

GENERIC = "_generic"
RANGE_KEYS = {"type", "low", "high", "log", "step", "choices"}


def _packaged(name: str):
    return resources.files("benchmark").joinpath("configs", "search_spaces", f"{name}.yaml")


def _read(path, where: str) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"the search-space file is not valid YAML ({error})", where=where) from error
    except OSError as error:
        raise UserError(f"cannot read the search-space file ({error.strerror})", where=where) from error
    if content is None:
        content = {}
    if not isinstance(content, dict) or not isinstance(content.get("params", {}), dict) or set(content) - {"extends", "params"}:
        raise UserError(
            "a search-space file holds `params:` (a mapping of config keys to ranges) and optionally `extends:`",
            where=where, fix="see benchmark/configs/search_spaces/mean_teacher.yaml for the format",
        )
    return content


def _raw_space(path, where: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    content = _read(path, where)
    params = dict(content.get("params") or {})
    parent = content.get("extends")
    if parent is None:
        return params
    if parent in seen or not _packaged(str(parent)).is_file():
        raise UserError(f"`extends: {parent}` names no search space (or a cycle)", where=where,
                        fix=f"one of: {', '.join(packaged_spaces())}")
    inherited = _raw_space(_packaged(parent), f"search space '{parent}'", (*seen, parent))
    inherited.update(params)
    return {key: value for key, value in inherited.items() if value is not None}


def packaged_spaces() -> list[str]:
    folder = resources.files("benchmark").joinpath("configs", "search_spaces")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_"))


def load_search_space(method: str, config: dict[str, Any], path: str | Path | None = None) -> dict[str, BaseDistribution]:
    """The distributions to sample, by config key, checked against the run's resolved ``config``."""
    if path is not None:
        source, where, generic = Path(path), f"search-space file {path}", False
        if not source.is_file():
            raise UserError("the search-space file does not exist", where=str(path), fix="give a YAML file (--space)")
    elif _packaged(method).is_file():
        source, where, generic = _packaged(method), f"search space of '{method}' (benchmark/configs/search_spaces/{method}.yaml)", False
    else:
        source, where, generic = _packaged(GENERIC), f"generic search space (benchmark/configs/search_spaces/{GENERIC}.yaml)", True
    raw = _raw_space(source, where)
    space: dict[str, BaseDistribution] = {}
    for key, spec in raw.items():
        current = _current_value(config, key)
        if current is _MISSING:
            if generic:
                continue  # e.g. the supervised baseline has no consistency weight
            raise UserError(f"the search space names '{key}', which is not a key of the run's config", where=where,
                            fix="use section.key names that `python -m benchmark run --show-config` prints")
        distribution = _distribution(key, spec, current, where)
        for value in _extremes(distribution):
            # The override machinery checks the type (a float for an int key, ...) as for --set.
            try:
                apply_overrides(config, [override_text(key, value)])
            except UserError as error:
                raise UserError(f"the range of '{key}' does not fit the config: {error.what}", where=where) from error
        space[key] = distribution
    if not space:
        raise UserError("the search space is empty", where=where, fix="list at least one config key under `params:`")
    return space


_MISSING = object()


def _current_value(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    parts = key.split(".")
    if len(parts) < 2:
        return _MISSING
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _distribution(key: str, spec: Any, current: Any, where: str) -> BaseDistribution:
    if not isinstance(spec, dict) or set(spec) - RANGE_KEYS:
        raise UserError(f"the range of '{key}' must be a mapping with keys among {', '.join(sorted(RANGE_KEYS))}",
                        where=where, fix="e.g. {low: 1.0e-3, high: 5.0e-2, log: true} or {choices: [0.99, 0.999]}")
    kind = spec.get("type")
    if kind is None:
        if "choices" in spec:
            kind = "categorical"
        elif isinstance(current, int) and not isinstance(current, bool):
            kind = "int"
        elif current is None and all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool) for k in ("low", "high")):
            kind = "int"
        else:
            kind = "float"
    try:
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices or set(spec) - {"type", "choices"}:
                raise ValueError("`choices:` must be a non-empty list (and nothing else)")
            return CategoricalDistribution(choices)
        if kind not in ("int", "float"):
            raise ValueError(f"unknown type {kind!r} (int, float or categorical)")
        if "choices" in spec or "low" not in spec or "high" not in spec:
            raise ValueError("a range needs `low:` and `high:`")
        low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError("`low:` and `high:` must be numbers")
        if low > high:
            raise ValueError(f"low {low} is above high {high}")
        if kind == "int":
            if not all(isinstance(v, int) for v in (low, high, step or 1)):
                raise ValueError(f"'{key}' is a whole number: `low:`, `high:` (and `step:`) must be whole numbers")
            return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
        return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
    except ValueError as error:
        raise UserError(f"bad range for '{key}': {error}", where=where,
                        fix="e.g. {low: 1.0e-3, high: 5.0e-2, log: true} or {choices: [0.99, 0.999]}") from error


def _extremes(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def override_text(key: str, value: Any) -> str:
    """``key=value`` in the form ``--set`` parses back to the same value."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
