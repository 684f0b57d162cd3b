"""How far the default fast path drifts from the eager fp32 loop, next to how far eager bf16 drifts.

The loop parity test (tests/test_loop_parity.py) pins the eager fp32 loop to the official one on the
CPU.  On the GPU the default execution differs from it by bf16 autocast, CUDA graphs, fused Triton
kernels and bf16 weight copies; this script measures what that costs, against the drift that bf16
autocast alone (eager) already has, so no tolerance is invented without a measurement (issue 18).

Every configuration runs the same loop on the same seeded draws (one :class:`RunRandomness` seed:
t, κ, ε, the initial latent and the Euler noise are drawn independently of the computed values) from
the same pristine random weights, for the same number of iterations:

* ``eager_fp32``: fp32, eager (no Triton kernel runs eagerly), TF32 off (the reference);
* ``eager_bf16``: bf16 autocast, eager;
* ``fast``: the default execution (bf16 autocast, CUDA graphs, channels-last with fused kernels,
  bf16 weight copies);
* ``24gb``: the 24gb memory profile (``--memory 24gb``): ``fast`` with bf16 AdamW moments and the
  frozen encoders offloaded;
* ``eager_fp32_again``: the reference once more (the run-to-run floor of nondeterministic kernels);
* ``fast_again``: the default once more (its floor, where ``fast`` is the reference);
* ``eager_bf16_again``: eager bf16 once more (eager against eager, where ``eager_bf16`` is the reference).

The first configuration named is the reference (``--configs fast,24gb,fast_again,eager_bf16`` measures
the 24gb profile's drift from the default next to the default's own floor and eager bf16's distance).
The reference runs first, for ``--iterations`` or until ``--seconds`` have passed, whichever comes
first; the others run exactly as many iterations, unless ``--until`` seconds since the start have
passed: a configuration cut short is compared over the iterations it ran, and the report says how
many.  The JSON report is rewritten after every configuration, so a run cut short keeps what it
measured.  Reported against the reference, per iteration: the
loss and the gradient norm (relative), the student's x̂0 (max |Δ| / max |ref|, mean |Δ| / mean |ref|);
at ``--snapshots`` iterations: the student's fp32 weights (max over tensors of max |Δ| / max |ref|,
mean |Δ| / mean |ref| over all elements, ‖Δ‖ / ‖ref − pristine‖: the drift relative to what training
changed).  Imports neither Prefect, Ray nor pycolmap.

    python benchmarks/loop_drift.py                                   # CUDA, full size, random weights
    python benchmarks/loop_drift.py --device cpu --preset tiny --iterations 4 --seconds 0   # smoke test

Writes ``$OUT/loop_drift.json`` when ``OUT`` is set (or ``--json PATH``).  On the CPU every
configuration resolves to the same eager fp32 execution (no autocast, graphs or copies there); the
output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from benchmarks.bench_edit import synthetic_scene  # noqa: E402
from imix2mix.config import memory_settings  # noqa: E402
from imix2mix.edits import Edit  # noqa: E402
from imix2mix.modes.distill import Distillation, IterationRecord  # noqa: E402
from imix2mix.presets import build_editor  # noqa: E402

EAGER = {"cuda_graphs": False, "channels_last": False, "bf16_weight_copies": False, "compile": False}
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "eager_fp32": {"student_precision": "fp32", **EAGER},
    "eager_bf16": {"student_precision": "bf16_autocast", **EAGER},
    "fast": {},  # the defaults
    # The 24gb memory profile: the default execution with bf16 AdamW moments (its one numerics change)
    # and the encoders offloaded; its allocator setting (expandable segments) changes no value.
    "24gb": memory_settings("24gb"),
    "eager_fp32_again": {"student_precision": "fp32", **EAGER},
    "fast_again": {},  # the default once more: its run-to-run floor (cuDNN's and atomics' nondeterminism)
    "eager_bf16_again": {"student_precision": "bf16_autocast", **EAGER},  # eager bf16's floor (eager against eager)
}
REFERENCE = "eager_fp32"
FP32_REFERENCES = {"eager_fp32", "eager_fp32_again"}


@contextlib.contextmanager
def exact_fp32(enabled: bool) -> Iterator[None]:
    """TF32 off for matmuls and convolutions during one run (the fp32 reference computes in fp32; torch's
    default lets cuDNN convolutions use TF32).  Other runs keep torch's defaults, as the product does."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def fp32_weights(loop: Distillation) -> list[torch.Tensor]:
    """The student's fp32 weights now: with bf16 weight copies the parameters hold the copies and the
    optimizer the fp32 masters (split ones joined: their state holds an int16 residual)."""
    optimizer = loop.optimizer
    return [optimizer.master(p) if "master" in optimizer.state.get(p, {}) else p.detach() for p in loop.trainable_parameters]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_summary(loop: Distillation) -> dict[str, Any]:
    plan = loop.execution.plan
    return {
        "autocast": str(plan.autocast_dtype).replace("torch.", "") if plan.autocast_dtype else "fp32",
        "graph_student": plan.graph_student, "graph_teacher": plan.graph_teacher,
        "channels_last": plan.memory_format == torch.channels_last, "weight_copies": plan.weight_copies,
        "compile": plan.compile_mode, "optimizer": type(loop.optimizer).__name__,
        "moments": str(getattr(loop.optimizer, "state_dtype", torch.float32)).replace("torch.", ""),
        "split_masters": bool(getattr(loop.optimizer, "split_masters", False)),
    }


def one_execution_note(runs: dict[str, Run], device: torch.device) -> str | None:
    """A note when configurations that ask for different settings all resolved to one execution (on the
    CPU there is no autocast, graph or weight copy: the fast path is eager fp32 there).  Repeats of one
    configuration (``fast`` and ``fast_again``) resolve alike by design and say nothing."""
    requested = {json.dumps(CONFIGURATIONS[name], sort_keys=True) for name in runs}
    plans = {json.dumps(run.plan, sort_keys=True) for run in runs.values()}
    if len(requested) > 1 and len(plans) == 1:
        plan = next(iter(runs.values())).plan
        return f"every configuration resolved to the same execution on {device.type} ({plan}): the fast path degenerates to eager here"
    return None


class Run:
    """One configuration's loop: per-iteration scalars and x̂0, and weight statistics at snapshots."""

    def __init__(self, name: str):
        self.name = name
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.estimates: list[torch.Tensor] = []  # x̂0 of frames 1..N per iteration, fp32 on the host
        self.taus: list[int] = []
        self.ts: list[int] = []
        self.snapshots: dict[int, list[torch.Tensor]] = {}  # the reference's weights (host)
        self.update_norms: dict[int, float] = {}  # the reference's ‖θ − θ_pristine‖
        self.weight_drift: dict[int, dict[str, float]] = {}
        self.plan: dict[str, Any] = {}
        self.seconds = 0.0

    def observe(self, record) -> None:
        if isinstance(record, IterationRecord):
            self.estimates.append(record.estimate.detach().float().cpu())  # (a graph's output buffer: copied now)
            self.losses.append(float(record.loss))
            self.grad_norms.append(float(record.grad_norm))
            self.taus.append(record.tau)
            self.ts.append(record.t)


PROBE = 3  # the reference times its iterations 2..PROBE to fix how many fit in --seconds


def snapshot_iterations(iterations: int, count: int, after: int) -> set[int]:
    """``count`` iterations spread evenly over 1..iterations (the last included), none before ``after``."""
    return {max(after, round(iterations * (j + 1) / count)) for j in range(count)}


def run_loop(editor, scene, edit: Edit, config, name: str, iterations: int, *, seconds: float | None = None,
             snapshots: int = 0, reference: Run | None = None, deadline: float | None = None) -> Run:
    """Steps the loop as ``Distillation.run`` does (k updates per τ, then the Euler step), recording.

    The reference (``reference`` None) fixes its iteration count after ``PROBE`` iterations from
    ``seconds`` and keeps its fp32 weights at ``snapshots`` iterations; the others compare theirs, and
    stop early once ``time.perf_counter()`` passes ``deadline``."""
    run = Run(name)
    device = editor.device
    pristine = None
    snapshot_at = snapshot_iterations(iterations, snapshots, 1) if reference is None and snapshots else set()
    with exact_fp32(name in FP32_REFERENCES), editor.prepare_distillation(scene, edit, config) as loop:
        loop.observer = run.observe
        run.plan = plan_summary(loop)
        names = {id(p): n for n, p in editor.student.network.named_parameters()}
        synchronize(device)
        started = first_done = time.perf_counter()
        while loop.iteration < iterations:
            if reference is not None and deadline is not None and time.perf_counter() > deadline:
                break
            if loop.updates_done_at_tau >= loop.updates_per_tau[loop.tau_position] and not loop.advance():
                break
            loop.step()
            done = loop.iteration
            if reference is None and seconds is not None and done in (1, PROBE):
                synchronize(device)
                if done == 1:
                    first_done = time.perf_counter()  # iteration 1 warms up (allocations, autotuning)
                else:
                    per_iteration = (time.perf_counter() - first_done) / (PROBE - 1)
                    iterations = min(iterations, max(PROBE, int(seconds / per_iteration)))
                    snapshot_at = snapshot_iterations(iterations, snapshots, PROBE) if snapshots else set()
            if reference is None and done in snapshot_at:
                if pristine is None:
                    pristine = [editor.student.pristine[names[id(p)]] for p in loop.trainable_parameters]
                weights = fp32_weights(loop)
                # A copy: on the CPU .cpu() returns the live parameter, which the next configuration trains.
                run.snapshots[done] = [w.detach().float().cpu().clone() for w in weights]
                run.update_norms[done] = sum(
                    float((w.float() - p.to(w.device).float()).pow(2).sum()) for w, p in zip(weights, pristine)
                ) ** 0.5
            elif reference is not None and done in reference.snapshots:
                run.weight_drift[done] = weight_drift(fp32_weights(loop), reference.snapshots[done], reference.update_norms[done])
        loop.check_finite()
        synchronize(device)
        run.seconds = time.perf_counter() - started
    return run


@torch.no_grad()
def weight_drift(weights: list[torch.Tensor], reference: list[torch.Tensor], update_norm: float) -> dict[str, float]:
    max_ratio, abs_sum, ref_abs_sum, sq_sum = 0.0, 0.0, 0.0, 0.0
    for w, r in zip(weights, reference):
        r = r.to(w.device)
        diff = (w.float() - r).abs()
        peak = float(r.abs().max())
        if peak > 0:
            max_ratio = max(max_ratio, float(diff.max()) / peak)
        abs_sum += float(diff.double().sum())
        ref_abs_sum += float(r.abs().double().sum())
        sq_sum += float(diff.double().pow(2).sum())
    return {
        "max_rel": max_ratio,
        "mean_rel": abs_sum / ref_abs_sum if ref_abs_sum else 0.0,
        "rel_to_update": sq_sum**0.5 / update_norm if update_norm else float("nan"),
    }


def estimate_drift(run: Run, reference: Run) -> list[dict[str, float]]:
    rows = []
    for i, (x, r) in enumerate(zip(run.estimates, reference.estimates)):
        diff = (x - r).abs()
        rows.append({
            "iteration": i + 1, "tau": reference.taus[i],
            "x0_max_rel": float(diff.max() / r.abs().max()), "x0_mean_rel": float(diff.mean() / r.abs().mean()),
            "loss_rel": abs(run.losses[i] - reference.losses[i]) / abs(reference.losses[i]),
            "grad_norm_rel": abs(run.grad_norms[i] - reference.grad_norms[i]) / abs(reference.grad_norms[i]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="full", choices=("full", "tiny"))
    parser.add_argument("--configs", default=",".join(CONFIGURATIONS), help=f"comma-separated, the first is the reference; from: {', '.join(CONFIGURATIONS)}")
    parser.add_argument("--iterations", type=int, default=300, help="at most this many iterations per configuration")
    parser.add_argument("--seconds", type=float, default=60.0, help="the reference runs as many iterations as fit in this long (0: no limit)")
    parser.add_argument("--until", type=float, default=0.0,
                        help="stop the configurations after the reference once this many seconds since the start have "
                        "passed (compared over the iterations they ran; 0: no limit)")
    parser.add_argument("--snapshots", type=int, default=5, help="weight comparisons at this many evenly spaced iterations")
    parser.add_argument("--views", type=int, default=4)
    # A short schedule so that a few hundred iterations cross several τ and their Euler steps.
    parser.add_argument("--distill-dt", type=int, default=100)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--k-initial", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/loop_drift.json when OUT is set")
    args = parser.parse_args()

    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGURATIONS)}")
    device = torch.device(args.device)
    started = time.perf_counter()
    editor = build_editor(args.preset, device=device, random_weights=True, metrics=False)
    setup_seconds = time.perf_counter() - started
    size = editor.default_config.method.student_image_size
    scene = synthetic_scene(args.views, size, seed=0)
    edit = Edit("turn him into a knight")
    schedule = {"distill_dt": args.distill_dt, "k": args.k, "k_initial": args.k_initial, "warmup_steps": args.warmup_steps,
                "seed": args.seed, "teacher_steps": 2, "log_every": 1_000_000}
    leaked = [m for m in ("prefect", "ray", "pycolmap") if m in sys.modules]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), preset {args.preset}, "
          f"editor built in {setup_seconds:.1f} s; imported prefect/ray/pycolmap: {leaked or 'none'}", flush=True)

    out = args.json or (Path(os.environ["OUT"]) / "loop_drift.json" if os.environ.get("OUT") else None)
    deadline = started + args.until if args.until else None
    runs: dict[str, Run] = {}
    reference: Run | None = None
    iterations = args.iterations
    for name in names:
        if reference is not None and deadline is not None and time.perf_counter() > deadline:
            print(f"{name}: not run, --until {args.until:g} s passed", flush=True)
            continue
        if editor.device.type == "cuda":  # the previous configuration's blocks (and graph pools) back to the driver
            gc.collect()
            torch.cuda.empty_cache()
        config = editor.default_config.overridden({**schedule, **CONFIGURATIONS[name]})
        iterations = min(iterations, config.total_iterations)
        if reference is None:
            run = run_loop(editor, scene, edit, config, name, iterations, seconds=args.seconds if args.seconds > 0 else None,
                           snapshots=args.snapshots)
            reference, iterations = run, len(run.losses)
        else:
            run = run_loop(editor, scene, edit, config, name, iterations, reference=reference, deadline=deadline)
        runs[name] = run
        cut = f" (cut short by --until: {len(run.losses)} of {iterations})" if len(run.losses) < iterations else ""
        print(f"{name}: {len(run.losses)} iterations in {run.seconds:.1f} s{cut}, τ {run.taus[0]}…{run.taus[-1]}, plan {run.plan}", flush=True)
        report = drift_report(runs, reference, iterations, args, schedule, device)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
    print_report(report, runs, reference)
    if out is not None:
        print(f"wrote {out}")


def drift_report(runs: dict[str, Run], reference: Run, iterations: int, args, schedule: dict, device: torch.device) -> dict[str, Any]:
    """Every configuration run so far against the reference: per iteration, at the weight snapshots,
    and the maximum over the iterations it ran."""
    report: dict[str, Any] = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset, "iterations": iterations, "schedule": schedule, "reference": reference.name,
        "reference_seconds": reference.seconds, "torch": torch.__version__, "configurations": {}, "notes": [],
    }
    note = one_execution_note(runs, device)
    if note:
        report["notes"].append(note)
    for name, run in runs.items():
        if run is reference:
            continue
        rows = estimate_drift(run, reference)
        weights = {str(k): v for k, v in sorted(run.weight_drift.items())}
        report["configurations"][name] = {
            "plan": run.plan, "seconds": run.seconds, "iterations": len(run.losses), "per_iteration": rows, "weights": weights,
            "max": {key: max(row[key] for row in rows) for key in ("x0_max_rel", "x0_mean_rel", "loss_rel", "grad_norm_rel")}
            | {f"weights_{key}": max((w[key] for w in run.weight_drift.values()), default=None) for key in ("max_rel", "mean_rel", "rel_to_update")},
        }
    if "fast" in report["configurations"] and "eager_bf16" in report["configurations"]:
        fast, bf16 = report["configurations"]["fast"]["max"], report["configurations"]["eager_bf16"]["max"]
        report["fast_over_eager_bf16"] = {k: fast[k] / bf16[k] for k in fast if fast[k] is not None and bf16[k]}
    return report


def print_report(report: dict[str, Any], runs: dict[str, Run], reference: Run) -> None:
    for note in report["notes"]:
        print("NOTE: " + note, flush=True)
    print(f"\ndrift against {reference.name} (relative; θ = the student's fp32 weights, Δθ/update = ‖θ − θ_ref‖ / ‖θ_ref − θ_pristine‖)")
    print(f"{'configuration':<18} {'iter':>5} {'τ':>4} {'loss rel':>9} {'gnorm rel':>9} {'x̂0 max rel':>11} {'x̂0 mean rel':>12} "
          f"{'θ max rel':>9} {'θ mean rel':>10} {'Δθ/update':>9}")
    for iteration in sorted(reference.snapshots):
        for name, summary in report["configurations"].items():
            if iteration > summary["iterations"]:
                continue
            row = summary["per_iteration"][iteration - 1]
            w = runs[name].weight_drift.get(iteration, {})
            print(f"{name:<18} {iteration:>5} {row['tau']:>4} {row['loss_rel']:>9.2e} {row['grad_norm_rel']:>9.2e} {row['x0_max_rel']:>11.2e} "
                  f"{row['x0_mean_rel']:>12.2e} {w.get('max_rel', float('nan')):>9.2e} {w.get('mean_rel', float('nan')):>10.2e} "
                  f"{w.get('rel_to_update', float('nan')):>9.2e}")
    print("\nmaximum over the iterations each ran:")
    for name, summary in report["configurations"].items():
        print(f"  {name:<18} ({summary['iterations']} it) " + ", ".join(f"{k} {v:.2e}" for k, v in summary["max"].items() if v is not None))
    if "fast_over_eager_bf16" in report:
        print("  fast / eager_bf16: " + (", ".join(f"{k} {v:.2f}" for k, v in report["fast_over_eager_bf16"].items())
                                         or "n/a (eager_bf16 has no drift here)"))

if __name__ == "__main__":
    main()
