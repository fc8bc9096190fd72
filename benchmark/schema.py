"""What each configuration value may be: its type, its range or its choices, checked once on the resolved config.

The table below has one rule per key of ``configs/base.yaml`` (and the dataset presets' own ``data`` keys), and
rules by name pattern for the methods' hyperparameters where a range is obvious (weights, temperatures, decays,
probabilities, ratios, counts). A range is written as an interval: ``[0, 1)`` includes 0 and excludes 1, ``inf``
means unbounded. ``validate_config`` raises one :class:`UserError` naming the key, the value, what is allowed and
the option that sets it; it never changes the config (the config hash is unaffected).

``per_stage.<stage>.<section>.<key>`` values are checked by the rule of ``<section>.<key>``.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Iterator

from core.errors import UserError

UNBOUNDED = math.inf


@dataclass(frozen=True)
class Rule:
    """``kind``: "int", "float", "bool", "str", "ints" (a list of whole numbers), "deterministic" (true, false or
    "warn"), "stages" (one name or a list of names); ``interval``: the allowed range of a number (of each number of
    a list); ``choices``: the allowed values; ``nullable``: null is allowed; ``label``: how the user sets the value,
    if not only by ``--set``; ``example``: a typical setting, for the message."""

    kind: str
    interval: str | None = None
    choices: tuple = ()
    nullable: bool = False
    label: str | None = None
    example: str | None = None  # a typical value, for the message's fix

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (None if it is allowed)."""
        if value is None:
            return None if self.nullable else "must be set (null is not allowed)"
        if self.choices:
            return None if value in self.choices or str(value) in map(str, self.choices) else f"must be one of {', '.join(map(str, self.choices))}"
        wrong_type = self._type_problem(value)
        if wrong_type:
            return wrong_type
        numbers = value if self.kind == "ints" else [value] if self.kind in ("int", "float") else []
        if self.interval and not all(within(number, self.interval) for number in numbers):
            noun = {"ints": "whole numbers", "int": "a whole number"}.get(self.kind, "a number")
            return f"must be {noun} {readable(self.interval)}"
        return None

    def _type_problem(self, value: Any) -> str | None:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == "int" and not (is_number and float(value).is_integer()):
            return "must be a whole number"
        if self.kind == "float" and not is_number:
            return "must be a number"
        if self.kind == "bool" and not isinstance(value, bool):
            return "must be true or false"
        if self.kind == "str" and not isinstance(value, str):
            return "must be a string"
        if self.kind == "ints" and not (isinstance(value, list) and value and all(
                isinstance(item, int) and not isinstance(item, bool) for item in value)):
            return "must be a list of whole numbers, e.g. [64, 64]"
        if self.kind == "deterministic" and not (isinstance(value, bool) or value == "warn"):
            return "must be true, false or warn"
        if self.kind == "stages" and not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            return "must be a stage name or a list of them"
        return None


def within(number: float, interval: str) -> bool:
    """``number`` lies in ``interval``, written ``[low, high)`` etc. (``inf`` for no bound)."""
    opening, closing = interval[0], interval[-1]
    low, high = (float(part) for part in interval[1:-1].split(","))
    if math.isnan(number):
        return False
    above = number >= low if opening == "[" else number > low
    below = number <= high if closing == "]" else number < high
    return above and below


def readable(interval: str) -> str:
    """``[1, inf)`` as ">= 1", ``(0, inf)`` as "> 0", a bounded interval as "in [0, 1)"."""
    low, high = (part.strip() for part in interval[1:-1].split(","))
    if high == "inf":
        return f"{'>=' if interval[0] == '[' else '>'} {low}"
    return f"in {interval}"


NON_NEGATIVE, POSITIVE, AT_LEAST_ONE = "[0, inf)", "(0, inf)", "[1, inf)"
FRACTION, PROBABILITY, DECAY = "(0, 1]", "[0, 1]", "[0, 1)"
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "auto")

RULES: dict[str, Rule] = {
    "data.root": Rule("str", nullable=True, label="DATA_ROOT (--data-root)"),
    "data.ratio": Rule("float", FRACTION, nullable=True, label="RATIO", example="RATIO=0.1; 1.0 is full supervision"),
    "data.labeled": Rule("int", AT_LEAST_ONE, nullable=True, label="LABELED (--labeled)"),
    "data.patch_size": Rule("ints", AT_LEAST_ONE, nullable=True),
    "data.labeled_batch_size": Rule("int", AT_LEAST_ONE),
    "data.unlabeled_batch_size": Rule("int", AT_LEAST_ONE),
    "data.num_workers": Rule("int", NON_NEGATIVE),
    "data.cache_decoded": Rule("bool"),
    "data.val_holdout": Rule("int", NON_NEGATIVE),
    "data.max_eval_cases": Rule("int", AT_LEAST_ONE, nullable=True),
    # dataset presets' own keys (endoscopy)
    "data.fold": Rule("int", NON_NEGATIVE),
    "data.crop_black_borders": Rule("bool"),
    "data.test_set": Rule("str", choices=("fold", "released")),
    "data.val_fraction": Rule("float", "(0, 1)"),
    "model.name": Rule("str", choices=("unet", "vnet"), nullable=True),
    "model.base_features": Rule("int", AT_LEAST_ONE),
    "model.dropout": Rule("bool"),
    "optim.name": Rule("str", choices=("sgd", "adam")),
    "optim.lr": Rule("float", POSITIVE),
    "optim.momentum": Rule("float", DECAY),
    "optim.weight_decay": Rule("float", NON_NEGATIVE),
    "optim.schedule": Rule("str", choices=("poly", "step", "constant", "poly_epoch")),
    "optim.poly_step_lag": Rule("int", NON_NEGATIVE),
    "optim.poly_epochs": Rule("int", AT_LEAST_ONE, nullable=True),
    "optim.poly_power": Rule("float", POSITIVE),
    "optim.step_every": Rule("int", AT_LEAST_ONE),
    "optim.step_gamma": Rule("float", FRACTION),
    "optim.nesterov": Rule("bool"),
    "trainer.max_steps": Rule("int", AT_LEAST_ONE),
    "trainer.val_every": Rule("int", AT_LEAST_ONE),
    "trainer.precision": Rule("str", choices=PRECISIONS),
    "trainer.precision_chosen": Rule("str", choices=PRECISIONS, nullable=True),  # written by `auto`, kept on resume
    "trainer.channels_last": Rule("bool"),
    "trainer.devices": Rule("int", AT_LEAST_ONE, label="DEVICES (--devices)"),
    "trainer.num_nodes": Rule("int", AT_LEAST_ONE, label="--num-nodes"),
    "trainer.accelerator": Rule("str", choices=("auto", "cpu", "gpu", "cuda", "mps")),
    "trainer.deterministic": Rule("deterministic"),
    "trainer.log_every": Rule("int", AT_LEAST_ONE),
    "trainer.on_nonfinite_loss": Rule("str", choices=("stop", "skip")),
    "eval.stride": Rule("ints", AT_LEAST_ONE, nullable=True),
    "eval.lcc": Rule("bool"),
    "eval.use_spacing": Rule("bool"),
    "eval.empty_policy": Rule("str", choices=("penalty", "literature")),
    "eval.window_batch": Rule("int", AT_LEAST_ONE),
    "run.seed": Rule("int", f"[0, {2**32 - 1}]", label="SEED (--seed)"),  # what seed_everything accepts
    "run.out": Rule("str", label="OUT (--out)"),
    "run.leaderboard_dir": Rule("str", label="LEADERBOARD_DIR (--leaderboard-dir)"),
    "run.wandb": Rule("str", choices=("disabled", "offline", "online"), label="WANDB (--wandb)"),
    "run.sweep": Rule("str", nullable=True),
    "run.progress": Rule("bool"),
    "run.test": Rule("bool"),
    "run.stages": Rule("stages", nullable=True),  # the names are checked against the method's stages by the run
    "run.init_from": Rule("str", nullable=True),
}

# Method hyperparameters, by name pattern (first match wins); a method key no pattern matches is not range-checked.
METHOD_RULES: list[tuple[str, Rule]] = [
    ("ema_decay", Rule("float", DECAY)),
    ("*_momentum", Rule("float", DECAY)),
    ("consistency_rampup_fraction", Rule("float", FRACTION, nullable=True)),
    ("consistency_rampup", Rule("float", NON_NEGATIVE)),
    ("consistency_start_step", Rule("int", NON_NEGATIVE)),
    ("consistency", Rule("float", NON_NEGATIVE)),
    ("supervised_weight", Rule("float", NON_NEGATIVE, nullable=True)),  # null = upstream's per dimensionality
    ("*_weight", Rule("float", NON_NEGATIVE)),
    ("*temperature", Rule("float", POSITIVE)),
    ("*_probability", Rule("float", PROBABILITY)),
    ("*threshold*", Rule("float", PROBABILITY)),
    ("pixel_confidence", Rule("float", PROBABILITY)),
    ("feature_dropout", Rule("float", DECAY)),
    ("noise_*", Rule("float", NON_NEGATIVE)),
    ("*_jitter", Rule("float", NON_NEGATIVE)),
    ("jitter_strength", Rule("float", NON_NEGATIVE)),
    ("uncertainty_passes", Rule("int", AT_LEAST_ONE)),
    ("queue_size", Rule("int", AT_LEAST_ONE)),
    ("window", Rule("int", AT_LEAST_ONE)),
    ("window_stride", Rule("int", AT_LEAST_ONE)),
    ("cutmix_depth", Rule("int", AT_LEAST_ONE)),
    ("output_pooling", Rule("int", AT_LEAST_ONE)),
    ("pixel_anchors_per_class", Rule("int", AT_LEAST_ONE)),
    ("pixel_negatives", Rule("int", AT_LEAST_ONE)),
    ("pixel_prototype_samples", Rule("int", AT_LEAST_ONE)),
    ("*_dim", Rule("int", AT_LEAST_ONE)),
    ("num_*", Rule("int", AT_LEAST_ONE)),
    ("*_channels", Rule("int", AT_LEAST_ONE)),
]


def rule_for(key: str) -> Rule | None:
    """The rule of ``section.key`` (None for a key without one)."""
    if key in RULES:
        return RULES[key]
    section, _, name = key.partition(".")
    if section == "method":
        return next((rule for pattern, rule in METHOD_RULES if fnmatch.fnmatchcase(name, pattern)), None)
    return None


def _values(config: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(key checked by, key as the user writes it, value) of every section value, per-stage ones included."""
    for section, values in config.items():
        if section == "per_stage" and isinstance(values, dict):
            for stage, sections in values.items():
                for inner, stage_values in (sections or {}).items():
                    for name, value in (stage_values or {}).items() if isinstance(stage_values, dict) else ():
                        yield f"{inner}.{name}", f"per_stage.{stage}.{inner}.{name}", value
        elif isinstance(values, dict):
            for name, value in values.items():
                yield f"{section}.{name}", f"{section}.{name}", value


def validate_config(config: dict[str, Any]) -> None:
    """Raise a UserError for the first value of ``config`` its rule does not allow."""
    for key, written, value in _values(config):
        rule = rule_for(key)
        problem = rule.problem(value) if rule else None
        if problem:
            label = rule.label or written
            raise UserError(
                f"{label} {problem}, got {value!r}" + (f" ({written})" if rule.label else ""),
                where=f"{written} of the resolved configuration (a preset, an option or --set / OVERRIDES)",
                fix=f"give {written} a value that {problem.replace('must be', 'is')}"
                    + (f", e.g. {rule.example}" if rule.example else "")
                    + "; `python -m benchmark run --show-config ...` prints the resolved values",
            )
