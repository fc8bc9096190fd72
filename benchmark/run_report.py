"""The report every finished run leaves in its folder: ``report.png`` (training curves: each logged loss term, the
learning rate of the schedule, validation Dice overall and per class) and ``summary.md`` (what the config changes
from the profile's defaults, the test table, time and memory).

The learning rate is the configured schedule's (the method's own ``configure_optimizers``) at the logged steps,
so nothing extra has to be logged during training.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from benchmark.config import HASH_NEUTRAL_VALUES, NON_SEMANTIC_KEYS, resolve_config

REPORT_PLOT, REPORT_SUMMARY = "report.png", "summary.md"
# Filled in by the run itself (not chosen by the user), so never "a difference from the defaults".
RESOLVED_BY_THE_RUN = {"data.labeled", "data.ratio", "run.stage", "config_hash"}
_IGNORED_KEYS = {".".join(key) for key in NON_SEMANTIC_KEYS} | RESOLVED_BY_THE_RUN
# A key added after a run was written is missing from its config.yaml; the hash counts it as its neutral value
# (the behaviour before the key existed), and so does the description of a config.
_NEUTRAL_VALUES = {".".join(key): value for key, value in HASH_NEUTRAL_VALUES.items()}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or (prefix and not node):
        return {prefix: node}
    return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}.{key}" if prefix else str(key)).items()}


def profile_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The config the run's dataset, method and profile give without any override."""
    from datamodules import get_dataset
    from methods.registry import get_method

    entry = get_dataset(config["dataset"])
    defaults = resolve_config(config["dataset"], config["method_name"], config["profile"], (),
                              get_method(config["method_name"]).defaults, family=entry.family)
    if defaults["data"]["patch_size"] is None:  # what finishing the config fills in (benchmark/finalize.py)
        defaults["data"]["patch_size"] = list(entry.spec.patch_size)
    return defaults


def differences_from_defaults(config: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """``{key: (default, value)}`` for the keys that change what is computed and differ from the profile's defaults."""
    defaults = profile_defaults(config) if defaults is None else defaults
    # The run shortens the validation interval to the budget: a shorter budget alone is no other interval.
    trainer = defaults.get("trainer", {})
    if "val_every" in trainer and "max_steps" in config.get("trainer", {}):
        trainer["val_every"] = min(trainer["val_every"], config["trainer"]["max_steps"])
    old, new = flatten(defaults), flatten(config)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in _IGNORED_KEYS and old.get(key, _NEUTRAL_VALUES.get(key)) != new.get(key, _NEUTRAL_VALUES.get(key))}


def describe_differences(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}={value}" for key, (_, value) in differences.items()) or "profile defaults"


def learning_rates(config: dict[str, Any], steps: Sequence[int]) -> list[float]:
    """The first parameter group's learning rate at each of ``steps``, by the method's configured schedule."""
    from datamodules import get_dataset
    from methods.registry import get_method

    model = get_method(config["method_name"])(get_dataset(config["dataset"]).spec, config)
    optimizers = model.configure_optimizers()
    scheduler = optimizers["lr_scheduler"]["scheduler"]
    return [scheduler.base_lrs[0] * scheduler.lr_lambdas[0](int(step)) for step in steps]


def training_log(config: dict[str, Any], stages: Sequence[tuple[str, Path]]) -> pd.DataFrame:
    """The stages' metrics.csv one after another (steps counted over the whole run), with each stage's scheduled
    learning rate in the column ``lr``."""
    from benchmark.config import stage_config

    parts, offset = [], 0
    for stage, stage_dir in stages:
        path = Path(stage_dir) / "logs" / "metrics.csv"
        if not path.is_file():
            continue
        log = pd.read_csv(path)
        log = log[[column for column in log.columns if not column.startswith("test_")]]
        log = log.assign(lr=learning_rates(stage_config(config, stage), log["step"].tolist()) if len(log) else [])
        parts.append(log.assign(step=log["step"] + offset))
        offset += int(log["step"].max()) + 1 if len(log) else 0
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["step", "lr"])


def plot_training(log: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [c for c in log.columns if c.startswith("train/")]
    validation = [c for c in log.columns if c.startswith("val/dice")]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for column in losses:
        rows = log[["step", column]].dropna()
        axes[0].plot(rows["step"], rows[column], label=column[len("train/"):], linewidth=1)
    axes[0].set_title("training terms (as logged)")
    schedule = log[["step", "lr"]].drop_duplicates("step").sort_values("step")
    axes[1].plot(schedule["step"], schedule["lr"], color="black")
    axes[1].set_title("learning rate (the configured schedule)")
    for column in validation:
        rows = log[["step", column]].dropna()
        axes[2].plot(rows["step"], rows[column] * 100, marker=".", label=column[len("val/"):],
                     linewidth=2 if column == "val/dice" else 1)
    axes[2].set_title("validation Dice (%)")
    axes[2].set_ylim(0, 100)
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def summary_markdown(config: dict[str, Any], rows: list[dict[str, Any]], differences: dict[str, tuple[Any, Any]]) -> str:
    first = rows[0]
    lines = [f"# {config['method_name']} on {config['dataset']} ({config['profile']} profile)", "",
             f"{first['labeled_cases']} labeled {first['labeled_unit']}s, seed {first['seed']}, config `{first['config_hash']}`, "
             f"{first['steps']} steps, git {first.get('git_rev', '?')}.", "",
             "## Config: what differs from the profile's defaults", ""]
    if differences:
        lines += ["| key | default | this run |", "| --- | --- | --- |"]
        lines += [f"| `{key}` | `{default}` | `{value}` |" for key, (default, value) in differences.items()]
    else:
        lines.append("Nothing: the profile's defaults.")
    per_class = [key for key in first if key.startswith("dice_")]
    lines += ["", "## Test", "",
              f"{first['n_cases']} test cases; distances in {first['units']} units; empty-mask policy '{first['empty_policy']}'.", "",
              "| checkpoint | step | Dice % | Jaccard % | HD95 | ASD | " + " | ".join(f"Dice {k[5:]} %" for k in per_class) + " |",
              "|" + "---|" * (6 + len(per_class))]
    for row in rows:
        lines.append(f"| {row['checkpoint']} | {row['step']} | {row['dice'] * 100:.2f} | {row['jaccard'] * 100:.2f} | "
                     f"{row.get('hd95', float('nan')):.2f} | {row.get('asd', float('nan')):.2f} | "
                     + " | ".join(f"{row[k] * 100:.2f}" for k in per_class) + " |")
    lines += ["", "## Time and memory", "",
              f"- wall time: {first['wall_time_s']:.0f} s (training and test, resumed parts included)",
              "- CPU time: " + (f"{first['cpu_time_s']:.0f} s (this process and its ended loader workers)"
                                if first.get("cpu_time_s") not in (None, "") else "not recorded (resumed from an older checkpoint)"),
              f"- peak memory: {first['peak_rss_mb']:.0f} MB resident" + (f", {first['peak_gpu_mb']:.0f} MB GPU" if first.get("peak_gpu_mb") else ""),
              f"- devices: {first['devices']}; torch {first['torch']}, Lightning {first['lightning']}, host {first['host']}", "",
              f"![training curves]({REPORT_PLOT})", ""]
    return "\n".join(lines)


def write_run_report(run_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]],
                     stages: Sequence[tuple[str, Path]]) -> list[Path]:
    """Write ``report.png`` and ``summary.md`` into ``run_dir`` (``stages``: each trained stage and its folder)."""
    run_dir = Path(run_dir)
    title = f"{config['method_name']} on {config['dataset']} ({config['profile']}), seed {config['run']['seed']}"
    written = [plot_training(training_log(config, stages), run_dir / REPORT_PLOT, title)]
    summary = run_dir / REPORT_SUMMARY
    summary.write_text(summary_markdown(config, rows, differences_from_defaults(config)))
    written.append(summary)
    return written


def write_run_report_safely(run_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]],
                            stages: Sequence[tuple[str, Path]]) -> None:
    """The report is a convenience: a failure to draw it is a warning, never a failed run (its rows are written)."""
    if not rows:
        return
    try:
        write_run_report(run_dir, config, rows, stages)
    except Exception as error:  # noqa: BLE001 - any failure here must leave the finished run alone
        warnings.warn(f"the run report (report.png, summary.md) was not written: {type(error).__name__}: {error}", stacklevel=2)
