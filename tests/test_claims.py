"""The 'against the papers' table on a made-up leaderboard and reported table with hand-computable gains."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from benchmark.claims import cited_documents, claims, nearest_count, published_gain, verdict
from benchmark.leaderboard import append_rows
from benchmark.leaderboard_page import render_leaderboards
from benchmark.report import REPORTED_COLUMNS, load_reported
from tests.leaderboard_helpers import write_per_case

CASES = [f"c{i}" for i in range(6)]
SUPERVISED = [0.5, 0.6, 0.7, 0.8, 0.9, 0.4]  # seed s adds 0.02 * s; mean 0.65 at seed 0, 0.67 at seed 1
# Per-case differences (method - supervised) per seed. Six distinct positive (or negative) differences give the
# exact two-sided Wilcoxon p = 2 / 2**6 = 0.03125 < 0.05.
RISING = [0.001 * i for i in range(6)]
DIFFERENCES = {
    "mean_teacher": {0: [0.10 + r for r in RISING], 1: [0.06 + r for r in RISING]},  # +10.25 and +6.25 points
    "cps": {0: [-0.08 - r for r in RISING], 1: [-0.08 - r for r in RISING]},          # -8.25 twice
    "ua_mt": {0: [0.03, -0.02, 0.01, -0.04, 0.05, -0.06],                            # -0.50, ranks + 9 / - 12
              1: [0.03, -0.02, 0.01, -0.04, 0.06, -0.06]},                           # -0.33
    "mc_net_plus": {0: [0.10 + r for r in RISING]},
    "fba_net": {0: [0.10 + r for r in RISING]},
}


def welch_p_with_two_degrees_of_freedom(ours: list[float], theirs: list[float]) -> float:
    """Welch's two-sided p from its formula, for two seeds a side with equal sample variances: then the
    Welch-Satterthwaite degrees of freedom are exactly 2, where Student's t has the closed-form tail
    P(|T| > t) = 1 - t / sqrt(2 + t**2)."""
    def mean(x):
        return sum(x) / len(x)

    def variance(x):
        return sum((v - mean(x)) ** 2 for v in x) / (len(x) - 1)

    assert len(ours) == len(theirs) == 2 and math.isclose(variance(ours), variance(theirs))
    t = abs(mean(ours) - mean(theirs)) / math.sqrt(variance(ours) / 2 + variance(theirs) / 2)
    return 1 - t / math.sqrt(2 + t**2)


def row(method, seed, case_dice, runs: Path | None, labeled=7, ratio=0.1, checkpoint="last", profile="cpu"):
    run_dir = write_per_case(runs / f"{method}_{labeled}_{seed}_{checkpoint}_{profile}", case_dice) if runs else ""
    dice = sum(case_dice) / len(case_dice)
    return dict(dataset="acdc", method=method, profile=profile, labeled_cases=labeled, seed=seed, checkpoint=checkpoint,
                dice=dice, jaccard=dice, hd95=1.0, asd=1.0, status="ok", config_hash=f"{method[:6]}{profile[:3]}{labeled}",
                run_dir=run_dir, units="voxel", ratio=ratio)


def paper(method, labeled, dice, source, trust="M", ratio=None, name=None):
    return dict(dataset="acdc", labeled_ratio=ratio or f"{labeled / 70:.0%}", labeled_cases=labeled, method=method,
                method_reported=name or method, profile="paper", dice=dice, jaccard=0.0, hd95=0.0, asd=0.0,
                units="percent/voxel", trust=trust, source=source)


REPORTED = [
    paper("supervised", 7, 79.0, "Paper A Tab1 - unverified", name="U-Net (sup. only)"),
    paper("supervised", 70, 91.0, "Paper A Tab1", ratio="100%", name="U-Net (full)"),
    paper("mean_teacher", 7, 84.0, "Paper A Tab1 / Paper Z Tab3 - unverified"),  # +5.00 over Paper A's baseline
    paper("cps", 7, 80.0, "Paper A Tab1"),                                   # +1.00
    paper("mms", 7, 82.0, "Paper A Tab1"),                                   # +3.00
    # ua_mt: at 3 and 14 labeled, each with a same-source baseline; 14 is the nearer to 7 on a log scale.
    paper("supervised", 3, 50.0, "Paper B Tab2 (pixel units)"), paper("ua_mt", 3, 49.0, "Paper B Tab2"),
    paper("supervised", 14, 85.0, "Paper B Tab2"), paper("ua_mt", 14, 87.5, "Paper B Tab2 - unverified"),
    # mc_net_plus: only its repository's file, which has no supervised-only row.
    paper("mc_net_plus", 7, 87.1, "MC-Net repo performance.txt (MC-Net+ MedIA2022)", trust="V"),
]


@pytest.fixture
def board(tmp_path) -> Path:
    folder = tmp_path / "leaderboards"
    runs = tmp_path / "runs"
    rows = []
    for seed in (0, 1):
        rows.append(row("supervised", seed, [d + 0.02 * seed for d in SUPERVISED], runs))
    for seed in (0, 1):
        rows.append(row("supervised", seed, [d + 0.02 * seed + 0.2 + r for d, r in zip(SUPERVISED, RISING)], runs,
                        labeled=70, ratio=1.0))
    for method, by_seed in DIFFERENCES.items():
        for seed, differences in by_seed.items():
            rows.append(row(method, seed, [d + 0.02 * seed + x for d, x in zip(SUPERVISED, differences)], runs))
    rows.append(row("mms", 0, [d + 0.1 for d in SUPERVISED], runs=None))  # no per-case file: no paired test
    rows.append(row("cps", 0, [0.0] * 6, runs, checkpoint="best"))         # only the last checkpoint counts
    rows.append(row("cps", 0, [0.0] * 6, runs, profile="smoke"))           # smoke runs are not compared
    append_rows(folder / "acdc.csv", rows)
    pd.DataFrame(REPORTED, columns=REPORTED_COLUMNS).to_csv(folder / "reported.csv", index=False)
    return folder


@pytest.fixture
def records(board) -> pd.DataFrame:
    table = pd.read_csv(board / "acdc.csv", dtype=str, keep_default_na=False)
    return claims(table, load_reported(board / "reported.csv"), base=board.parent).set_index("method")


def test_measured_gains_are_per_seed_differences_with_their_paired_test(records):
    mean_teacher = records.loc["mean_teacher"]
    assert mean_teacher["n"] == 2 and mean_teacher["gain_mean"] == pytest.approx(8.25)
    assert mean_teacher["gain_std"] == pytest.approx(2 ** 1.5)  # sqrt((2² + 2²) / 1)
    assert mean_teacher["mean_difference"] == pytest.approx(0.0825) and mean_teacher["p_value"] == pytest.approx(0.03125)
    assert (mean_teacher["pairs"], mean_teacher["seeds"]) == (6, 2)
    # Seed level: Dice 0.7525 and 0.7325 against supervised-only's 0.65 and 0.67.
    assert (mean_teacher["seed_n_ours"], mean_teacher["seed_n_theirs"]) == (2, 2)
    assert mean_teacher["seed_mean_difference"] == pytest.approx(0.0825)
    assert mean_teacher["seed_p_value"] == pytest.approx(welch_p_with_two_degrees_of_freedom([0.7525, 0.7325], [0.65, 0.67]))
    assert records.loc["cps", "gain_mean"] == pytest.approx(-8.25) and records.loc["cps", "gain_std"] == pytest.approx(0)
    ua_mt = records.loc["ua_mt"]  # Dice is stored to 6 significant digits: the gains match to a thousandth of a point
    assert ua_mt["gain_mean"] == pytest.approx(-2.5 / 6, abs=1e-3) and ua_mt["gain_std"] == pytest.approx((1 / 6) / math.sqrt(2), abs=1e-3)
    assert records.loc["ua_mt", "p_value"] > 0.05 and records.loc["ua_mt", "seed_p_value"] > 0.05
    assert records.loc["mms", "gain_mean"] == pytest.approx(10.0) and records.loc["mms", "pairs"] == 0
    assert records.loc["mms", "seed_n_ours"] == 1 and pd.isna(records.loc["mms", "seed_p_value"])


def test_paper_gains_come_from_the_same_source_at_the_nearest_split(records):
    assert records.loc["mean_teacher", "paper_gain"] == pytest.approx(5.0)
    assert records.loc["cps", "paper_gain"] == pytest.approx(1.0)
    assert records.loc["ua_mt", "paper_count"] == 14 and records.loc["ua_mt", "paper_gain"] == pytest.approx(2.5)
    # A published row without a same-source supervised-only row gives no gain: never another paper's baseline.
    assert records.loc["mc_net_plus", "paper_count"] == 7 and pd.isna(records.loc["mc_net_plus", "paper_gain"])
    assert records.loc["mc_net_plus", "paper_baseline_row"] is None
    assert pd.isna(records.loc["fba_net", "paper_count"])  # no paper row at all


def one_degree_of_freedom_p(differences: list[float]) -> float:
    """The paired t-test's two-sided p for two pairs from its formula: one degree of freedom, where Student's t
    is Cauchy and P(|T| > t) = 1 - 2 / pi * atan(t)."""
    mean = sum(differences) / 2
    std = math.sqrt(sum((d - mean) ** 2 for d in differences))
    return 1 - 2 / math.pi * math.atan(abs(mean) / (std / math.sqrt(2)))


def test_verdicts_follow_the_rule(records):
    # mean_teacher: +10.25 and +6.25 points paired by seed; the seed-level Welch test says p = 0.028, the paired
    # test, which decides, p = 0.151 with one degree of freedom: two seeds that disagree by 4 points resolve nothing.
    assert records.loc["mean_teacher", "paired_p_value"] == pytest.approx(one_degree_of_freedom_p([10.25, 6.25]))
    assert records.loc["mean_teacher", "verdict"] == "not resolved (seed-paired p >= 0.05)"  # paper +5
    assert records.loc["cps", "verdict"] == "opposite direction"               # -8.25 on both seeds; paper +1
    assert records.loc["full supervision", "verdict"] == "same direction"      # +20.25 on both seeds; paper +12
    assert records.loc["ua_mt", "paired_p_value"] == pytest.approx(one_degree_of_freedom_p([-0.5, -1 / 3]), abs=1e-3)
    assert records.loc["ua_mt", "verdict"] == "not resolved (seed-paired p >= 0.05)"  # paper +2.5
    assert records.loc["mc_net_plus", "verdict"] == "no paper gain to compare"
    assert records.loc["fba_net", "verdict"] == "no paper gain to compare"
    assert records.loc["mms", "verdict"] == "not testable (fewer than 2 seeds)"  # one seed; paper +3
    assert verdict(0.01, 0.049, -3.0) == "opposite direction" and verdict(0.01, 0.049, 3.0) == "same direction"
    assert verdict(0.01, 0.05, -3.0) == "not resolved (seed-paired p >= 0.05)"
    assert verdict(0.01, float("nan"), 3.0) == "not testable (fewer than 2 seeds)"


def test_seed_noise_of_one_method_is_no_verdict(tmp_path):
    """The measured problem in miniature: 'mean_teacher' here is supervised-only trained again (the same model
    under another name), whose seeds land a few points apart on every case. Paired by seed, every case moves the
    same way, so the within-seed per-case Wilcoxon test gives its smallest possible p; across seeds the offsets
    are noise, and the seed-level tests (the paired one decides the verdict) do not call them a method effect."""
    offsets = {"supervised": [0.00, 0.04, -0.02], "mean_teacher": [0.05, 0.01, 0.03]}  # per seed, every case
    runs, rows = tmp_path / "runs", []
    for method, by_seed in offsets.items():
        for seed, offset in enumerate(by_seed):
            jitter = RISING if method != "supervised" else [0.0] * 6  # distinct per-case differences: exact test
            rows.append(row(method, seed, [d + offset + j for d, j in zip(SUPERVISED, jitter)], runs))
    append_rows(tmp_path / "acdc.csv", rows)
    table = pd.read_csv(tmp_path / "acdc.csv", dtype=str, keep_default_na=False)
    record = claims(table, pd.DataFrame(REPORTED, columns=REPORTED_COLUMNS)).set_index("method").loc["mean_teacher"]
    # Per case, the difference averaged over seeds is +0.0233 (+ jitter) on all 6 cases: exact p = 2 / 2**6.
    assert record["pairs"] == 6 and record["p_value"] == pytest.approx(2 / 2**6) and record["p_value"] < 0.05
    assert record["seed_p_value"] > 0.2 and record["paired_p_value"] > 0.2
    assert record["verdict"] == "not resolved (seed-paired p >= 0.05)"  # the per-case test alone said "same direction"
    assert verdict(record["mean_difference"], record["p_value"], record["paper_gain"]) == "same direction"


def test_full_supervision_against_each_smaller_count(records):
    full = records.loc["full supervision"]
    assert full["labeled_cases"] == 7 and full["n"] == 2 and full["gain_mean"] == pytest.approx(20.25)
    assert full["paper_gain"] == pytest.approx(12.0) and full["verdict"] == "same direction"
    assert "cps" in records.index and len(records) == 7  # best checkpoint and smoke rows left out


def test_rendered_table_says_which_split_and_source_and_is_deterministic(board, tmp_path):
    first = render_leaderboards(board, out=tmp_path / "a")[0].read_text()
    second = render_leaderboards(board, out=tmp_path / "b")[0].read_text()
    assert first == second
    section = first[first.index("### acdc: against the papers"):first.index("### acdc: published numbers")]
    lines = {line.split(" | ")[0].strip("| ").split(" (all")[0]: line for line in section.splitlines() if line.startswith("| ")}
    seed_p = welch_p_with_two_degrees_of_freedom([0.7525, 0.7325], [0.65, 0.67])
    paired_p = one_degree_of_freedom_p([10.25, 6.25])
    assert (f"| +8.25 ± 2.83, p = {paired_p:.3g} (2) | {seed_p:.3g} (2 / 2) | +8.25, p = 0.0312 (6 × 2) | +5.00 |"
            in lines["mean_teacher"])
    assert "| +10.00 (1) | – (1 / 2) |" in lines["mms"]  # one seed: the difference, no test
    assert "| – (1 / 2) | – |" in lines["mms"] and lines["mms"].endswith("| not testable (fewer than 2 seeds) |")
    assert "7 labeled (10%): mean_teacher 84.00 [M], Paper A Tab1 / Paper Z Tab3" in lines["mean_teacher"]
    assert "baseline U-Net (sup. only) 79.00 [M], Paper A Tab1 - unverified" in lines["mean_teacher"]
    assert "| no baseline reported |" in lines["mc_net_plus"] and lines["mc_net_plus"].endswith("| no paper gain to compare |")
    assert "| no paper row |" in lines["fba_net"]
    assert "14 labeled (20%): ua_mt 87.50" in lines["ua_mt"] and "not resolved (seed-paired p >= 0.05)" in lines["ua_mt"]
    assert lines["full supervision"].startswith("| full supervision (all 70) | cpu | 7 |")
    assert "7 labeled vs all 70: U-Net (full) 91.00" in lines["full supervision"]
    assert list(lines)[1:3] == ["full supervision", "cps"]  # after the header: full supervision first, then a-z


def test_cited_documents_and_nearest_count():
    assert cited_documents("SS-Net MICCAI2022 Tab2 / BCP CVPR2023 Tab2 (mean of RV/Myo/LV) - unverified") == {
        "SS-Net MICCAI2022 Tab2", "BCP CVPR2023 Tab2"}
    assert cited_documents("DTC README LA table (16 labeled) = UA-MT MICCAI2019") == {"DTC README LA table", "UA-MT MICCAI2019"}
    assert cited_documents("FBA-Net README (commit e86a7c8) -- WARNING: ...") == {"FBA-Net README"}
    assert nearest_count([3, 14], 7) == 14 and nearest_count([4, 16], 8) == 4 and nearest_count([], 7) is None


def test_trust_decides_between_published_rows_with_a_baseline():
    reported = pd.DataFrame([
        paper("supervised", 7, 79.0, "Paper A"), paper("supervised", 7, 78.0, "Repo R"),
        paper("ua_mt", 7, 81.0, "Paper A", trust="M"), paper("ua_mt", 7, 84.0, "Repo R", trust="V"),
        paper("ua_mt", 7, 90.0, "Paper Q", trust="V"),  # no baseline of its own: loses to both
    ], columns=REPORTED_COLUMNS)
    chosen = published_gain(reported, "acdc", "ua_mt", 7)
    assert chosen["gain"] == pytest.approx(6.0) and chosen["method_row"]["source"] == "Repo R"
