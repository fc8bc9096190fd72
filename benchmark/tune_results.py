"""What a study found: its summary (summary.json, summary.md, plots) in the study folder, printed at the end of
``tune`` and by ``tune --report-only``, and its best trial's values for ``run --from-study``. ``settings`` are the
search's TuneSettings (benchmark/tune.py)."""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from benchmark.search_space import override_text
from benchmark.tune_storage import StorageSpec
from core.errors import UserError


OBJECTIVE = "best validation Dice (val/dice) over the validations of the trial; never test data"


STUDY_FILE = "study.json"


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def study_summary(study: optuna.Study, settings) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(trial.state.name.lower() for trial in trials)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    best = None
    if complete:
        trial = study.best_trial
        best = {"number": trial.number, "value": trial.value, "params": trial.params,
                "seed": trial.user_attrs.get("seed"), "trial_dir": trial.user_attrs.get("trial_dir")}
    config = settings.config
    ratio = config["data"].get("ratio")
    return {
        "study": settings.study_name, "storage": settings.storage.display(), "study_dir": str(settings.study_dir),
        "method": config["method_name"], "dataset": config["dataset"], "profile": config["profile"],
        "labeled": config["data"]["labeled"], "objective": OBJECTIVE, "direction": "maximize",
        "trials": len(trials), **{state: counts.get(state, 0) for state in ("complete", "pruned", "fail", "running", "waiting")},
        "best": best,
        "bench_command": " ".join([
            f"make bench METHOD={config['method_name']} DATASET={config['dataset']}",
            *([f"DATA_ROOT={config['data']['root']}"] if config["data"].get("root") else []),
            f"RATIO={ratio}" if ratio else f"LABELED={config['data']['labeled']}",
            f"PROFILE={config['profile']} FROM_STUDY={settings.study_dir}",
        ]),
        "dashboard_command": f"optuna-dashboard {_dashboard_target(settings.storage)}",
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trial_table": [
            {"number": t.number, "state": t.state.name.lower(), "value": t.value,
             "last_step": max(t.intermediate_values) if t.intermediate_values else None,
             "seed": t.user_attrs.get("seed"), "params": t.params}
            for t in trials
        ],
    }


def _dashboard_target(storage: StorageSpec) -> str:
    return storage.target if storage.kind == "journal" else storage.display()


def write_report(settings) -> dict[str, Any]:
    """summary.json, summary.md and the plots, next to the study (atomic writes: several workers may finish)."""
    quiet_optuna()
    study = optuna.load_study(study_name=settings.study_name, storage=settings.storage.open())
    summary = study_summary(study, settings)
    summary["plots"] = _write_plots(study, settings.study_dir)
    write_atomic(settings.study_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    write_atomic(settings.study_dir / "summary.md", _markdown(summary))
    return summary


ALL_ZERO_WARNING = "warning: every complete trial scored 0, so these importances say nothing about the parameters"


def all_scored_zero(trials: list) -> bool:
    """Whether every trial's objective is 0 (nothing was learned: importances are then fitted to noise-free ties)."""
    return bool(trials) and all(trial.value == 0 for trial in trials)


def _write_plots(study: optuna.Study, folder: Path) -> dict[str, str]:
    """Image files by name, or why a plot was not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = {
        "history": (optuna_plots.plot_optimization_history, 1, "no complete trial"),
        # Importance needs the objective to vary over at least two complete trials.
        "importance": (optuna_plots.plot_param_importances, 2, "fewer than 2 complete trials"),
        "intermediate": (optuna_plots.plot_intermediate_values, 0, ""),
    }
    written = {}
    for name, (plot, needed, reason) in plots.items():
        if len(complete) < needed:
            written[name] = f"not drawn: {reason}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "parameter importances will be equal" on tiny studies
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            if name == "importance" and all_scored_zero(complete):
                figure.text(0.5, 0.98, ALL_ZERO_WARNING, ha="center", va="top", color="red", fontsize=9, wrap=True)
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figure.savefig(folder / f"{name}.png", dpi=100)
            plt.close(figure)
            written[name] = f"{name}.png" + (f" ({ALL_ZERO_WARNING})" if name == "importance" and all_scored_zero(complete) else "")
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            written[name] = f"not drawn: {error}"
            plt.close("all")
    return written


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Study `{summary['study']}`", "",
        f"{summary['method']} on {summary['dataset']} ({summary['profile']} profile), {summary['labeled']} labeled; "
        f"objective: {summary['objective']}.", "",
        f"Trials: {summary['trials']} (complete {summary['complete']}, pruned {summary['pruned']}, failed {summary['fail']}, "
        f"running {summary['running']}, waiting {summary['waiting']}). Storage: `{summary['storage']}`.", "",
    ]
    best = summary["best"]
    if best:
        lines += [f"**Best: trial {best['number']}, validation Dice {best['value']:.4f}** (seed {best['seed']})", "",
                  "| parameter | value |", "| --- | --- |"]
        lines += [f"| `{key}` | {value:.6g} |" if isinstance(value, float) else f"| `{key}` | {value} |" for key, value in best["params"].items()]
        lines += ["", f"Train and test with these values: `{summary['bench_command']}`", ""]
    else:
        lines += ["No complete trial yet.", ""]
    ranked = sorted(summary["trial_table"], key=lambda t: (t["value"] is None, -(t["value"] or 0.0)))
    lines += ["| trial | state | val Dice | last step | params |", "| --- | --- | --- | --- | --- |"]
    for t in ranked[:20]:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        lines.append(f"| {t['number']} | {t['state']} | {value} | {t['last_step'] if t['last_step'] is not None else ''} | {params} |")
    plots = [f"![{name}]({target})" for name, target in summary.get("plots", {}).items() if target.endswith(".png")]
    lines += ["", *plots, "", f"Browse the study: `{summary['dashboard_command']}`", ""]
    return "\n".join(lines)


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\nstudy {summary['study']}: {summary['trials']} trials (complete {summary['complete']}, pruned {summary['pruned']}, "
          f"failed {summary['fail']}, running {summary['running']})")
    best = summary["best"]
    if best:
        print(f"best: trial {best['number']}, validation Dice {best['value']:.4f}, seed {best['seed']}")
        for key, value in best["params"].items():
            print(f"  {key} = {value:.6g}" if isinstance(value, float) else f"  {key} = {value}")
        print(f"train and test it: {summary['bench_command']}")
    else:
        print("no complete trial")
    print(f"summary: {Path(summary['study_dir']) / 'summary.md'}  (json, plots beside it)")
    print(f"dashboard: {summary['dashboard_command']}")


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def resolve_study(reference: str) -> tuple[StorageSpec, str | None, dict[str, Any]]:
    """A study folder (with study.json) or ``STORAGE_URL[#STUDY_NAME]``."""
    folder = Path(reference)
    if (folder / STUDY_FILE).is_file():
        info = json.loads((folder / STUDY_FILE).read_text())
        return StorageSpec.parse(info["storage"], folder), info["study_name"], info
    if folder.is_dir() or "://" not in reference and not reference.startswith("journal:"):
        raise UserError(f"'{reference}' is neither a study folder (with {STUDY_FILE}) nor a storage URL",
                        where="--from-study / FROM_STUDY=", fix="give runs/tune/<study> or STORAGE_URL#STUDY_NAME")
    url, _, name = reference.partition("#")
    return StorageSpec.parse(url, None), name or None, {}


def best_trial_overrides(reference: str, method: str) -> tuple[list[str], str]:
    """``section.key=value`` overrides of the best trial, and a line saying where they come from."""
    quiet_optuna()
    storage_spec, name, _ = resolve_study(reference)
    storage = storage_spec.open()
    names = optuna.get_all_study_names(storage=storage)
    if name is None:
        if len(names) != 1:
            raise UserError(f"the storage holds {len(names)} studies; say which", where=storage_spec.display(),
                            fix=f"append #NAME to the URL; studies: {', '.join(names) or 'none'}")
        name = names[0]
    if name not in names:
        raise UserError(f"no study '{name}' in the storage", where=storage_spec.display(), fix=f"studies: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name, storage=storage)
    tuned_method = study.user_attrs.get("method")
    if tuned_method is not None and tuned_method != method:
        raise UserError(f"study '{name}' tuned method '{tuned_method}', not '{method}'", where=reference,
                        fix=f"use --method {tuned_method} or another study")
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise UserError(f"study '{name}' has no complete trial yet", where=reference, fix="let `make tune` finish some trials")
    best = study.best_trial
    origin = (f"hyperparameters of trial {best.number} of study '{name}' (validation Dice {best.value:.4f}, "
              f"tuned on {study.user_attrs.get('dataset', '?')} / {study.user_attrs.get('profile', '?')} profile)")
    return [override_text(key, value) for key, value in best.params.items()], origin
