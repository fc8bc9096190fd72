"""`make perf` in quick mode: every section runs and the report has its structure (no timing is asserted)."""
from __future__ import annotations

import json
import statistics

import pytest

from benchmark.perf.__main__ import SECTIONS, main
from tests.conftest import require_real_acdc


@pytest.mark.slow
@pytest.mark.real_data
def test_quick_perf_writes_the_whole_report(tmp_path, one_torch_thread):
    acdc = require_real_acdc()
    assert main(["--quick", "--out", str(tmp_path), "--acdc-root", str(acdc), "--methods", "supervised"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quick"] is True and report["errors"] == {}
    assert set(report["sections"]) == set(SECTIONS)
    sections = report["sections"]
    metrics = sections["metrics"]
    assert set(metrics["acdc_per_class"]) == {"RV", "Myo", "LV"}
    for group in [*metrics["acdc_per_class"].values(), metrics["la_sized"]]:
        assert max(group["largest_difference_to_medpy"].values()) <= 1e-6
        assert group["speedup_vs_medpy"] > 0 and "monai_hd95_minus_medpy_hd95" in group
    score = sections["score"]
    assert score["parallel_equals_serial"] and max(score["largest_difference_to_medpy"].values()) <= 1e-6
    assert score["speedup_one_process"] > 0 and score["speedup_parallel"] > 0 and score["cases"] == 2
    window = sections["sliding_window"]
    assert window["label_maps_equal"] and window["windows_la_sized_volume"] == 72 and window["speedup"] > 0
    step = sections["training_step"]["methods"]["supervised"]
    assert step["ratio"] > 0 and step["bare_step_median_s"] > 0
    assert step["cpu_ratio"] > 0 and step["suite_cpu_step_median_s"] > 0 and step["bare_cpu_step_median_s"] > 0
    assert 0 < step["framework"]["framework_python_s_per_step"] and 0 < step["framework"]["share_of_profiled_step"] < 1
    for per_method in sections["loading"]["datasets"].values():
        assert set(per_method) == {"supervised", "mean_teacher"}
        assert all(r["loader_speed_over_step"] > 0 for r in per_method.values())
    memory = sections["memory"]
    assert memory["methods"]["supervised"]["peak_rss_mb"] > 0
    assert memory["evaluation_largest_acdc_test_volume"]["peak_rss_mb"] > 0
    assert memory["evaluation_la_protocol_volume"]["peak_rss_mb"] > 0
    assert sections["inference_speed"]["3d"]["vnet_base_features_16"]["windows_per_volume"] == 72
    assert sections["precision"]["resolved_trainer_precision"] == ["32-true"]
    assert sections["precision"]["methods"]["methods"]["supervised"]["float32_over_bf16"] > 0
    assert sections["precision"]["unet"]["channels_last_speedup_float32"] > 0
    cost = sections["paper_cost"]["protocols"]["acdc"]["methods"]["supervised"]
    assert cost["run_pflop"] > 0 and cost["supervised_runs"] == 1.0 and cost["stages"]["train"]["steps"] == 30000
    startup = sections["cli_startup"]
    assert set(startup["over_reference"]) == set(startup["reference"]) and all(v > 0 for v in startup["over_reference"].values())
    markdown = (tmp_path / "report.md").read_text()
    for heading in ("## Metrics", "## Scoring a folder", "## Sliding window", "## Training step", "## Data loading", "## Memory",
                    "## Inference speed", "## Mixed precision", "## Compute of a `paper`-profile run", "## Command-line start-up"):
        assert heading in markdown


def test_paper_cost_counts_what_the_method_computes(one_torch_thread):
    """CPS trains two networks on labeled + unlabeled halves of equal size: exactly 4x supervised-only's counted
    compute per step (convolutions are linear in the batch; the losses add no counted operations)."""
    from benchmark.perf import paper_cost

    result = paper_cost.run(True, ["supervised", "cps"])["protocols"]["acdc"]["methods"]
    supervised, cps = result["supervised"], result["cps"]
    assert cps["stages"]["train"]["batch"] == {"labeled": 2, "unlabeled": 2}
    assert supervised["stages"]["train"]["batch"] == {"labeled": 2, "unlabeled": 0}
    assert cps["stages"]["train"]["step_tflop"] == pytest.approx(4 * supervised["stages"]["train"]["step_tflop"], rel=1e-12)
    assert cps["supervised_runs"] == pytest.approx(4.0)
    assert cps["stages"]["train"]["steps"] == 30000  # the paper budget, not a CPU one
    hours = cps["hours_at_assumed_tflops"]
    assert hours["10.0"] == pytest.approx(4 * hours["40.0"])


def test_paper_cost_on_la_uses_the_la_budgets_and_skips_2d_methods(one_torch_thread):
    from benchmark.perf import paper_cost

    result = paper_cost.run(True, ["supervised", "mean_teacher", "mms"], ["la"])["protocols"]["la"]["methods"]
    assert result["supervised"]["stages"]["train"]["steps"] == 6000  # UA-MT's LA budget
    assert result["mean_teacher"]["supervised_runs"] > 1
    assert "2-D only" in result["mms"]["not_applicable"]


def test_training_step_times_each_stage_of_a_multi_stage_method(one_torch_thread):
    from benchmark.perf import training_step

    results = training_step.run(True, ["action"])
    methods = results["methods"]
    assert list(methods) == ["action (pretrain_global)", "action (pretrain_local)", "action (finetune)"]
    assert all("error" not in r and r["cpu_ratio"] > 0 for r in methods.values())
    # stage 3 over stage 1, after asserting that the query-only head equals the dense one
    ratio = results["action_stage_ratio"]
    assert "error" not in ratio and ratio["identical_to_dense_head"] and ratio["finetune_over_pretrain_global"] > 0
    parts = ratio["finetune_parts_ms"]
    assert {"student passes", "teacher pass", "keys: head at every pixel, no grad", "backward"} <= set(parts)
    assert all(value >= 0 for value in parts.values())


@pytest.mark.parametrize("cpu_per_round, expected_rounds", [
    ([1.0, 1.0, 1.0], 1),  # within the target: one round, as before
    ([1.3, 1.0, 1.0], 3),  # an outlier round: the median of three says 1.0
    ([1.3, 1.3, 1.3, 1.3], 3),  # over the target every time: reported over it, after at most three rounds
])
def test_training_step_times_a_method_over_the_target_again(monkeypatch, cpu_per_round, expected_rounds):
    from benchmark.perf import training_step

    suite_rounds = iter(cpu_per_round)
    monkeypatch.setattr(training_step, "suite_steps", lambda config, warmup: {
        "step": [1.0], "waiting_for_batch": [0.0], "cpu": [next(suite_rounds)]})
    monkeypatch.setattr(training_step, "bare_steps", lambda config, warmup, steps: {"step": [1.0], "cpu": [1.0]})
    monkeypatch.setattr(training_step, "framework_share", lambda config, warmup: {})
    result = training_step.measure("supervised", "synthetic_acdc", "smoke", 3, 1, 1, confirm_above=1.10)
    assert len(result["cpu_ratio_per_round"]) == expected_rounds
    assert result["cpu_ratio"] == pytest.approx(statistics.median(cpu_per_round[:expected_rounds]))
