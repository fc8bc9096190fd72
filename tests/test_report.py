"""Leaderboard reports on a made-up leaderboard with known means, stds and per-case differences."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.leaderboard import append_rows
from benchmark.report import (REPORTED_COLUMNS, aggregate, convert_reported, load_reported, method_slug, paired_tests,
                              seed_level_test, seed_paired_test)
from tests.conftest import PROJECT_ROOT
from tests.leaderboard_helpers import write_per_case

CASES = ["c0", "c1", "c2", "c3"]  # the names write_per_case gives
SUPERVISED_CASE_DICE = [0.5, 0.6, 0.7, 0.8]


def row(method, seed, dice, profile="cpu", labeled=7, checkpoint="last", status="ok", digest=None, run_dir="",
        cpu_time_s=""):
    return dict(dataset="acdc", method=method, profile=profile, labeled_cases=labeled, seed=seed, checkpoint=checkpoint,
                dice=dice, jaccard=dice - 0.1, hd95=5.0 + seed, asd=1.0, status=status,
                config_hash=digest or f"{method[:4]}{profile}{labeled}", run_dir=run_dir, units="voxel",
                cpu_time_s=cpu_time_s)


@pytest.fixture
def board(tmp_path) -> Path:
    """cpu profile, 7 labeled: supervised Dice 0.6/0.7/0.8 over seeds 0-2 (mean 70, std 10), mean_teacher 0.7/0.8/0.9
    (mean 80, std 10) whose per-case Dice beats supervised by 0.01 x (1..12) over the 12 (seed, case) pairs
    (seed 0: cases 1-4, seed 1: 5-8, seed 2: 9-12);
    cps without per-case files; a paper-profile supervised row next to the published 79.41."""
    folder = tmp_path / "leaderboards"
    rows = [row("supervised", 0, 0.10)]  # superseded by the later row of the same hash, seed and checkpoint
    step = 1
    for seed, (sup, mt) in enumerate([(0.6, 0.7), (0.7, 0.8), (0.8, 0.9)]):
        sup_dir = write_per_case(tmp_path / "runs" / f"sup{seed}", SUPERVISED_CASE_DICE)
        differences = [0.01 * (step + i) for i in range(len(CASES))]
        step += len(CASES)
        mt_dir = write_per_case(tmp_path / "runs" / f"mt{seed}", [d + x for d, x in zip(SUPERVISED_CASE_DICE, differences)])
        # CPU time: mean_teacher seeds 0 and 1 recorded 1200 and 1800 s, seed 2 (an older row) nothing.
        rows += [row("supervised", seed, sup, run_dir=sup_dir),
                 row("mean_teacher", seed, mt, run_dir=mt_dir, cpu_time_s=[1200.0, 1800.0, ""][seed])]
    rows += [row("mean_teacher", 3, 0.0, status="failed"), row("cps", 0, 0.5), row("cps", 1, 0.5),
             row("supervised", 0, 0.79, profile="paper")]
    append_rows(folder / "acdc.csv", rows)
    reported = pd.DataFrame([
        dict(dataset="acdc", labeled_ratio="10%", labeled_cases=7, method="supervised", method_reported="U-Net (sup. only)",
             profile="paper", dice=79.41, jaccard=68.11, hd95=9.35, asd=2.70, units="percent/voxel", trust="M", source="SS-Net Tab2"),
        dict(dataset="acdc", labeled_ratio="10%", labeled_cases=7, method="bcp", method_reported="BCP",
             profile="paper", dice=88.84, jaccard=80.62, hd95=3.98, asd=1.17, units="percent/voxel", trust="S", source="TraCoCo docs"),
    ], columns=REPORTED_COLUMNS)
    reported.to_csv(folder / "reported.csv", index=False)
    return folder


def test_aggregate_means_stds_and_counts(board):
    from benchmark.leaderboard import read_leaderboard

    summary = aggregate(read_leaderboard(board / "acdc.csv")).set_index(["profile", "method"])
    assert summary.loc[("cpu", "supervised"), "dice_mean"] == pytest.approx(0.70)
    assert summary.loc[("cpu", "supervised"), "dice_std"] == pytest.approx(0.10)  # sample std of 0.6, 0.7, 0.8
    assert summary.loc[("cpu", "supervised"), "n"] == 3 and summary.loc[("cpu", "supervised"), "seeds"] == "0 1 2"
    assert summary.loc[("cpu", "mean_teacher"), "dice_mean"] == pytest.approx(0.80) and summary.loc[("cpu", "mean_teacher"), "n"] == 3
    assert summary.loc[("cpu", "mean_teacher"), "hd95_mean"] == pytest.approx(6.0)  # 5 + seed over seeds 0..2
    assert summary.loc[("cpu", "cps"), "dice_std"] == pytest.approx(0.0)
    assert summary.loc[("cpu", "mean_teacher"), "cpu_time_s_mean"] == pytest.approx(1500.0)  # the two that recorded it
    assert summary.loc[("cpu", "mean_teacher"), "cpu_time_n"] == 2 and summary.loc[("cpu", "cps"), "cpu_time_n"] == 0
    assert summary.loc[("paper", "supervised"), "n"] == 1 and pd.isna(summary.loc[("paper", "supervised"), "dice_std"])
    assert list(summary.reset_index().query("profile == 'cpu'")["method"])[0] == "supervised"


def test_wilcoxon_against_supervised_on_paired_cases(board):
    from benchmark.leaderboard import read_leaderboard

    tests = paired_tests(read_leaderboard(board / "acdc.csv")).set_index("method")
    # One pair per case, its difference averaged over the 3 seeds: case i gets 0.01 x mean(1+i, 5+i, 9+i) =
    # 0.01 x (5+i), i = 0..3. Four positive differences of distinct sizes: W- = 0, exact two-sided p = 2 / 2**4.
    # Pooling the 12 (seed, case) pairs instead would treat the same 4 patients as 12 independent cases.
    assert tests.loc["mean_teacher", "pairs"] == len(CASES) == 4 and tests.loc["mean_teacher", "seeds"] == 3
    assert tests.loc["mean_teacher", "p_value"] == pytest.approx(2 / 2**4)
    assert tests.loc["mean_teacher", "mean_difference"] == pytest.approx(0.065)  # mean of 0.01 x (5..8)
    assert tests.loc["cps", "pairs"] == 0 and pd.isna(tests.loc["cps", "p_value"])


def welch_p_by_hand(ours: list[float], theirs: list[float]) -> float:
    """Welch's two-sided p from its formula: t = difference of means / sqrt(s1²/n1 + s2²/n2), Welch-Satterthwaite
    degrees of freedom, and P(|T| > |t|) = 1 - 2 x the integral of Student's t density from 0 to |t| (Simpson's
    rule; the density from math.gamma), with no statistics library."""
    def mean(x):
        return sum(x) / len(x)

    def share(x):  # s² / n
        return sum((v - mean(x)) ** 2 for v in x) / (len(x) - 1) / len(x)

    t = abs(mean(ours) - mean(theirs)) / math.sqrt(share(ours) + share(theirs))
    df = (share(ours) + share(theirs)) ** 2 / (share(ours) ** 2 / (len(ours) - 1) + share(theirs) ** 2 / (len(theirs) - 1))
    scale = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def density(x):
        return scale * (1 + x * x / df) ** (-(df + 1) / 2)

    steps = 2000
    h = t / steps
    integral = h / 3 * sum((1 if i in (0, steps) else 4 if i % 2 else 2) * density(i * h) for i in range(steps + 1))
    return 1 - 2 * integral


def test_seed_level_welch_test_against_its_formula():
    # Two seeds a side with equal variances: 2 degrees of freedom, where P(|T| > t) = 1 - t / sqrt(2 + t²);
    # t = 0.10 / sqrt(0.0008 / 2 + 0.0008 / 2) = 5 / sqrt(2), so p = 1 - (5 / sqrt 2) / sqrt(14.5) = 0.0715.
    test = seed_level_test([0.70, 0.74], [0.60, 0.64])
    t = 5 / math.sqrt(2)
    assert test["seed_p_value"] == pytest.approx(1 - t / math.sqrt(2 + t**2))
    assert test["seed_p_value"] == pytest.approx(0.0715, abs=1e-4)
    assert welch_p_by_hand([0.70, 0.74], [0.60, 0.64]) == pytest.approx(test["seed_p_value"], abs=1e-9)
    assert (test["seed_n_ours"], test["seed_n_theirs"]) == (2, 2) and test["seed_mean_difference"] == pytest.approx(0.10)
    # Unequal counts and spreads: non-integer degrees of freedom (about 2.4), no closed form.
    ours, theirs = [0.71, 0.78, 0.74], [0.73, 0.70, 0.76, 0.74, 0.72]
    assert seed_level_test(ours, theirs)["seed_p_value"] == pytest.approx(welch_p_by_hand(ours, theirs), abs=1e-9)
    swapped, test = seed_level_test(theirs, ours), seed_level_test(ours, theirs)
    assert swapped["seed_mean_difference"] == pytest.approx(-test["seed_mean_difference"])
    assert swapped["seed_p_value"] == pytest.approx(test["seed_p_value"])


def test_seed_paired_test_against_its_formula():
    # Differences 0.04, 0.03, 0.02 on seeds 0-2 (seed 3 has no pair): mean 0.03, sample std 0.01,
    # t = 0.03 / (0.01 / sqrt 3) = 5.196 with 2 degrees of freedom, where P(|T| > t) = 1 - t / sqrt(2 + t²).
    test = seed_paired_test({0: 0.70, 1: 0.74, 2: 0.71}, {0: 0.66, 1: 0.71, 2: 0.69, 3: 0.90})
    t = 0.03 / (0.01 / math.sqrt(3))
    assert test["paired_n"] == 3 and test["paired_mean_difference"] == pytest.approx(0.03)
    assert test["paired_std"] == pytest.approx(0.01)
    assert test["paired_p_value"] == pytest.approx(1 - t / math.sqrt(2 + t**2)) and test["paired_p_value"] < 0.05
    # The same numbers unpaired: the seed-to-seed spread (0.70-0.74 against 0.66-0.90) hides the difference.
    assert seed_level_test([0.70, 0.74, 0.71], [0.66, 0.71, 0.69, 0.90])["seed_p_value"] > 0.5
    assert pd.isna(seed_paired_test({0: 0.8, 1: 0.9}, {1: 0.7, 2: 0.6})["paired_p_value"])  # one pair
    assert seed_paired_test({0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.8})["paired_p_value"] == 0.0  # equal differences
    assert seed_paired_test({0: 0.8, 1: 0.9}, {0: 0.8, 1: 0.9})["paired_p_value"] == 1.0
    assert seed_paired_test({}, {0: 0.8})["paired_n"] == 0


def test_seed_level_test_needs_two_seeds_a_side():
    one_seed = seed_level_test([0.8], [0.6, 0.7, 0.8])
    assert pd.isna(one_seed["seed_p_value"]) and one_seed["seed_mean_difference"] == pytest.approx(0.1)
    assert (one_seed["seed_n_ours"], one_seed["seed_n_theirs"]) == (1, 3)
    assert pd.isna(seed_level_test([0.8, 0.9], [0.6])["seed_p_value"])
    assert pd.isna(seed_level_test([0.8, 0.9], [])["seed_mean_difference"])
    # No spread on either side: equal means give p = 1, different ones p = 0 (scipy alone answers NaN).
    assert seed_level_test([0.7, 0.7], [0.7, 0.7])["seed_p_value"] == 1.0
    assert seed_level_test([0.8, 0.8], [0.7, 0.7])["seed_p_value"] == 0.0


def test_seed_level_tests_use_every_seed_of_each_side(board):
    from benchmark.leaderboard import read_leaderboard

    tests = paired_tests(read_leaderboard(board / "acdc.csv")).set_index("method")
    mean_teacher = tests.loc["mean_teacher"]
    assert (mean_teacher["seed_n_ours"], mean_teacher["seed_n_theirs"]) == (3, 3)
    assert mean_teacher["seed_p_value"] == pytest.approx(welch_p_by_hand([0.7, 0.8, 0.9], [0.6, 0.7, 0.8]), abs=1e-9)
    # cps has seeds 0 and 1 only and no per-case files: no within-seed test, but a seed-level one against all three
    # supervised seeds (the failed mean_teacher row and the paper-profile supervised row do not count).
    cps = tests.loc["cps"]
    assert cps["pairs"] == 0 and (cps["seed_n_ours"], cps["seed_n_theirs"]) == (2, 3)
    assert cps["seed_mean_difference"] == pytest.approx(-0.2)
    assert cps["seed_p_value"] == pytest.approx(welch_p_by_hand([0.5, 0.5], [0.6, 0.7, 0.8]), abs=1e-9)


def test_paired_tests_fall_back_to_the_per_case_copies_beside_the_leaderboard(board):
    # A clone of the repository has the leaderboard and its per_case/ copies, not the run folders.
    import shutil

    from benchmark.leaderboard import per_case_archive, read_leaderboard

    table = read_leaderboard(board / "acdc.csv")
    for run_dir in filter(None, table["run_dir"].unique()):
        archived = per_case_archive(board, "acdc", Path(run_dir).name, "last")
        archived.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(run_dir) / "test_per_case_last.csv", archived)
    assert paired_tests(table).set_index("method").loc["mean_teacher", "pairs"] == 0  # run folders emptied
    tests = paired_tests(table, leaderboard_dir=board).set_index("method")
    assert tests.loc["mean_teacher", "pairs"] == 4 and tests.loc["mean_teacher", "seeds"] == 3
    assert tests.loc["mean_teacher", "p_value"] == pytest.approx(2 / 2**4)


def test_render_markdown_and_plot(board, tmp_path, capsys):
    out = tmp_path / "rendered"
    assert main(["leaderboard", "--dir", str(board), "--out", str(out)]) == 0
    assert "README.md" in capsys.readouterr().out
    text = (out / "README.md").read_text()
    cpu_part, paper_part = text.split("### acdc, `cpu` profile")[1].split("### acdc, `paper` profile")
    assert "| supervised | 7 | last | 3 | 70.00 ± 10.00 | 60.00 ± 10.00 |" in cpu_part
    # ΔDice: the seed means 80 - 70; Welch t = 10 / sqrt(100/3 + 100/3) with 4 degrees of freedom: p = 0.288.
    assert "| mean_teacher | 7 | last | 3 | 80.00 ± 10.00 |" in cpu_part
    # Seed-paired: +0.10 on each of the three seeds, no spread: p = 0 by convention (scipy alone answers NaN).
    assert "| +10.00 | +10.00 ± 0.00, p = 0 (3) | 0.288 (3 / 3) | +6.50, p = 0.125 (4 × 3) | 25 (2) |" in cpu_part
    # cps seeds 0 and 1 (0.5, 0.5) against supervised-only's (0.6, 0.7): differences -0.1, -0.2; t = 3 with one
    # degree of freedom, where P(|T| > t) = 1 - 2 / pi * atan(t) = 0.205.
    assert f"{1 - 2 / math.pi * math.atan(3):.3g}" == "0.205"
    assert ("| cps | 7 | last | 2 | 50.00 ± 0.00 | 40.00 ± 0.00 | 5.50 ± 0.71 | 1.00 ± 0.00 | -20.00 | "
            "-15.00 ± 7.07, p = 0.205 (2) | 0.0742 (2 / 3) | – | – |") in cpu_part
    assert "Seed-paired test: ΔDice ± std, p (seeds both have)" in cpu_part
    assert "Seed-level Welch p (n method / n supervised)" in cpu_part and "no seed variation" in cpu_part
    assert "79.41" not in cpu_part and "Published" not in cpu_part  # published numbers only beside paper rows
    paper_rows = paper_part.split("### acdc: published numbers")[0]
    assert "| supervised | 7 | last | 1 | 79.00 |" in paper_rows and "79.41 [M] U-Net (sup. only), SS-Net Tab2" in paper_rows
    assert "| 7 (10%) | BCP (`bcp`) | 88.84 |" in text
    for profile in ("cpu", "paper"):
        png = out / f"acdc_{profile}_dice.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text
    assert not (board / "README.md").exists()


def test_unknown_dataset_and_missing_folder(board, tmp_path, capsys):
    assert main(["leaderboard", "--dir", str(board), "--datasets", "la"]) == 2
    assert "no leaderboard CSV for la" in capsys.readouterr().err
    assert main(["leaderboard", "--dir", str(tmp_path / "nowhere")]) == 2


def test_convert_reported_keeps_sources_and_trust_tags(tmp_path):
    source = tmp_path / "reported_results.csv"
    source.write_text(
        "dataset,labeled_ratio,labeled_cases,method,dice,jaccard,hd95,asd,source\n"
        "LA,10%,8,MC-Net+,88.96,80.25,7.93,1.86,[V] MC-Net repo performance.txt (MC-Net+ MedIA2022)\n"
        "ACDC,5%,3,U-Net (sup. only),47.83,37.01,31.16,12.62,[M] SS-Net MICCAI2022 Tab2 - unverified\n"
        "ACDC,10%,7,SS-Net,86.78,77.67,6.07,1.40,[S] TraCoCo docs/results.md\n"
    )
    converted = convert_reported(source, tmp_path / "out" / "reported.csv")
    assert converted["method"].tolist() == ["mc_net_plus", "supervised", "ss_net"]
    assert converted["dataset"].tolist() == ["la", "acdc", "acdc"] and converted["trust"].tolist() == ["V", "M", "S"]
    assert converted["source"][0] == "MC-Net repo performance.txt (MC-Net+ MedIA2022)"
    assert (converted["profile"] == "paper").all() and converted["dice"][0] == pytest.approx(88.96)
    assert load_reported(tmp_path / "out" / "reported.csv")["method_reported"][1] == "U-Net (sup. only)"


def test_slugs_of_published_method_names():
    assert [method_slug(n) for n in ("LG-ER-MT", "FBA-Net+", "V-Net (full)", "BCP")] == ["lg_er_mt", "fba_net_plus", "supervised", "bcp"]


def test_committed_reported_csv():
    reported = load_reported(PROJECT_ROOT / "leaderboards" / "reported.csv")
    assert len(reported) == 83 and set(reported["trust"]) == {"V", "S", "M"}
    assert set(reported["dataset"]) == {"acdc", "la", "brats2019"} and (reported["source"] != "").all()
    mc_net_plus_acdc_7 = reported.query("dataset == 'acdc' and method == 'mc_net_plus' and labeled_cases == 7")
    assert mc_net_plus_acdc_7["dice"].tolist() == [87.10] and mc_net_plus_acdc_7["trust"].tolist() == ["V"]


def test_the_tables_come_first_then_the_reading_then_a_link_to_the_superseded_rows_reading(board, tmp_path):
    from benchmark.leaderboard_page import READING_FILE, SUPERSEDED_FOLDER, render_leaderboards

    (board / READING_FILE).write_text("## Reading\n\nMean Teacher beats supervised by 10 points.\n")
    text = render_leaderboards(board)[0].read_text()
    assert text.index("### acdc, `cpu` profile") < text.index("Mean Teacher beats supervised")
    assert "earlier protocols" not in text  # no superseded reading, no link
    (board / SUPERSEDED_FOLDER).mkdir()
    (board / SUPERSEDED_FOLDER / READING_FILE).write_text("# History\n")
    for out in (board, tmp_path / "elsewhere"):  # the link resolves from wherever the page is written
        page = render_leaderboards(board, out=out)[0]
        rendered = page.read_text()
        assert rendered.index("Mean Teacher beats supervised") < rendered.index("earlier protocols")
        target = rendered.rsplit("](", 1)[1].split(")")[0]
        assert (page.parent / target).resolve() == (board / SUPERSEDED_FOLDER / READING_FILE).resolve()


def test_validation_curves_average_seeds_and_are_plotted(board, tmp_path):
    # The curves archived beside the leaderboard (one per run) become one line per method: the mean over seeds at
    # each step, so a reader sees whether a row had finished learning.
    from benchmark.leaderboard import curve_archive
    from benchmark.report import mean_validation_curves

    table = pd.read_csv(board / "acdc.csv")
    for seed, offset in enumerate([0.0, 0.1, 0.2]):
        run = table[(table["method"] == "supervised") & (table["seed"] == seed) & (table["profile"] == "cpu")
                    & (table["dice"] > 0.5)]["run_dir"].iloc[0]
        path = curve_archive(board, "acdc", Path(run).name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"stage": "train", "step": [250, 500], "val/dice": [0.3 + offset, 0.5 + offset]}).to_csv(path, index=False)
    curves = mean_validation_curves(table[table["profile"] == "cpu"], board, "acdc")
    supervised = curves[curves["method"] == "supervised"].set_index("step")
    assert supervised.loc[250, "dice"] == pytest.approx(0.4) and supervised.loc[500, "dice"] == pytest.approx(0.6)
    assert (supervised["seeds"] == 3).all() and "mean_teacher" not in set(curves["method"])  # no curves archived
    out = tmp_path / "rendered"
    assert main(["leaderboard", "--dir", str(board), "--out", str(out)]) == 0
    png = out / "acdc_cpu_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in (out / "README.md").read_text()
    assert not (out / "acdc_paper_curves.png").exists()  # no curve archived for the paper row


def test_the_config_column_reads_the_configs_archived_beside_the_leaderboard(tmp_path):
    # A clone has the leaderboard and its configs/ copies, not the run folders: the page must describe each row
    # the same on any machine.
    import yaml

    from benchmark.config import resolve_config
    from benchmark.leaderboard import config_archive, read_leaderboard
    from benchmark.report import config_descriptions
    from methods.registry import get_method

    folder = tmp_path / "leaderboards"
    run_dir = tmp_path / "gone" / "L7_s0_abc_1"  # never created
    append_rows(folder / "acdc.csv", [row("supervised", 0, 0.7, digest="abc", run_dir=str(run_dir))])
    config = resolve_config("acdc", "supervised", "cpu", ["trainer.max_steps=2000"], get_method("supervised").defaults)
    config["data"]["patch_size"] = [128, 128]
    archived = config_archive(folder, "acdc", run_dir.name)
    archived.parent.mkdir(parents=True)
    archived.write_text(yaml.safe_dump({**config, "config_hash": "abc"}))
    table = read_leaderboard(folder / "acdc.csv")
    assert config_descriptions(table, base=tmp_path) == {}  # no archive given, no run folder
    assert config_descriptions(table, base=tmp_path, archive=folder) == {"abc": "trainer.max_steps=2000"}
