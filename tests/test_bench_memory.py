"""The memory benchmarks' plumbing on CPU: bench_edit's profile modes, edit_end_to_end's disk rate and
its whole run on the tiny preset (no Prefect, Ray or pycolmap imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from imix2mix.config import EditConfig, memory_settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_modes_are_the_profiles():
    from benchmarks.bench_edit import MODES, _parse_set, mode_allocator

    settings = EditConfig().overridden(dict(_parse_set(item) for item in MODES["24gb"]))
    assert settings == EditConfig().overridden(memory_settings("24gb"))
    assert mode_allocator("24gb") == "expandable_segments:True" and mode_allocator("graphed") == ""


def test_the_disk_rate_reads_back_an_evicted_file(tmp_path: Path):
    from benchmarks.edit_end_to_end import disk_read_rate

    rate = disk_read_rate(tmp_path, 8 * 2**20, block=2**20)
    assert rate["read_bytes_per_second"] > 0 and rate["bytes"] == 8 * 2**20
    assert rate["page_cache_resident_before_read"] is None or 0 <= rate["page_cache_resident_before_read"] <= 1
    assert list(tmp_path.iterdir()) == []  # the file is gone


def test_the_memory_trace_says_when_and_in_which_phase_the_reserved_peak_came():
    """edit_end_to_end's trace (CUDA only; here its summary of given samples): the reserved peak, the
    allocation at that moment, and the phase that held it, from when each phase ran. Untimed setup
    between phases is named as such: laying the phases' durations end to end, as the trace once did,
    put a peak 4 s after the loop's start into no phase at all."""
    from benchmarks.edit_end_to_end import MemoryTrace, phase_at, phases_on_trace_clock

    # Seconds since the edit began; 1 s of untimed setup before the reference edit, 3 s before the loop.
    spans = [("reference_edit", 1.0, 5.0), ("conditioning", 5.0, 5.5), ("distill", 8.5, 18.5), ("decode", 18.5, 18.6)]
    phases = phases_on_trace_clock(spans, edit_started=100.25, trace_started=100.0)
    assert phases[0] == ("reference_edit", 1.25, 5.25) and phases[-1] == ("decode", 18.75, 18.85)
    assert [phase_at(t, phases) for t in (0.1, 1.3, 6.0, 9.0, 18.8, 19.0)] == [
        "before reference_edit", "reference_edit", "between conditioning and distill", "distill", "decode", "after decode"]
    assert phase_at(1.0, []) == "before any phase"
    trace = MemoryTrace(device=None)
    trace.samples = [(0.5 * i, 10.0 + (2.0 if i == 36 else 0.0), 8.0 + i / 100) for i in range(40)]
    summary = trace.summary(phases, points=10)
    assert summary["peak_reserved_gib"] == 12.0 and summary["peak_at_seconds"] == 18.0
    assert summary["allocated_then_gib"] == 8.36 and summary["peak_phase"] == "distill"
    assert summary["phases"][2] == ["distill", 8.75, 18.75]
    assert len(summary["trace"]) == 10 and summary["trace"][0] == [0.0, 10.0, 8.0]
    assert MemoryTrace(device=None).summary(phases) is None  # no samples: no summary, no failure


def test_edit_end_to_end_runs_the_tiny_preset(tmp_path: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "benchmarks/edit_end_to_end.py", "--preset", "tiny", "--device", "cpu", "--k", "1", "2",
         "--memory", "24gb", "--modes", "teacher_only", "--teacher-steps", "2", "--disk-bytes", str(4 * 2**20), "--scratch", str(tmp_path), "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "edit_end_to_end_24gb.json").read_text())
    assert report["imported"] == []
    assert report["config"]["runtime"]["optimizer"] == "adamw_bf16_states"
    warm = report["warm_worker"]
    assert [run["iterations"] for run in warm["runs"]] == [6, 12]  # 6 τ × k
    assert warm["schedule_iterations"] == 14 and "extrapolated" in warm["label"]
    assert report["config"]["acceleration"]["split_master_weights"] is True
    # A warm worker's earlier runs leave none of their loop objects alive.
    assert [run["live_run_objects"] for run in warm["runs"]] == [[], []]
    assert [run["memory_trace"] for run in warm["runs"]] == [None, None]  # the allocator's trace: CUDA only
    teacher_only = report["modes"]["teacher_only"]
    assert teacher_only["finite"] and teacher_only["iterations"] == 0 and teacher_only["views"] == 4
    assert report["cold_start"]["estimated_cold_start_seconds"] > report["cold_start"]["model_build_seconds_random_weights"]


def test_loop_drift_reports_the_24gb_profiles_weight_drift(tmp_path: Path):
    """The 24gb configuration (bf16 AdamW moments: AdamWLowPrecisionStates on the CPU) drifts from the
    eager fp32 reference; the reference's weight snapshots are copies, not the live parameters that
    the next configuration trains (else every weight drift read 0 on the CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "drift.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/loop_drift.py", "--device", "cpu", "--preset", "tiny", "--iterations", "4",
         "--seconds", "0", "--snapshots", "1", "--configs", "eager_fp32,eager_fp32_again,24gb", "--json", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())["configurations"]
    assert report["24gb"]["plan"]["optimizer"] == "AdamWLowPrecisionStates"
    assert report["24gb"]["plan"]["moments"] == "bfloat16" and report["eager_fp32_again"]["plan"]["moments"] == "float32"
    assert report["24gb"]["max"]["weights_rel_to_update"] > 0
    assert report["eager_fp32_again"]["max"]["weights_rel_to_update"] == 0  # the CPU is deterministic
    assert report["24gb"]["iterations"] == report["eager_fp32_again"]["iterations"] == 4


def test_loop_drift_past_its_deadline_keeps_what_it_measured(tmp_path: Path):
    """--until: the configurations after the reference are not run once the time is spent (a deadline
    of a millisecond is spent by building the editor), and the report of what ran is still written."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "drift.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/loop_drift.py", "--device", "cpu", "--preset", "tiny", "--iterations", "2",
         "--seconds", "0", "--snapshots", "1", "--configs", "fast,fast_again", "--until", "0.001", "--json", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fast_again: not run" in proc.stdout
    report = json.loads(out.read_text())
    assert report["reference"] == "fast" and report["iterations"] == 2 and report["configurations"] == {}


def test_loop_drift_notes_one_execution_only_for_different_requests():
    """The "degenerates to eager" note is for configurations that asked for different settings and ran
    one execution (the CPU); a configuration and its repeat (fast, fast_again; the eager pair) resolve
    alike by design, and 24gb differs from fast in its moments, so neither pair is noted."""
    from benchmarks.loop_drift import Run, one_execution_note

    def runs(**plans: dict) -> dict:
        made = {}
        for name, plan in plans.items():
            made[name] = Run(name)
            made[name].plan = plan
        return made

    eager = {"autocast": "fp32", "optimizer": "AdamW", "moments": "float32", "split_masters": False}
    fast = {"autocast": "bfloat16", "optimizer": "AdamWWithComputeCopies", "moments": "float32", "split_masters": False}
    cpu = torch.device("cpu")
    assert "degenerates to eager" in one_execution_note(runs(fast=eager, eager_bf16=eager), cpu)
    assert one_execution_note(runs(fast=fast, fast_again=fast), cpu) is None
    assert one_execution_note(runs(eager_bf16=eager, eager_bf16_again=eager), cpu) is None
    assert one_execution_note(runs(fast=fast, fast_again=fast, **{"24gb": fast | {"moments": "bfloat16", "split_masters": True}}), cpu) is None


def test_loop_drift_reads_a_split_master_as_its_fp32_weight():
    """With split masters (the 24gb profile on the GPU) the optimizer's state "master" is an int16
    residual; the drift compares the fp32 number it stands for (within the one-ulp tie nudge)."""
    import types

    from benchmarks.loop_drift import fp32_weights
    from imix2mix.optim import AdamWWithComputeCopies

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer = AdamWWithComputeCopies(list(layer.parameters()), compute_copies=[layer.weight], split_masters=True)
    assert optimizer.state[layer.weight]["master"].dtype == torch.int16  # what the drift must not read as weights
    weights = fp32_weights(types.SimpleNamespace(optimizer=optimizer, trainable_parameters=list(layer.parameters())))
    for weight, original in zip(weights, before):
        assert weight.dtype == torch.float32
        assert int((weight.view(torch.int32) - original.view(torch.int32)).abs().max()) <= 1


def test_bench_edit_says_what_holds_the_memory():
    """bench_edit's per-owner breakdown after the iterations (on the GPU also by allocator pool):
    the student's weights, gradients and the optimizer's moments, each counted once."""
    import argparse

    from benchmarks.bench_edit import measure
    from imix2mix.presets import build_editor

    editor = build_editor("tiny", device="cpu", metrics=False)
    args = argparse.Namespace(warmup=0, iterations=1, phase_iterations=1, profile_dir=None)
    m = measure(editor, "24gb", 2, editor.default_config, {"optimizer": "adamw_bf16_states"}, args)
    assert m.error is None and m.seconds_per_iteration is not None
    breakdown = m.memory_breakdown
    weights = breakdown["student parameters torch.float32"]
    network_bytes = sum(p.numel() * 4 for p in editor.student.network.parameters()) / 2**30
    assert abs(weights - network_bytes) <= 1e-6 * max(network_bytes, 1e-9) + 1e-9
    # bf16 moments of the trained parameters that had a gradient: at most half their fp32 size each.
    trained = sum(p.numel() for p in editor.student.trainable_parameters()) * 2 / 2**30
    assert breakdown["optimizer exp_avg"] == breakdown["optimizer exp_avg_sq"]
    assert 0.9 * trained <= breakdown["optimizer exp_avg"] <= trained
    assert breakdown["student gradients"] > 0 and breakdown["teacher parameters"] > 0
    assert "pools" not in breakdown  # the allocator's pools: CUDA only
