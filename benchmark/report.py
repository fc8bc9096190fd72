"""Leaderboard statistics, tables and plots: mean +- std over seeds, paired tests against the supervised baseline.

benchmark/leaderboard_page.py assembles them into ``leaderboards/README.md`` (``make leaderboard``):

- per dataset and profile one table of mean +- std over seeds (with n) per method, labeled count and checkpoint
  kind (``last``, ``best`` on validation); for the ``paper`` profile the published numbers of ``reported.csv``
  stand beside the reproduced ones (never beside the reduced ``cpu``/``smoke`` protocols);
- ``<dataset>_<profile>_dice.png``: test Dice against the labeled count per method (error bars: std over seeds);
- ``<dataset>_<profile>_curves.png``: validation Dice against the training step per method and labeled count, the
  mean over seeds of the curves archived with the rows (``curves/<dataset>/<run>.csv``);
- in the tables, three tests of each method against ``supervised`` on the same split (labeled count) and checkpoint
  kind. The seed-paired test (a paired t-test on the per-seed test Dice of the seeds both have; seed k of both
  draws the same labeled batches) is the one that counts. The seed-level test (Welch's unpaired t-test on the
  per-seed test Dice of all seeds each side has) stands beside it. The within-seed test (Wilcoxon signed-rank, one pair per
  test case, the per-case Dice of the two runs of a seed from ``test_per_case_<checkpoint>.csv``, its difference
  averaged over the seeds both have) does not: two seeds of the same method already differ by a few points on
  nearly every case, so its p-value measures that gap, not a method effect.

Only rows with status ``ok`` count; a repeated (config hash, seed, checkpoint) keeps its latest row. Rows of one
method with different config hashes (other overrides, changed presets) are different experiments and get
separate lines.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from benchmark.leaderboard import config_archive, curve_archive, per_case_archive
from core.errors import UserError

METRICS = ("dice", "jaccard", "hd95", "asd")
GROUP_KEYS = ["dataset", "profile", "method", "labeled_cases", "checkpoint", "config_hash"]
BASELINE = "supervised"
REPORTED_FILE = "reported.csv"
TRUST_TAGS = {
    "V": "verified against a primary artefact (the authors' performance.txt or their own README table)",
    "S": "secondary copy in a third-party README",
    "M": "from the paper's table as remembered, not verified against the PDF",
}
# Published method names -> registry names. Others become their lower-case slug (SS-Net -> ss_net, BCP -> bcp),
# the name a later implementation of that method is expected to register.
REPORTED_METHOD_NAMES = {
    "U-Net (sup. only)": "supervised", "V-Net (sup. only)": "supervised",
    "U-Net (full)": "supervised", "V-Net (full)": "supervised",
    "UA-MT": "ua_mt", "MC-Net+": "mc_net_plus", "FBA-Net": "fba_net", "FBA-Net+": "fba_net_plus",
}
REPORTED_COLUMNS = ["dataset", "labeled_ratio", "labeled_cases", "method", "method_reported", "profile",
                    "dice", "jaccard", "hd95", "asd", "units", "trust", "source"]


# ---- reported.csv -------------------------------------------------------------------------------------------
def method_slug(name: str) -> str:
    if name in REPORTED_METHOD_NAMES:
        return REPORTED_METHOD_NAMES[name]
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]", "_", name.lower().replace("+", "_plus"))).strip("_")


def convert_reported(source: Path, out: Path) -> pd.DataFrame:
    """``reported_results.csv`` (shared reference) -> ``leaderboards/reported.csv``: suite dataset and method names
    beside the published ones, the trust tag ([V]/[S]/[M]) in its own column, the source text kept whole.
    Numbers stay as published: Dice and Jaccard in %, HD95 and ASD in voxels (pixels for 2D sets)."""
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    tags = table["source"].str.extract(r"^\s*\[([A-Z])\]\s*(.*)$")
    if tags[0].isna().any():
        raise UserError("a reported row has no trust tag ([V], [S] or [M]) at the start of its source", where=str(source))
    converted = pd.DataFrame({
        "dataset": table["dataset"].str.lower(),
        "labeled_ratio": table["labeled_ratio"],
        "labeled_cases": table["labeled_cases"].astype(int),
        "method": table["method"].map(method_slug),
        "method_reported": table["method"],
        "profile": "paper",
        **{metric: table[metric].astype(float) for metric in METRICS},
        "units": "percent/voxel",
        "trust": tags[0],
        "source": tags[1].str.strip(),
    }, columns=REPORTED_COLUMNS)
    out.parent.mkdir(parents=True, exist_ok=True)
    converted.to_csv(out, index=False)
    return converted


def load_reported(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=REPORTED_COLUMNS)
    table = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in REPORTED_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"reported.csv lacks columns {missing}", where=str(path), fix="rebuild it with benchmark.report.convert_reported")
    return table


# ---- aggregation --------------------------------------------------------------------------------------------
def finished_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows with status ok, metrics as numbers, the latest row of each (dataset, hash, seed, checkpoint)."""
    ok = table[table["status"] == "ok"].copy()
    for metric in METRICS:
        ok[metric] = pd.to_numeric(ok[metric], errors="coerce")
    ok["labeled_cases"] = pd.to_numeric(ok["labeled_cases"], errors="coerce").astype("Int64")
    ok["seed"] = ok["seed"].astype(str)
    return ok.drop_duplicates(["dataset", "config_hash", "seed", "checkpoint"], keep="last")


def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof 1; NaN for one seed) over seeds, with n, per GROUP_KEYS; the mean CPU seconds of
    the runs that recorded them and how many did (cpu_time_s_mean, cpu_time_n)."""
    rows = finished_rows(table)
    if rows.empty:
        return pd.DataFrame(columns=[*GROUP_KEYS, "n", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
                                     "cpu_time_s_mean", "cpu_time_n"])
    if "units" not in rows:
        rows["units"] = "voxel"
    # CPU seconds per run where the row recorded them (older rows did not): the cost on a shared machine.
    rows["_cpu_time_s"] = pd.to_numeric(rows["cpu_time_s"], errors="coerce") if "cpu_time_s" in rows else np.nan
    grouped = rows.groupby(GROUP_KEYS, sort=False, dropna=False)
    summary = grouped[list(METRICS)].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary["cpu_time_s_mean"] = grouped["_cpu_time_s"].mean()
    summary["cpu_time_n"] = grouped["_cpu_time_s"].count()
    summary["n"] = grouped.size()
    summary["seeds"] = grouped["seed"].agg(lambda seeds: " ".join(sorted(seeds, key=lambda s: (len(s), s))))
    summary["units"] = grouped["units"].first()
    summary = summary.reset_index()
    summary["_baseline_last"] = summary["method"] != BASELINE
    summary = summary.sort_values(["dataset", "profile", "labeled_cases", "checkpoint", "_baseline_last", "method"], kind="stable")
    return summary.drop(columns="_baseline_last").reset_index(drop=True)


# ---- paired tests against the supervised baseline ---------------------------------------------------------
def per_case_dice(run_dir: str, checkpoint: str, base: Path, archive: Path | None = None) -> pd.Series | None:
    """Mean Dice over the foreground classes per test case, or None without a per-case file: the run folder's
    own, else the copy archived beside the leaderboard (``archive`` = (leaderboard folder, dataset))."""
    if not run_dir:
        return None
    folder = Path(run_dir)
    if not folder.is_absolute():
        folder = base / folder
    path = folder / f"test_per_case_{checkpoint}.csv"
    if not path.is_file() and archive is not None:
        path = per_case_archive(archive[0], archive[1], folder.name, checkpoint)
    if not path.is_file():
        return None
    per_case = pd.read_csv(path)
    return per_case.groupby("case", sort=False)["dice"].mean()


def paired_case_test(pairs: Iterable[tuple], base: Path = Path("."), leaderboard_dir: Path | None = None) -> dict:
    """Wilcoxon signed-rank test over test cases of runs paired by seed: ``pairs`` holds (dataset, seed, checkpoint,
    run folder of ours, run folder of theirs). A case's difference (ours - theirs, per-case Dice) is averaged over
    the seeds both runs have per-case files for, so each test case is one pair: pooled (case, seed) pairs would
    treat one patient's repeated measurements under several seeds as independent cases.
    Returns pairs (cases), seeds, mean_difference and p_value (NaN without a per-case file)."""
    from scipy.stats import wilcoxon

    by_case: dict[str, list[float]] = {}
    seeds = set()
    for dataset, seed, checkpoint, ours_dir, theirs_dir in pairs:
        archive = None if leaderboard_dir is None else (leaderboard_dir, dataset)
        ours = per_case_dice(ours_dir, checkpoint, base, archive)
        theirs = per_case_dice(theirs_dir, checkpoint, base, archive)
        if ours is None or theirs is None:
            continue
        paired = pd.concat([ours.rename("ours"), theirs.rename("theirs")], axis=1, join="inner")
        for case, difference in (paired["ours"] - paired["theirs"]).items():
            by_case.setdefault(case, []).append(float(difference))
        seeds.add(seed)
    differences = np.asarray([np.mean(values) for values in by_case.values()], dtype=float)
    p_value = np.nan
    if differences.size and np.any(differences != 0):
        p_value = float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)
    elif differences.size:
        p_value = 1.0  # identical predictions on every case
    return {"pairs": int(differences.size), "seeds": len(seeds),
            "mean_difference": float(differences.mean()) if differences.size else np.nan, "p_value": p_value}


SPLIT_KEYS = ["dataset", "profile", "labeled_cases", "checkpoint", "seed"]


def baseline_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The supervised row each other method is compared with: the latest of each split (dataset, profile, labeled
    count, checkpoint kind, seed), indexed by SPLIT_KEYS."""
    if "run_dir" not in rows:
        rows = rows.assign(run_dir="")
    return rows[rows["method"] == BASELINE].drop_duplicates(SPLIT_KEYS, keep="last").set_index(SPLIT_KEYS)


def seed_level_test(ours: Iterable[float], theirs: Iterable[float]) -> dict:
    """Welch's t-test (unequal variances) of the per-seed test Dice of ``ours`` against ``theirs``: one number per
    trained model, so the run-to-run variation of training is in the test. Needs at least 2 seeds on each side.
    Returns seed_n_ours, seed_n_theirs, seed_mean_difference (ours - theirs, mean over seeds; NaN without seeds)
    and seed_p_value (NaN when a side has fewer than 2 seeds: not testable)."""
    from scipy.stats import ttest_ind

    ours = np.asarray([float(x) for x in ours], dtype=float)
    theirs = np.asarray([float(x) for x in theirs], dtype=float)
    difference = float(ours.mean() - theirs.mean()) if ours.size and theirs.size else np.nan
    p_value = np.nan
    if ours.size >= 2 and theirs.size >= 2:
        if np.ptp(ours) == 0 and np.ptp(theirs) == 0:
            # No spread on either side (scipy answers NaN): equal means are no evidence, different ones certain.
            p_value = 1.0 if difference == 0 else 0.0
        else:
            with warnings.catch_warnings():
                # Repeated Dice on one side (its variance exactly 0) is a valid input, not lost precision.
                warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
                p_value = float(ttest_ind(ours, theirs, equal_var=False).pvalue)
    return {"seed_n_ours": int(ours.size), "seed_n_theirs": int(theirs.size),
            "seed_mean_difference": difference, "seed_p_value": p_value}


def seed_paired_test(ours: Mapping[Any, float], theirs: Mapping[Any, float]) -> dict:
    """Paired t-test of the per-seed test Dice over the seeds both ``ours`` and ``theirs`` (seed -> Dice) have.

    Seed k of any method and seed k of supervised-only draw the same labeled batches, and a method with
    supervised-only's single network starts from the same weights (tests/test_seed_pairing.py), so the per-seed
    difference leaves out most of the run-to-run variation that the unpaired (Welch) test has to carry. Needs 2
    pairs. Returns paired_n, paired_mean_difference (ours - theirs), paired_std (sample std of the differences)
    and paired_p_value (NaN with fewer than 2 pairs; with all differences equal, 1 if they are 0, else 0)."""
    from scipy.stats import ttest_1samp

    seeds = sorted(set(ours) & set(theirs))
    differences = np.asarray([float(ours[s]) - float(theirs[s]) for s in seeds], dtype=float)
    result = {"paired_n": len(seeds), "paired_mean_difference": float(differences.mean()) if seeds else np.nan,
              "paired_std": float(differences.std(ddof=1)) if len(seeds) > 1 else np.nan, "paired_p_value": np.nan}
    if len(seeds) >= 2:
        if np.ptp(differences) < 1e-9:  # equal up to float rounding (Dice is stored to far fewer digits): no spread
            result["paired_p_value"] = 1.0 if abs(differences[0]) < 1e-9 else 0.0
        else:
            with warnings.catch_warnings():
                # Nearly equal differences are a valid input, not lost precision.
                warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
                result["paired_p_value"] = float(ttest_1samp(differences, 0.0).pvalue)  # = the paired t-test
    return result


SEED_TEST_COLUMNS = ["seed_n_ours", "seed_n_theirs", "seed_mean_difference", "seed_p_value"]
PAIRED_TEST_COLUMNS = ["paired_n", "paired_mean_difference", "paired_std", "paired_p_value"]


def paired_tests(table: pd.DataFrame, base: Path = Path("."), leaderboard_dir: Path | None = None) -> pd.DataFrame:
    """Per non-baseline group of ``aggregate``, the three tests against supervised-only at the same dataset,
    profile, labeled count and checkpoint kind: ``seed_paired_test`` over the seeds both have, ``seed_level_test``
    of the group's per-seed Dice against every seed of the supervised rows (``baseline_rows``), and
    ``paired_case_test`` of per-case Dice against the supervised run of the same seed (within-seed).
    Columns: the GROUP_KEYS, the within-seed pairs (cases), seeds, mean_difference (method - supervised) and
    p_value, then SEED_TEST_COLUMNS and PAIRED_TEST_COLUMNS."""
    rows = finished_rows(table)
    if "run_dir" not in rows:
        rows["run_dir"] = ""
    baseline = baseline_rows(rows)
    results = []
    for key, group in rows[rows["method"] != BASELINE].groupby(GROUP_KEYS, sort=False, dropna=False):
        pairs = []
        for _, row in group.iterrows():
            split = tuple(row[k] for k in SPLIT_KEYS)
            if split in baseline.index:
                pairs.append((row["dataset"], row["seed"], row["checkpoint"], row["run_dir"], baseline.loc[split, "run_dir"]))
        split = tuple(group.iloc[0][k] for k in SPLIT_KEYS[:-1])
        same_split = [index[:-1] == split for index in baseline.index]
        seed_test = seed_level_test(group["dice"].dropna(), baseline.loc[same_split, "dice"].dropna())
        paired = seed_paired_test(dice_by_seed(group), dice_by_seed(baseline.loc[same_split].reset_index()))
        results.append({**dict(zip(GROUP_KEYS, key)), **paired_case_test(pairs, base, leaderboard_dir), **seed_test,
                        **paired})
    return pd.DataFrame(results, columns=[*GROUP_KEYS, "pairs", "seeds", "mean_difference", "p_value", *SEED_TEST_COLUMNS,
                                          *PAIRED_TEST_COLUMNS])


def dice_by_seed(rows: pd.DataFrame) -> dict:
    """Seed -> test Dice of finished rows with a Dice (one row per seed: the last one written wins)."""
    rows = rows.dropna(subset=["dice"])
    return dict(zip(rows["seed"], rows["dice"].astype(float)))


# ---- rendering ----------------------------------------------------------------------------------------------
def _mean_std(mean: float, std: float, scale: float, digits: int) -> str:
    if pd.isna(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if not pd.isna(std) else "")


def _published(reported: pd.DataFrame, dataset: str, method: str, labeled: int) -> str:
    match = reported[(reported["dataset"] == dataset) & (reported["method"] == method) & (reported["labeled_cases"] == labeled)]
    return "; ".join(f"{r.dice:.2f} [{r.trust}] {r.method_reported}, {r.source}" for r in match.itertuples()) or "–"


def config_descriptions(table: pd.DataFrame, base: Path = Path("."), archive: Path | None = None) -> dict[str, str]:
    """Per config hash, what its config changes from its profile's defaults, read from the config.yaml of one of
    its runs: the copy archived beside the leaderboard (``archive``: the leaderboard folder) or, when there is
    none, the run folder if it is at hand."""
    import yaml

    from benchmark.run_report import describe_differences, differences_from_defaults

    described: dict[str, str] = {}
    if "run_dir" not in table:
        return described
    for digest, rows in finished_rows(table).groupby("config_hash", sort=False):
        for row in rows.dropna(subset=["run_dir"]).itertuples():
            run_dir = Path(str(row.run_dir))
            candidates = [] if archive is None else [config_archive(archive, str(row.dataset), run_dir.name)]
            candidates.append((run_dir if run_dir.is_absolute() else base / run_dir) / "config.yaml")
            path = next((candidate for candidate in candidates if candidate.is_file()), None)
            if path is None:
                continue
            try:
                config = yaml.safe_load(path.read_text())
                config.pop("config_hash", None)
                described[str(digest)] = describe_differences(differences_from_defaults(config))
            except Exception:  # noqa: BLE001 - an old or foreign config only costs its description
                continue
            break
    return described


def config_cell(digest: str, configs: dict[str, str] | None) -> str:
    """What the config changes from the profile's defaults, with its hash; the hash alone when unknown."""
    described = (configs or {}).get(str(digest))
    return f"{described} (`{digest}`)" if described else f"`{digest}`"


def cpu_minutes_cell(mean_seconds: float, runs: int) -> str:
    """'23 (3)': mean CPU minutes of the runs that recorded them; '–' when none did."""
    return "–" if not runs or pd.isna(mean_seconds) else f"{mean_seconds / 60:.0f} ({int(runs)})"


def paired_test_cell(test) -> str:
    """'-2.36 ± 1.02, p = 0.057 (3)' for a seed-paired test (points); with one pair its difference alone,
    '+1.24 (1)'; '–' without pairs."""
    n = int(test["paired_n"])
    if n == 0:
        return "–"
    if pd.isna(test["paired_p_value"]):
        return f"{test['paired_mean_difference'] * 100:+.2f} ({n})"
    return (f"{test['paired_mean_difference'] * 100:+.2f} ± {test['paired_std'] * 100:.2f}, "
            f"p = {test['paired_p_value']:.3g} ({n})")


def seed_test_cell(test) -> str:
    """'0.0715 (2 / 3)' for a seed-level test, '– (1 / 5)' when a side has fewer than 2 seeds (not testable)."""
    counts = f"({int(test['seed_n_ours'])} / {int(test['seed_n_theirs'])})"
    return f"– {counts}" if pd.isna(test["seed_p_value"]) else f"{test['seed_p_value']:.3g} {counts}"


def markdown_table(summary: pd.DataFrame, tests: pd.DataFrame, reported: pd.DataFrame | None,
                   configs: dict[str, str] | None = None) -> str:
    headers = ["Method", "Labeled", "Checkpoint", "n", "Dice %", "Jaccard %", "HD95", "ASD",
               "ΔDice vs supervised (seed means)",
               "Seed-paired test: ΔDice ± std, p (seeds both have)",
               "Seed-level Welch p (n method / n supervised)",
               "Within-seed per-case test: ΔDice, Wilcoxon p (cases × seeds; no seed variation)",
               "CPU min per run (runs that recorded it)",
               "Config (changes from the profile's defaults)"]
    if reported is not None:
        headers.append("Published Dice % [trust] (source)")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    indexed = tests.set_index(GROUP_KEYS) if not tests.empty else None
    for row in summary.itertuples(index=False):
        key = tuple(getattr(row, k) for k in GROUP_KEYS)
        difference, paired_text, seed_text, p_text = "baseline", "–", "–", "–"
        if row.method != BASELINE:
            difference = "–"
            if indexed is not None and key in indexed.index:
                test = indexed.loc[key]
                seed_text, paired_text = seed_test_cell(test), paired_test_cell(test)
                if not pd.isna(test["seed_mean_difference"]):
                    difference = f"{test['seed_mean_difference'] * 100:+.2f}"
                if test["pairs"]:
                    p_text = (f"{test['mean_difference'] * 100:+.2f}, p = {test['p_value']:.3g} "
                              f"({int(test['pairs'])} × {int(test['seeds'])})")
        cells = [row.method, str(row.labeled_cases), row.checkpoint, str(row.n),
                 _mean_std(row.dice_mean, row.dice_std, 100, 2), _mean_std(row.jaccard_mean, row.jaccard_std, 100, 2),
                 _mean_std(row.hd95_mean, row.hd95_std, 1, 2), _mean_std(row.asd_mean, row.asd_std, 1, 2),
                 difference, paired_text, seed_text, p_text, cpu_minutes_cell(row.cpu_time_s_mean, row.cpu_time_n),
                 config_cell(row.config_hash, configs)]
        if reported is not None:
            cells.append(_published(reported, row.dataset, row.method, int(row.labeled_cases)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reported_table(reported: pd.DataFrame) -> str:
    lines = ["| Labeled | Method | Dice % | Jaccard % | HD95 | ASD | Trust | Source |", "|---|---|---|---|---|---|---|---|"]
    for r in reported.sort_values(["labeled_cases", "method"], kind="stable").itertuples():
        lines.append(f"| {r.labeled_cases} ({r.labeled_ratio}) | {r.method_reported} (`{r.method}`) | {r.dice:.2f} | "
                     f"{r.jaccard:.2f} | {r.hd95:.2f} | {r.asd:.2f} | {r.trust} | {r.source} |")
    return "\n".join(lines)


def clipped_error_bars(mean: pd.Series, std: pd.Series, low: float = 0.0, high: float = 100.0) -> np.ndarray:
    """(2, n) lower and upper bar lengths of mean +- std, cut at the metric's range (Dice cannot leave 0..100 %)."""
    std = std.fillna(0).to_numpy(dtype=float)
    mean = mean.to_numpy(dtype=float)
    return np.stack([np.minimum(std, mean - low), np.minimum(std, high - mean)]).clip(min=0)


def seed_offsets(methods: list[str], spread: float = 0.06) -> dict[str, float]:
    """A fixed horizontal offset per method (a factor on the log axis): seeds of methods with equal Dice (e.g. all
    at 0) sit side by side instead of one method's points hiding the other's."""
    if len(methods) < 2:
        return {name: 1.0 for name in methods}
    return {name: float(np.exp(spread * (i / (len(methods) - 1) - 0.5))) for i, name in enumerate(methods)}


def _panels(count: int):
    """A headless figure of ``count`` side-by-side panels sharing the y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, count, figsize=(5.5 * count, 4), squeeze=False, sharey=True)


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_dice(summary: pd.DataFrame, path: Path, title: str, seeds: pd.DataFrame | None = None) -> Path:
    """Dice (%) against the labeled count per method, one panel per checkpoint kind; error bars = std over seeds
    (clipped to 0..100 %); ``seeds`` (finished rows) adds each seed's Dice as a hollow point beside its method's."""
    kinds = list(dict.fromkeys(summary["checkpoint"]))
    figure, axes = _panels(len(kinds))
    for axis, kind in zip(axes[0], kinds):
        # One line per method (its config hash changes with the labeled count, so it cannot be the line key).
        part = summary[summary["checkpoint"] == kind]
        offsets = seed_offsets(list(dict.fromkeys(part["method"])))
        for method, line in part.groupby("method", sort=False):
            line = line.sort_values("labeled_cases")
            label = method
            drawn = axis.errorbar(line["labeled_cases"].astype(int) * offsets[method], line["dice_mean"] * 100,
                                  yerr=clipped_error_bars(line["dice_mean"] * 100, line["dice_std"] * 100),
                                  marker="o", capsize=3, label=label)
            if seeds is not None:
                points = seeds[(seeds["checkpoint"] == kind) & (seeds["method"] == method)]
                axis.scatter(points["labeled_cases"].astype(int) * offsets[method], points["dice"] * 100, s=14,
                             facecolors="none", edgecolors=drawn.lines[0].get_color(), linewidths=0.8, zorder=3)
        axis.set_xscale("log")
        counts = sorted(summary["labeled_cases"].astype(int).unique())
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.minorticks_off()
        axis.set_xlabel("labeled cases")
        axis.set_title(f"{title}, {kind} checkpoint")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test Dice (%)")
    axes[0][-1].legend(fontsize=8)
    return _save(figure, path)


def mean_validation_curves(table: pd.DataFrame, folder: Path, dataset: str) -> pd.DataFrame:
    """Per (labeled count, method, config): validation Dice against step, averaged over the seeds whose curve is
    archived (leaderboard rows of the `last` checkpoint; one curve per run)."""
    rows = finished_rows(table)
    rows = rows[rows["checkpoint"] == "last"]
    curves = []
    for row in rows.itertuples():
        path = curve_archive(folder, dataset, Path(str(row.run_dir)).name)
        if not path.is_file():
            continue
        curve = pd.read_csv(path)
        if curve.empty or "val/dice" not in curve:
            continue
        curves.append(curve.assign(labeled_cases=int(row.labeled_cases), method=row.method, config_hash=row.config_hash,
                                   seed=row.seed)[["labeled_cases", "method", "config_hash", "seed", "step", "val/dice"]])
    if not curves:
        return pd.DataFrame(columns=["labeled_cases", "method", "config_hash", "step", "dice", "seeds"])
    joined = pd.concat(curves, ignore_index=True)
    return (joined.groupby(["labeled_cases", "method", "config_hash", "step"], sort=True)["val/dice"]
            .agg(dice="mean", seeds="count").reset_index())


def plot_curves(curves: pd.DataFrame, path: Path, title: str) -> Path:
    """Validation Dice (%) against training step, one panel per labeled count, one line per method (mean over
    seeds): a row whose line still climbs at its last step had not finished learning."""
    counts = sorted(curves["labeled_cases"].unique())
    figure, axes = _panels(len(counts))
    for axis, count in zip(axes[0], counts):
        for (method, digest), line in curves[curves["labeled_cases"] == count].groupby(["method", "config_hash"], sort=False):
            axis.plot(line["step"], line["dice"] * 100, marker=".", label=f"{method} (n={int(line['seeds'].max())})")
        axis.set_xlabel("training step")
        axis.set_title(f"{title}, {count} labeled")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation Dice (%), mean over seeds")
    axes[0][-1].legend(fontsize=7)
    return _save(figure, path)


if __name__ == "__main__":
    # Rebuild reported.csv from a CSV of collected published numbers (run once; the output is committed):
    #   python -m benchmark.report SOURCE.csv leaderboards/reported.csv
    import sys

    convert_reported(Path(sys.argv[1]), Path(sys.argv[2]))
