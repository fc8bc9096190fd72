"""benchmark.gpu_check: its CPU dry run (so the GPU check cannot rot), its refusal without a GPU, the per-row
failures, and the mode that gives a step the same random numbers on every device."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmark import gpu_check
from benchmark.gpu_check import SameRandomNumbersOnEveryDevice, main


def test_refuses_without_a_gpu_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "no CUDA GPU" in captured.err and "DEVICE=cpu" in captured.err


@pytest.mark.slow  # float16 convolutions on a CPU: ~2 s per step
def test_dry_run_prints_one_row_per_precision(capsys, one_torch_thread):
    assert main(["--device", "cpu", "--methods", "supervised", "--protocols", "acdc", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| supervised")]
    assert [row.split("|")[3].strip() for row in rows] == ["32-true", "16-mixed", "bf16-mixed"]
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")]
        assert cells[2] == "2-D" and cells[4] == "1" and float(cells[5]) > 0 and float(cells[6]) > 0 and cells[-1] == "ok"
    assert "3 of 3 rows passed" in out and "tolerance 32-true 0.001, 16-mixed 0.01, bf16-mixed 0.05" in out


@pytest.mark.slow
def test_dry_run_of_two_methods_in_2d_and_3d(one_torch_thread):
    rows = gpu_check.run_check(torch.device("cpu"), ["supervised", "mean_teacher"], ["acdc", "la"],
                               ["32-true", "bf16-mixed"], steps=1, warmup=1, dry=True)
    assert [(r["method"], r["dims"], r["precision"]) for r in rows] == [
        (m, d, p) for m in ("supervised", "mean_teacher") for d in ("2-D", "3-D") for p in ("32-true", "bf16-mixed")]
    assert all("error" not in row for row in rows), rows
    # On the CPU the float32 row repeats the reference step exactly (same weights, batch and random numbers).
    assert all(row["loss_difference"] == 0 for row in rows if row["precision"] == "32-true")
    assert all(0 < row["loss_difference"] < 0.05 for row in rows if row["precision"] == "bf16-mixed")


def test_a_failing_precision_is_a_row_and_the_exit_code(monkeypatch, capsys, one_torch_thread):
    timed_steps = gpu_check.timed_steps

    def broken_in_float16(model, batches, seed, device, precision, *args):
        if precision == "16-mixed":
            raise RuntimeError("expected scalar type Half but found Float\nsecond line")
        return timed_steps(model, batches, seed, device, precision, *args)

    monkeypatch.setattr(gpu_check, "timed_steps", broken_in_float16)
    monkeypatch.setitem(gpu_check.LOSS_TOLERANCE, "bf16-mixed", 0.0)  # bf16 does differ from fp32: now too much
    assert main(["--device", "cpu", "--methods", "supervised", "--protocols", "acdc", "--steps", "1"]) == 1
    out = capsys.readouterr().out
    statuses = {line.split("|")[3].strip(): line.split("|")[-1].strip() for line in out.splitlines()
                if line.startswith("| supervised")}
    assert statuses["32-true"] == "ok"
    assert statuses["16-mixed"] == "FAIL: RuntimeError: expected scalar type Half but found Float"
    assert statuses["bf16-mixed"].startswith("FAIL: step-0 loss") and "vs CPU fp32" in statuses["bf16-mixed"]
    assert "1 of 3 rows passed; 2 failed" in out


def test_rows_stop_early_when_their_share_of_the_budget_is_spent(one_torch_thread):
    rows = gpu_check.run_check(torch.device("cpu"), ["supervised"], ["acdc"], ["32-true"], steps=20, warmup=1,
                               dry=True, budget_minutes=1e-6)
    assert [row["steps_timed"] for row in rows] == [gpu_check.MIN_TIMED_STEPS]
    assert "error" not in rows[0]


def test_bad_options_are_refused(capsys):
    assert main(["--device", "cpu", "--methods", "no_such_method"]) == 2
    assert "no_such_method" in capsys.readouterr().err
    assert main(["--device", "cpu", "--warmup", "0"]) == 2


def test_random_numbers_do_not_depend_on_dtype_or_on_the_mode_for_cpu_generators():
    torch.manual_seed(0)
    plain = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    features = torch.ones(2, 6, 4, 4)
    with SameRandomNumbersOnEveryDevice():
        pinned = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
        torch.manual_seed(1)
        half = torch.randn_like(torch.zeros(4, 4, dtype=torch.bfloat16))
        torch.manual_seed(1)
        full = torch.randn_like(torch.zeros(4, 4))
        torch.manual_seed(2)
        dropped_float = F.dropout2d(features, 0.5, training=True)
        torch.manual_seed(2)
        dropped_bf16 = F.dropout2d(features.bfloat16(), 0.5, training=True)
        kept = F.dropout(features, 0.5, training=False)
    assert torch.equal(plain, pinned)
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.bfloat16())
    assert torch.equal(dropped_float, dropped_bf16.float())
    assert set(dropped_float.unique().tolist()) == {0.0, 2.0}  # scaled by 1 / (1 - p)
    assert torch.equal(dropped_float.amax(dim=(2, 3)), dropped_float.amin(dim=(2, 3)))  # whole channels dropped
    assert kept is features
