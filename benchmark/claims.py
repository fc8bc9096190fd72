"""Against the papers: each method's measured gain over supervised-only beside the gain its paper reports.

One line per method (and config) with finished ``last``-checkpoint rows of a non-smoke profile, per labeled count:

- measured gain: the method's test Dice minus supervised-only's at the same dataset, profile, labeled count and
  seed, mean ± sample std over the seeds both have, in points, with its seed-paired t-test
  (``report.seed_paired_test``: seed k of both draws the same labeled batches, and of a single-network method
  starts from the same weights); beside it the unpaired seed-level test (``report.seed_level_test``: Welch's t-test
  of all the method's seeds against all supervised-only's) and the within-seed per-case Wilcoxon test, which leaves
  out seed-to-seed training variation and so is shown but decides nothing;
- paper gain: the published row of the method (reported.csv) at the labeled count nearest the measured one (nearest
  on a log scale, ties to the smaller count) minus the supervised-only row of the same source at that count. A
  source is the documents its text cites (segments split at " / " and " = ", each cut before its first " (",
  " - " or ";"); two rows share a source when they cite a document in common. Of several published rows at that
  count, one with a same-source baseline wins, then the better trust tag (V, S, M), then file order;
- verdict, by rule, from the seed-paired test: "not testable (fewer than 2 seeds)" with fewer than 2 seeds both
  have, "not resolved (seed-paired p >= 0.05)" when its p is at least 0.05, else "same direction" or "opposite
  direction" by the signs of the mean paired difference and the paper gain.

Full supervision (supervised rows with ratio 1) gets a line per smaller labeled count of supervised-only: its gain
over that count, beside the paper's full-supervision row minus its supervised-only row at the nearest count.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.report import (BASELINE, baseline_rows, config_cell, dice_by_seed, finished_rows, paired_case_test,
                              paired_test_cell, seed_level_test, seed_paired_test, seed_test_cell)

CHECKPOINT = "last"
ALPHA = 0.05
SKIPPED_PROFILES = {"smoke"}
FULL = "full supervision"
TRUST_ORDER = {"V": 0, "S": 1, "M": 2}
VERDICTS = ("same direction", "opposite direction", f"not resolved (seed-paired p >= {ALPHA:g})",
            "not testable (fewer than 2 seeds)")


# ---- published gains --------------------------------------------------------------------------------------
def cited_documents(source: str) -> frozenset[str]:
    """The documents a reported.csv source cites: 'SS-Net MICCAI2022 Tab2 / BCP CVPR2023 Tab2 - unverified' ->
    {'SS-Net MICCAI2022 Tab2', 'BCP CVPR2023 Tab2'}; notes in parentheses or after ' - ' are not documents."""
    documents = set()
    for segment in re.split(r" / | = ", str(source)):
        name = re.split(r" \(| - | -- |;", segment, maxsplit=1)[0].strip()
        if name:
            documents.add(name)
    return frozenset(documents)


def _is_full(reported: pd.DataFrame) -> pd.Series:
    return reported["labeled_ratio"].astype(str).str.strip() == "100%"


def nearest_count(available: list[int], labeled: int) -> int | None:
    """The labeled count nearest ``labeled`` on a log scale (3 -> 7 is as far as 7 -> 16); ties go to the smaller."""
    if not available:
        return None
    return min(sorted(set(available)), key=lambda count: abs(math.log(count / labeled)))


def published_gain(reported: pd.DataFrame, dataset: str, method: str, labeled: int, full: bool = False) -> dict:
    """The paper gain for ``method`` measured at ``labeled`` cases: see the module docstring.
    Returns count (the published split's labeled count, None without a paper row), gain (points, NaN without a
    same-source baseline), method_row and baseline_row (reported rows or None)."""
    rows = reported[reported["dataset"] == dataset]
    supervised_only = rows[(rows["method"] == BASELINE) & ~_is_full(rows)]
    if full:
        candidates = rows[(rows["method"] == BASELINE) & _is_full(rows)]
        count = nearest_count(supervised_only["labeled_cases"].astype(int).tolist(), labeled)
    else:
        candidates = rows[(rows["method"] == method) & ~_is_full(rows)]
        count = nearest_count(candidates["labeled_cases"].astype(int).tolist(), labeled)
        candidates = candidates[candidates["labeled_cases"].astype(int) == count]
    if candidates.empty:
        return {"count": None, "gain": np.nan, "method_row": None, "baseline_row": None}
    baselines = supervised_only[supervised_only["labeled_cases"].astype(int) == count]
    choices = []
    for order, (_, candidate) in enumerate(candidates.iterrows()):
        documents = cited_documents(candidate["source"])
        same_source = [b for _, b in baselines.iterrows() if documents & cited_documents(b["source"])]
        same_source.sort(key=lambda b: TRUST_ORDER.get(b["trust"], 9))
        baseline = same_source[0] if same_source else None
        choices.append((baseline is None, TRUST_ORDER.get(candidate["trust"], 9), order, candidate, baseline))
    _, _, _, chosen, baseline = min(choices, key=lambda choice: choice[:3])
    gain = float(chosen["dice"]) - float(baseline["dice"]) if baseline is not None else np.nan
    return {"count": count, "gain": gain, "method_row": chosen, "baseline_row": baseline}


# ---- measured gains ---------------------------------------------------------------------------------------
def verdict(mean_difference: float, p_value: float, paper_gain: float) -> str:
    """The rule of the verdict column, from the seed-paired test's mean difference and p (NaN: fewer than 2
    seeds both have) and the paper gain."""
    if pd.isna(paper_gain):
        return "no paper gain to compare"
    if pd.isna(p_value) or pd.isna(mean_difference):
        return VERDICTS[3]
    if p_value >= ALPHA:
        return VERDICTS[2]
    if paper_gain == 0:
        return "paper reports no difference"
    return VERDICTS[0] if np.sign(mean_difference) == np.sign(paper_gain) else VERDICTS[1]


def _is_full_row(rows: pd.DataFrame) -> pd.Series:
    if "ratio" not in rows:
        return pd.Series(False, index=rows.index)
    return pd.to_numeric(rows["ratio"], errors="coerce") == 1.0


def _measured(ours: pd.DataFrame, theirs: pd.DataFrame, base: Path, leaderboard_dir: Path | None) -> dict:
    """Per-seed Dice gains (points) of ``ours`` over ``theirs`` (indexed by seed) with their paired test, the
    seed-level test over all seeds of both and the within-seed per-case test."""
    pairs = [(row["dataset"], row["seed"], row["checkpoint"], row["run_dir"], theirs.loc[row["seed"], "run_dir"])
             for _, row in ours.iterrows() if row["seed"] in theirs.index]
    test = paired_case_test(pairs, base, leaderboard_dir)
    seed_test = seed_level_test(ours["dice"].dropna(), theirs["dice"].dropna())
    paired = seed_paired_test(dice_by_seed(ours), dice_by_seed(theirs.reset_index()))
    return {"n": paired["paired_n"], "gain_mean": paired["paired_mean_difference"] * 100,
            "gain_std": paired["paired_std"] * 100, **test, **seed_test, **paired}


def claims(table: pd.DataFrame, reported: pd.DataFrame, base: Path = Path("."),
           leaderboard_dir: Path | None = None) -> pd.DataFrame:
    """One record per (profile, labeled count, method, config) of ``table``'s finished last-checkpoint rows, with
    the measured gain, its paired test, the paper gain and the verdict."""
    rows = finished_rows(table)
    if "run_dir" not in rows:
        rows["run_dir"] = ""
    rows = rows[(rows["checkpoint"] == CHECKPOINT) & ~rows["profile"].isin(SKIPPED_PROFILES)]
    full = _is_full_row(rows)
    baselines = baseline_rows(rows[~full | (rows["method"] != BASELINE)])
    records = []

    def record(dataset, profile, labeled, method, digest, measured, paper, full_cases=None):
        records.append({"dataset": dataset, "profile": profile, "labeled_cases": int(labeled), "method": method,
                        "full_cases": full_cases,
                        "config_hash": digest, **measured, "paper_count": paper["count"], "paper_gain": paper["gain"],
                        "paper_method_row": paper["method_row"], "paper_baseline_row": paper["baseline_row"],
                        "verdict": verdict(measured["paired_mean_difference"], measured["paired_p_value"], paper["gain"])})

    def split_baseline(dataset, profile, labeled):
        keys = [(d, p, c, k, s) for d, p, c, k, s in baselines.index if (d, p, c, k) == (dataset, profile, labeled, CHECKPOINT)]
        return baselines.loc[keys].reset_index().set_index("seed") if keys else pd.DataFrame(columns=["dice", "run_dir"]).rename_axis("seed")

    # Full supervision against supervised-only at every smaller count with supervised rows.
    for (dataset, profile, labeled, digest), group in rows[full & (rows["method"] == BASELINE)].groupby(
            ["dataset", "profile", "labeled_cases", "config_hash"], sort=True):
        smaller = sorted({c for d, p, c, _, _ in baselines.index if (d, p) == (dataset, profile) and c < labeled})
        for count in smaller:
            measured = _measured(group, split_baseline(dataset, profile, count), base, leaderboard_dir)
            record(dataset, profile, count, FULL, digest, measured, published_gain(reported, dataset, BASELINE, count, full=True),
                   full_cases=int(labeled))
    for (dataset, profile, labeled, method, digest), group in rows[rows["method"] != BASELINE].groupby(
            ["dataset", "profile", "labeled_cases", "method", "config_hash"], sort=True):
        measured = _measured(group, split_baseline(dataset, profile, labeled), base, leaderboard_dir)
        record(dataset, profile, labeled, method, digest, measured, published_gain(reported, dataset, method, int(labeled)))
    if not records:
        return pd.DataFrame(records)
    ordered = pd.DataFrame(records)
    ordered["_method_order"] = ordered["method"] != FULL
    ordered = ordered.sort_values(["dataset", "profile", "labeled_cases", "_method_order", "method", "config_hash"], kind="stable")
    return ordered.drop(columns="_method_order").reset_index(drop=True)


# ---- rendering --------------------------------------------------------------------------------------------
def _published_cell(record: dict) -> str:
    chosen, baseline = record["paper_method_row"], record["paper_baseline_row"]
    if chosen is None:
        return "no paper row"
    split = f"{int(chosen['labeled_cases'])} labeled ({chosen['labeled_ratio']})"
    if record["method"] == FULL and record["paper_count"] is not None:
        split = f"{int(record['paper_count'])} labeled vs all {int(chosen['labeled_cases'])}"
    text = f"{split}: {chosen['method_reported']} {chosen['dice']:.2f} [{chosen['trust']}], {chosen['source']}"
    if baseline is None:
        return text + "; no baseline reported"
    return text + f"; baseline {baseline['method_reported']} {baseline['dice']:.2f} [{baseline['trust']}], {baseline['source']}"


def claims_table(records: pd.DataFrame, configs: dict[str, str] | None = None) -> str:
    headers = ["Method", "Profile", "Labeled", "Config", "n seeds",
               "Measured gain: seed-paired ΔDice ± std (points), paired t-test p (seeds both have)",
               "Seed-level Welch p (n method / n supervised)",
               "Within-seed per-case test: ΔDice, Wilcoxon p (cases × seeds; no seed variation)", "Paper gain (points)",
               "Paper split and source [trust]",
               "Verdict"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for record in records.to_dict("records"):
        gain = paired_test_cell(record)
        test = "–" if not record["pairs"] else (
            f"{record['mean_difference'] * 100:+.2f}, p = {record['p_value']:.3g} ({record['pairs']} × {record['seeds']})")
        paper = "–" if pd.isna(record["paper_gain"]) else f"{record['paper_gain']:+.2f}"
        if record["paper_method_row"] is not None and pd.isna(record["paper_gain"]):
            paper = "no baseline reported"
        method = record["method"] if record["method"] != FULL else f"{FULL} (all {int(record['full_cases'])})"
        cells = [method, record["profile"], str(record["labeled_cases"]), config_cell(record["config_hash"], configs),
                 str(record["n"]), gain, seed_test_cell(record), test, paper, _published_cell(record), record["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
