"""report.json (everything measured) and report.md (the figures a reader needs, with how they were measured)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = {"metrics_speedup": 10.0, "score_speedup": 10.0, "sliding_window_speedup": 1.5, "step_ratio": 1.10, "loader_over_step": 3.0}
NOISE_NOTE = (
    "Every figure is a ratio against a reference timed in the same run (interleaved repetitions, medians), because "
    "absolute times on this machine are not reproducible: it has {cpu_count} cores shared with other jobs "
    "(load average {load} at the start). Absolute seconds are given only to show the scale."
)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}"
    return str(value)


def _verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "yes" if ok else "**no**"


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        "# Performance report (`make perf`)", "",
        f"Measured {machine['date']} on `{machine['host']}`: {machine['cpu']}, {machine['cpu_count']} cores, "
        f"torch {machine['torch']} ({report['threads']} intra-op thread(s) in the timed sections), CUDA: {machine['cuda']}. "
        f"Mode: {'quick (tests only, figures meaningless)' if report['quick'] else 'full'}; "
        f"the run took {report['duration_s']:.0f} s.", "",
        NOISE_NOTE.format(cpu_count=machine["cpu_count"], load=", ".join(map(str, machine["load_average_at_start"]))), "",
    ]
    sections = report["sections"]
    if "metrics" in sections:
        m = sections["metrics"]
        lines += ["## Metrics: Dice, Jaccard, HD95, ASD (ours vs medpy, MONAI's HD95 beside)", "",
                  f"Our four metrics equal medpy's `dc`, `jc`, `hd95`, `asd` on every pair below (asserted, tolerance "
                  f"{m['tolerance']}). Timed: the four together, per pair, median of interleaved repetitions.", "",
                  "| data | pairs | medpy s | ours s | speed-up (target >= 10) | met | MONAI HD95 s | MONAI HD95 time / ours (all four) | MONAI - medpy HD95: mean, max rel. |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        groups = {f"ACDC test, {name}": group for name, group in m["acdc_per_class"].items()}
        groups["LA-sized generated (200x150x88)"] = m["la_sized"]
        for label, g in groups.items():
            diff = g["monai_hd95_minus_medpy_hd95"]
            lines.append(f"| {label} | {g['pairs']} | {_fmt(g['medpy']['median_s'])} | {_fmt(g['ours']['median_s'], 3)} | "
                         f"{_fmt(g['speedup_vs_medpy'], 1)}x | {_verdict(g['speedup_vs_medpy'], TARGETS['metrics_speedup'])} | "
                         f"{_fmt(g['monai_hd95']['median_s'])} | {_fmt(g['monai_hd95_time_vs_ours_all_four'], 1)}x | "
                         f"{_fmt(diff['mean'], 3)} vox, {_fmt(100 * diff['max_relative'], 1)} % |")
        a = m["acdc_all_classes"]
        lines += [f"| ACDC test, all classes | {a['pairs']} | {_fmt(a['medpy_median_s'])} | {_fmt(a['ours_median_s'], 3)} | "
                  f"{_fmt(a['speedup_vs_medpy'], 1)}x | {_verdict(a['speedup_vs_medpy'], TARGETS['metrics_speedup'])} | "
                  f"{_fmt(a['monai_hd95_median_s'])} | | |", "",
                  f"ACDC: {m['acdc_test_volumes']} real test volumes (every 4th of test.list), prediction = {m['acdc_prediction']}. "
                  f"LA-sized: the suite's synthetic LA generator at {m['la_sized_volume_shape']}, prediction = {m['la_prediction']}. "
                  "MONAI's HD95 is the max of the two directed 95th percentiles, medpy's the 95th percentile of the "
                  "pooled distances, hence the differences.", ""]
    if "score" in sections:
        sc = sections["score"]
        shape = "x".join(map(str, sc["volume_shape"]))
        lines += ["## Scoring a folder vs medpy, end to end (scattered false positives)", "",
                  f"{sc['cases']} generated LA cases at the raw size {shape}, {sc['files']}; prediction = "
                  f"{sc['prediction']}. Per case, files read: medpy's `dc`, `jc`, `hd95`, `asd` as the SSL-MIS test "
                  "scripts call them, against `python -m benchmark score` (`score_folders`) in one process and with "
                  f"{sc['workers']} worker processes (cases in parallel). Every number equals medpy's (asserted, "
                  f"tolerance {sc['tolerance']}; bitwise equal: {sc['bitwise_equal_to_medpy']}); the parallel and "
                  "serial outputs are identical (asserted).", "",
                  "| scoring | s per case | speed-up vs medpy (target >= 10) | met |", "| --- | --- | --- | --- |",
                  f"| medpy | {_fmt(sc['medpy_per_case']['median_s'])} | | |"]
        for label, key, speedup in (("ours, one process", "ours_one_process_per_case", "speedup_one_process"),
                                    (f"ours, {sc['workers']} workers", "ours_parallel_per_case", "speedup_parallel")):
            lines.append(f"| {label} | {_fmt(sc[key]['median_s'], 3)} | {_fmt(sc[speedup], 1)}x | "
                         f"{_verdict(sc[speedup], TARGETS['score_speedup'])} |")
        lines += ["", "The workers help only when the cores are free: on a machine whose cores other jobs keep busy "
                  "the parallel figure can be below the one-process one.", ""]
    if "sliding_window" in sections:
        s = sections["sliding_window"]
        lines += ["## Sliding window (LA protocol)", "",
                  f"{s['network']}; patch {s['patch']}, stride {s['stride']}. A {s['la_sized_volume_shape']} volume has "
                  f"**{s['windows_la_sized_volume']} windows**; timed on a {s['timed_volume_shape']} crop "
                  f"({s['windows_timed_volume']} windows) to keep the run short.", "",
                  "| torch threads | per-window loop (published) s | suite, window_batch " + str(s["window_batch"]) + " s | speed-up (target >= 1.5) | met |",
                  "| --- | --- | --- | --- | --- |"]
        for threads, r in s["by_threads"].items():
            default = " (torch's default, the evaluator's)" if int(threads) == s["default_threads"] else ""
            lines.append(f"| {threads}{default} | {_fmt(r['per_window_loop']['median_s'], 1)} | {_fmt(r['suite_batched']['median_s'], 1)} | "
                         f"{_fmt(r['speedup'])}x | {_verdict(r['speedup'], TARGETS['sliding_window_speedup'])} |")
        lines += ["", f"Output: largest probability difference {_fmt(s['max_abs_probability_difference'], 7)}, label maps "
                  f"equal: {s['label_maps_equal']} (asserted).", ""]
    if "training_step" in sections:
        t = sections["training_step"]
        lines += ["## Training step: suite (Lightning fit, loaders, logging) vs a bare PyTorch loop", "",
                  f"{t['dataset']}, `{t['profile']}` profile, {t['steps_timed']} steps timed after {t['warmup_steps']} "
                  f"warm-up steps, {t['rounds']} alternating round(s), up to 3 for a method whose CPU-time ratio is over "
                  "the target after one (the column per round shows them). Two ratios, each the median over rounds of "
                  "median suite step / median bare step: of wall time (what a user waits) and of the training "
                  "process's CPU time (what the suite's own machinery costs; loading runs in worker processes and "
                  "shows as waiting). On a shared machine the CPU-time ratio is the one to trust: other jobs stretch "
                  "wall time, not the CPU time a step consumes.", "",
                  "| method | suite step s | bare step s | wall ratio | suite CPU s | bare CPU s | CPU-time ratio (target <= 1.10) | met | framework Python per step (profiled) | suite: waiting for the batch s | wall ratio per round |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in t["methods"].items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | | | | | | | | | |")
                continue
            framework = r.get("framework")
            framework_cell = (f"{1000 * framework['framework_python_s_per_step']:.0f} ms = "
                              f"{100 * framework['share_of_profiled_step']:.1f} %" if framework else "–")
            cpu_ratio = r.get("cpu_ratio")  # reports written before CPU time was measured have only wall time
            lines.append(f"| {name} | {_fmt(r['suite_step_median_s'], 3)} | {_fmt(r['bare_step_median_s'], 3)} | "
                         f"{_fmt(r['ratio'], 3)} | {_fmt(r.get('suite_cpu_step_median_s'), 3)} | {_fmt(r.get('bare_cpu_step_median_s'), 3)} | "
                         f"{_fmt(cpu_ratio, 3)} | {_verdict(cpu_ratio if cpu_ratio is not None else r['ratio'], TARGETS['step_ratio'], False)} | "
                         f"{framework_cell} | {_fmt(r['suite_waiting_for_batch_median_s'], 4)} | {', '.join(_fmt(x, 3) for x in r['ratio_per_round'])} |")
        action = t.get("action_stage_ratio")
        if action:
            lines += ["", "ACTION fine-tuning step over its first stage's (bare loops, CPU time, ACDC-shaped random batches, "
                      "target <= 2): " + (f"error: {action['error']}" if "error" in action else
                      f"{_fmt(action['finetune_over_pretrain_global'], 2)} at the `{action['profile']}` profile "
                      f"({_fmt(action['cpu_step_median_s']['finetune'], 2)} s / {_fmt(action['cpu_step_median_s']['pretrain_global'], 2)} s); "
                      "the query-only head gave the dense head's losses and gradients")]
            if "finetune_parts_ms" in action:
                for stage in ("finetune", "pretrain_global"):
                    parts = action[f"{stage}_parts_ms"]
                    lines.append(f"- {stage} step, CPU ms per part: " + ", ".join(
                        f"{label} {value:.0f}" for label, value in sorted(parts.items(), key=lambda item: -item[1])))
        measured = [r for r in t["methods"].values() if "error" not in r]
        if measured:
            waiting = max(r["suite_waiting_for_batch_median_s"] / r["suite_step_median_s"] for r in measured)
            lines += ["", f"Waiting for the next batch takes at most {100 * waiting:.1f} % of a suite step, so the loaders "
                      "are not what a step pays for. On a shared machine one round's wall ratio moves by tens of percent "
                      "with the load of the other jobs (in a separate check, two consecutive rounds of MC-Net+ gave 0.99 "
                      "and 3.33); wall ratios within ~0.2 of 1 are not resolved by this run. The profiled column is "
                      "the load-robust figure: the Python time Lightning's and the suite's own code (loop, logging, "
                      "callbacks) takes per step, from a second suite fit with its steps after warm-up under cProfile, "
                      "and its share of everything profiled in those steps."]
        lines.append("")
    if "loading" in sections:
        d = sections["loading"]
        lines += ["## Data loading: loader rate vs step rate (default workers)", "",
                  "| data | method (streams) | workers | batch | loader s/batch | bare step s | loader speed / step speed (target >= 3) | met |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, per_method in d["datasets"].items():
            for name, r in per_method.items():
                batch = f"{r['batch']['labeled']}" + (f"+{r['batch']['unlabeled']}" if name != "supervised" else "")
                lines.append(f"| {label} | {name} | {r['num_workers']} per stream | {batch} of {r['patch']} | "
                             f"{_fmt(r['loader_seconds_per_batch'], 4)} | {_fmt(r['bare_step_seconds'], 3)} | "
                             f"{_fmt(r['loader_speed_over_step'], 1)}x | {_verdict(r['loader_speed_over_step'], TARGETS['loader_over_step'])} |")
        lines.append("")
    if "memory" in sections:
        mem = sections["memory"]
        lines += ["## Memory (peak RSS, fresh subprocess each)", "",
                  f"A whole `{mem['profile']}` run of {mem['steps']} steps on {mem['dataset']} (fit, validation, test of the "
                  "last and best checkpoints):", "",
                  "| method | main process MB | largest loader worker MB (includes pages shared with the main process) |", "| --- | --- | --- |"]
        for name, r in mem["methods"].items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | |")
            else:
                lines.append(f"| {name} | {r['peak_rss_mb']:.0f} | {r['largest_worker_peak_rss_mb']:.0f} |")
        for key, label in (("evaluation_largest_acdc_test_volume", "Evaluation of the largest ACDC test volume"),
                           ("evaluation_la_protocol_volume", "Evaluation with the LA protocol")):
            r = mem[key]
            if "error" in r:
                lines += ["", f"{label}: error {r['error']}"]
            else:
                lines += ["", f"{label} ({r.get('case', 'generated')}, shape {r['shape']}, {r['network']}): peak RSS "
                          f"{r['peak_rss_mb']:.0f} MB ({r['peak_before_evaluation_mb']:.0f} MB before the evaluation started)."]
        lines.append("")
    if "inference_speed" in sections:
        i = sections["inference_speed"]
        lines += ["## Inference speed", "", "| network | input | speed |", "| --- | --- | --- |"]
        for name, r in i["2d"].items():
            lines.append(f"| 2-D {name} | {r['input']} | {_fmt(r['images_per_s'], 1)} images/s |")
        for name, r in i["3d"].items():
            lines.append(f"| 3-D {name} | LA protocol, {r['windows_per_volume']} windows | {_fmt(r['volumes_per_min'], 2)} volumes/min "
                         f"({_fmt(r['seconds_per_window'])} s/window; {r['how']}) |")
        lines.append("")
    if "precision" in sections:
        p = sections["precision"]
        per_method, unet = p["methods"], p["unet"]
        lines += ["## Mixed precision and channels-last", "",
                  f"Every preset ({p['presets_checked']} dataset x profile pairs) resolves `trainer.precision` to "
                  f"{', '.join(p['resolved_trainer_precision'])}. {p['decision']}", "",
                  f"Step time float32 / bf16-mixed on this machine ({p['cpu']}; > 1: bf16 is faster): each method's own "
                  f"training step (forward, losses, backward, SGD) at the ACDC `{per_method['profile']}` profile, median of "
                  f"{per_method['timed_steps']} interleaved steps after a warm-up.", "",
                  "| method | float32 s | bf16-mixed s | float32 / bf16 |", "| --- | --- | --- | --- |"]
        for name, r in per_method["methods"].items():
            lines.append(f"| {name} | {_fmt(r['float32_s'])} | {_fmt(r['bf16_s'])} | {_fmt(r['float32_over_bf16'])} |")
        lines += ["", f"The 2-D U-Net alone ({unet['step']}): float32 / bf16 {_fmt(unet['float32_over_bf16'])}; channels-last "
                  f"speeds the float32 step up {_fmt(unet['channels_last_speedup_float32'])}x and the bf16 step "
                  f"{_fmt(unet['channels_last_speedup_bf16'])}x. channels-last computes the same logits and gradients "
                  f"(asserted: rtol {unet['channels_last_tolerance']['rtol']}, atol {unet['channels_last_tolerance']['atol']}; "
                  f"largest logit difference {_fmt(unet['channels_last_largest_logit_difference'], 6)}) in train mode "
                  "without dropout: with dropout it draws different masks (in its memory order), so it is a different "
                  "random stream, not a different computation."]
        if "compile" in unet:
            c = unet["compile"]
            lines += ["", f"torch.compile (float32): first step {_fmt(c['first_step_s'], 0)} s (compiling), then "
                         f"{_fmt(c['speedup'])}x the eager step."]
        lines += ["", p.get("layout_decision", ""), "", p["gpu_expectation"], ""]
    if "paper_cost" in sections:
        c = sections["paper_cost"]
        low, high = (str(t) for t in c["assumed_tflops"])
        lines += ["## Compute of a `paper`-profile run (expected GPU time)", "",
                  "Counted, not timed: FLOPs of one training step (torch's FlopCounterMode around the method's own "
                  "training_step and backward, convolutions and matrix products, 2 per multiply-add) at the paper "
                  "protocol's patch, batch and width, times the paper's steps per stage. Hours = FLOPs / a sustained "
                  f"throughput; {low} and {high} TFLOP/s bracket what fp32/TF32 training of these small networks "
                  "typically sustains on an A100-class GPU (not measured here). Element-wise work (batch norm, "
                  "activations: memory-bound, and a large share of a narrow U-Net's GPU time), data loading and "
                  "validation are not counted, so the hours are lower bounds of the compute alone. The column "
                  "'supervised runs' is the run's counted compute over supervised-only's: time one supervised paper "
                  "run on your GPU and multiply for an estimate of the others.", ""]
        for protocol in c["protocols"].values():
            lines += [f"**{protocol['label']}**", "",
                      f"| method | patch, width | batch (labeled+unlabeled) | TFLOP per step | steps | PFLOP per run | supervised runs | h at {low} TFLOP/s | h at {high} TFLOP/s |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for name, r in protocol["methods"].items():
                if "error" in r or "not_applicable" in r:
                    why = f"error: {r['error']}" if "error" in r else f"not applicable ({r['not_applicable']})"
                    lines.append(f"| {name} | {why} | | | | | | | |")
                    continue
                stages = r["stages"].values()
                batch = ", ".join(f"{s['batch']['labeled']}+{s['batch']['unlabeled']}" for s in stages)
                per_step = ", ".join(_fmt(s["step_tflop"], 3) for s in stages)
                steps = " + ".join(str(s["steps"]) for s in stages)
                hours = r["hours_at_assumed_tflops"]
                lines.append(f"| {name} | {r['patch']}, {r['base_features']} | {batch} | {per_step} | {steps} | "
                             f"{_fmt(r['run_pflop'], 1)} | {_fmt(r.get('supervised_runs'), 1)} | {_fmt(hours[low], 2)} | {_fmt(hours[high], 2)} |")
            lines.append("")
    if "cli_startup" in sections:
        c = sections["cli_startup"]
        lines += ["## Command-line start-up", "",
                  f"Wall seconds, median of {c['repeats']} interleaved starts, each over the reference started the same way "
                  "in the same run (`--help` and `list` import neither torch nor Lightning; `--show-config` resolves the split).", "",
                  "| command | seconds | reference | x reference |", "| --- | --- | --- | --- |"]
        for name, reference in c["reference"].items():
            lines.append(f"| `{name}` | {_fmt(c['median_seconds'][name])} | `{reference}` ({_fmt(c['median_seconds'][reference])} s) | "
                         f"{_fmt(c['over_reference'][name])} |")
        lines.append("")
    if report.get("errors"):
        lines += ["## Sections that failed", ""] + [f"- {name}: {error}" for name, error in report["errors"].items()] + [""]
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(markdown(report))
    return json_path, md_path
