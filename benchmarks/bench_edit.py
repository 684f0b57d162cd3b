"""Speed and memory of the real distillation iteration at full model size (random weights).

Runs the same code path as ``imix2mix edit``: :func:`imix2mix.presets.build_editor` builds the
full-size student (SEVA, 1.26 B parameters), teacher (IP2P UNet, VAE, CLIP text encoder) and CLIP-H
with random weights; :meth:`Editor.prepare_distillation` does the per-scene setup exactly as
``Editor.edit`` does; then :meth:`Distillation.step` is timed.  Imports neither Prefect nor Ray, so it
runs on the GPU machine with only the diffusers wheel carried.

    python benchmarks/bench_edit.py --device cuda --out benchmarks/results          # full size, GPU
    python benchmarks/bench_edit.py --preset tiny --device cpu --iterations 3         # smoke test here
    python benchmarks/bench_edit.py --modes graphed,24gb --views 2 4 8 --memory-cap-gib 24  # a 24 GB card's budget

A mode named after a memory profile (``24gb``, ``lean``; imix2mix.config.MEMORY_PROFILES) also takes
the profile's allocator configuration (expandable segments).  That is a process-level setting: when
every selected mode asks for the same one it is put in ``PYTORCH_CUDA_ALLOC_CONF`` before CUDA
initialises, as ``imix2mix edit --memory`` and the EditWorkers do; when the modes differ, it is
switched around each measurement (``torch.cuda.memory._set_allocator_settings``, after the previous
configuration's memory went back to the driver), and each row says which allocator it ran under.
``--memory-cap-gib G`` caps the caching allocator at G GiB (``set_per_process_memory_fraction``)
before the models are built, so a configuration that would not fit a G GiB card fails with an
out-of-memory error, reported as its row's error; on CPU the cap does nothing.

Each configuration reports the median seconds per iteration (device-synchronised after each step,
after warm-up), a per-phase split (a separate pass with phase timing, which synchronises between
phases), peak allocated/reserved memory, and the projected minutes for the default schedule.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, REPO_ROOT / "benchmarks"):  # the package, and the sibling benchmark scripts
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from imix2mix.config import ALLOCATOR_ENV, KERNEL_OPS, MEMORY_PROFILES, EditConfig, KernelChoice, apply_allocator  # noqa: E402
from imix2mix.edits import Edit  # noqa: E402
from imix2mix.errors import ConfigError  # noqa: E402
from imix2mix.presets import build_editor, default_config  # noqa: E402
from imix2mix.scene import Scene, View  # noqa: E402

DEFAULT_SCHEDULE_ITERATIONS = EditConfig().total_iterations  # 2150


def synthetic_scene(num_views: int, size: int, seed: int = 0) -> Scene:
    """``num_views`` cameras on a 60° arc looking at the origin, random-texture photos.

    Content does not change the cost of dense compute, so random pixels are a fair workload."""
    rng = np.random.default_rng(seed)
    views = []
    focal = size / (2 * math.tan(math.radians(27)))
    K = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])
    for i in range(num_views):
        angle = math.radians(-30 + 60 * i / max(num_views - 1, 1))
        centre = np.array([3 * math.sin(angle), 0.0, -3 * math.cos(angle)])
        forward = -centre / np.linalg.norm(centre)
        right = np.cross([0.0, 1.0, 0.0], forward)
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        c2w = np.eye(4)
        c2w[:3, :3] = np.stack([right, down, forward], axis=1)
        c2w[:3, 3] = centre
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        views.append(View(name=f"view_{i:02d}.png", image=image, K=K, c2w=c2w))
    return Scene(views=tuple(views), pose_source="transforms")


@dataclass
class Measurement:
    name: str
    n_views: int
    overrides: dict[str, Any]
    seconds_per_iteration: float | None = None
    iteration_seconds: list[float] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_allocated_bytes: int | None = None
    peak_memory_reserved_bytes: int | None = None
    # The scene setup's share of the peak (reference edit, conditioning, graph capture comes later).
    setup_peak_allocated_bytes: int | None = None
    setup_peak_reserved_bytes: int | None = None
    # After the timed iterations: what holds the memory (:func:`memory_breakdown`).
    memory_breakdown: dict[str, Any] = field(default_factory=dict)
    setup_seconds: float | None = None
    first_step_seconds: float | None = None
    projected_minutes_per_scene: float | None = None
    allocator: str = ""  # PYTORCH_CUDA_ALLOC_CONF in effect ("" torch's default)
    error: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(editor, name: str, n_views: int, base: EditConfig, overrides: dict[str, Any], args) -> Measurement:
    device = editor.device
    result = Measurement(name=name, n_views=n_views, overrides=overrides)
    config = base.overridden(overrides)
    scene = synthetic_scene(n_views, max(config.method.student_image_size, 64))
    edit = Edit("turn him into a knight")
    prepared = None
    try:
        _release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        prepared = editor.prepare_distillation(scene, edit, config)
        distillation = prepared.__enter__()
        _sync(device)
        result.setup_seconds = time.perf_counter() - started
        if device.type == "cuda":
            result.setup_peak_allocated_bytes = int(torch.cuda.max_memory_allocated(device))
            result.setup_peak_reserved_bytes = int(torch.cuda.max_memory_reserved(device))

        started = time.perf_counter()
        distillation.step()
        _sync(device)
        result.first_step_seconds = time.perf_counter() - started
        for _ in range(args.warmup):
            distillation.step()
        _sync(device)

        for _ in range(args.iterations):
            started = time.perf_counter()
            distillation.step()
            _sync(device)
            result.iteration_seconds.append(time.perf_counter() - started)
        result.seconds_per_iteration = statistics.median(result.iteration_seconds)
        try:
            result.memory_breakdown = memory_breakdown(distillation, device)
        except Exception as exc:  # noqa: BLE001 (a diagnostic: never the measurement's end)
            result.memory_breakdown = {"error": f"{type(exc).__name__}: {exc}"}
        result.projected_minutes_per_scene = result.seconds_per_iteration * DEFAULT_SCHEDULE_ITERATIONS / 60

        # Phase split: a separate pass, because timing phases synchronises between them.
        distillation.timer.enabled = True
        distillation.timer.totals.clear()
        for _ in range(args.phase_iterations):
            distillation.step()
        result.phase_seconds = {k: v / args.phase_iterations for k, v in distillation.timer.totals.items()}
        distillation.timer.enabled = False
        if args.profile_dir is not None and not PROFILED:
            profile_steps(distillation, device, args.profile_dir / f"profile_{name.replace('=', '-').replace('+', '_')}_N{n_views}.txt")
            PROFILED.add(name)
        if device.type == "cuda":
            result.peak_memory_allocated_bytes = int(torch.cuda.max_memory_allocated(device))
            result.peak_memory_reserved_bytes = int(torch.cuda.max_memory_reserved(device))
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        # An allocation past the cap can also surface as a CUDA error inside a graph capture.
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc):
            raise
        result.error = f"out of memory: {str(exc).splitlines()[0]}"
        if device.type == "cuda":  # how far it got
            result.peak_memory_allocated_bytes = int(torch.cuda.max_memory_allocated(device))
            result.peak_memory_reserved_bytes = int(torch.cuda.max_memory_reserved(device))
    finally:
        if prepared is not None:
            try:
                prepared.__exit__(None, None, None)  # the plan undone: weight copies, graphs, formats
            except torch.OutOfMemoryError as exc:  # a row measured under a cap is kept, with what failed after it
                message = f"out of memory undoing the plan: {str(exc).splitlines()[0]}"
                result.error = f"{result.error}; {message}" if result.error else message
        prepared = distillation = None  # its graphs and optimizer state go before the next configuration
        _release(device)
    return result


PROFILED: set[str] = set()


def rounded(value: Any, digits: int = 2) -> Any:
    """``value`` with every float in it (nested dicts) rounded, for printing."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return round(value, digits) if isinstance(value, float) else value


def memory_breakdown(distillation, device: torch.device) -> dict[str, Any]:
    """GiB held now, by owner: the student's parameters (by dtype), their gradients, the optimizer's
    state (by entry), the teacher's parameters; and the caching allocator's segments by pool (the
    shared pool, and each CUDA graph's private pool: the captured passes' activations and outputs)."""
    gib = 2**-30
    seen: set[int] = set()

    def size(tensors) -> float:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == device.type and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total * gib

    breakdown: dict[str, Any] = {}
    if device.type == "cuda":
        breakdown.update(allocated=torch.cuda.memory_allocated(device) * gib, reserved=torch.cuda.memory_reserved(device) * gib)
    student = distillation.execution.student
    for dtype in sorted({str(p.dtype) for p in student.parameters()}):
        breakdown[f"student parameters {dtype}"] = size(p for p in student.parameters() if str(p.dtype) == dtype)
    breakdown["student gradients"] = size(p.grad for p in student.parameters() if p.grad is not None)
    for optimizer in distillation.execution.optimizers:
        for key in sorted({k for state in optimizer.state.values() for k in state}):
            breakdown[f"optimizer {key}"] = size(state.get(key) for state in optimizer.state.values())
    teacher_modules = [m for m in vars(distillation.teacher).values() if isinstance(m, torch.nn.Module)]
    pipeline = getattr(distillation.teacher, "pipeline", None)
    teacher_modules += [m for m in vars(pipeline).values() if isinstance(m, torch.nn.Module)] if pipeline is not None else []
    breakdown["teacher parameters"] = size(p for m in teacher_modules for p in m.parameters())
    if device.type != "cuda":
        return breakdown
    pools: dict[str, dict[str, float]] = {}
    for segment in torch.cuda.memory_snapshot():
        if segment.get("device", device.index or 0) != (device.index or 0):
            continue
        pool = pools.setdefault(str(tuple(segment.get("segment_pool_id", ()))), {"reserved": 0.0, "allocated": 0.0})
        pool["reserved"] += segment["total_size"] * gib
        pool["allocated"] += segment["allocated_size"] * gib
    breakdown["pools"] = pools
    return breakdown


def profile_steps(distillation, device: torch.device, path: Path, steps: int = 3) -> None:
    """Kernel-level tables of a few iterations (torch.profiler): the top operators, and on CUDA the
    device time per iteration of every kernel, summed by kind (``<path>.json``)."""
    from torch.profiler import ProfilerActivity, profile

    from probe_speed import kernel_table  # the one kernel classification

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            distillation.step()
        _sync(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=80))
    # Which shapes the copies, casts and reductions run on (empty of operators under graph replay).
    path.with_name(path.stem + "_by_shape.txt").write_text(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort_by, row_limit=120, max_name_column_width=40, max_shapes_column_width=100
        )
    )
    if device.type == "cuda":
        totals, top = kernel_table(prof)
        per_iteration = {
            "kernel_seconds": round(sum(totals.values()) / steps, 5),
            "by_kind": {kind: round(seconds / steps, 5) for kind, seconds in totals.items()},
            "top_kernels": [(name, round(seconds / steps, 5), count / steps) for name, seconds, count in top],
        }
        path.with_suffix(".json").write_text(json.dumps(per_iteration, indent=1))


def configurations(args) -> list[tuple[str, int, dict[str, Any]]]:
    """(name, n_views, EditConfig overrides): every mode at ``--views``, then the N sweep and the
    paper's efficiency ablations for ``--sweep-mode``."""
    modes = {name: dict(_parse_set(item) for item in spec) for name, spec in MODES.items()}
    runs: list[tuple[str, int, dict[str, Any]]] = []
    for mode in [m for m in args.modes.split(",") if m]:
        runs += [(mode, n, modes[mode]) for n in args.views]
    if args.sweep_mode:
        base = modes[args.sweep_mode]
        runs += [(args.sweep_mode, n, base) for n in args.sweep_views if n not in args.views]
        if args.ablations:
            runs += [
                (f"{args.sweep_mode}+attention=extended", 4, {**base, "cross_view_attention": "extended"}),
                (f"{args.sweep_mode}+attention=none", 4, {**base, "cross_view_attention": "none"}),
                (f"{args.sweep_mode}+alignment=decode_encode", 4, {**base, "alignment": "decode_encode"}),
                (f"{args.sweep_mode}+student_query_steps=3", 4, {**base, "student_query_steps": 3}),
            ]
    return runs


# Named bundles of EditConfig settings.  "official": the published implementation choices, eager.
# Every other bundle says whether it changes numerics.
MODES: dict[str, list[str]] = {
    "official": ["optimizer=adamw", "compile=false", "cuda_graphs=false", "channels_last=false"],
    # Same numerics: torch's fused AdamW (one kernel for the update), autocast's per-use weight casts.
    "fused": ["optimizer=adamw_fused", "compile=false", "cuda_graphs=false", "channels_last=false", "bf16_weight_copies=false"],
    # Same numerics up to kernel fusion order: torch.compile of the student and of the teacher's ε.
    "compiled": ["optimizer=adamw_fused", "compile=true", "cuda_graphs=false"],
    # Same numerics: the student's forward + backward replayed as CUDA graphs (the default).
    "graphed": ["optimizer=adamw_fused", "compile=false", "cuda_graphs=true"],
    # The default before bf16 weight copies: torch's fused AdamW, autocast casting weights at each use.
    "graphed_torch_adamw": ["optimizer=adamw_fused", "compile=false", "cuda_graphs=true", "bf16_weight_copies=false"],
    # The default before channels-last: NCHW convolutions around torch's GroupNorm.
    # The default's kernels without graph replay: operator-level profiles (--profile-dir) see each op.
    "eager_channels_last": ["optimizer=adamw_fused", "compile=false", "cuda_graphs=false"],
    "graphed_nchw": ["optimizer=adamw_fused", "compile=false", "cuda_graphs=true", "channels_last=false"],
    # Same numerics up to kernel fusion order: compiled kernels replayed as inductor's CUDA graphs.
    "compiled_graphed": ["optimizer=adamw_fused", "compile=true", "cuda_graphs=true"],
}
# The memory profiles as modes (changes numerics: bf16 AdamW moments): "24gb" keeps the default's
# graphs, kernels and weight copies; "lean" recomputes activations (no student graph).
MODES.update({name: [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in MEMORY_PROFILES[name].settings.items()]
              for name in ("24gb", "lean")})


def mode_profile(mode: str) -> str:
    """The memory profile a mode runs under (its allocator configuration): its own name's, else default."""
    name = mode.split("+")[0]
    return name if name in MEMORY_PROFILES else "default"


def mode_allocator(mode: str) -> str:
    return MEMORY_PROFILES[mode_profile(mode)].allocator


def switch_allocator(setting: str) -> None:
    """Change the allocator's configuration of an initialised process: the blocks cached so far go
    back to the driver first, so the next configuration's segments are all of the new kind."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.memory._set_allocator_settings(setting)


def cap_allocator(device: torch.device, gib: float | None) -> None:
    """Cap the CUDA caching allocator at ``gib`` GiB of the card (``set_per_process_memory_fraction``),
    so that a run that would not fit a smaller card fails with out-of-memory here.  None: no cap; on a
    device without the caching allocator a note says the cap does nothing."""
    if gib is None:
        return
    if device.type != "cuda":
        print(f"note: --memory-cap-gib {gib:g} has no effect on {device}", file=sys.stderr)
        return
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()  # the API wants an index
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), index)


def _parse_set(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=["full", "tiny"])
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--views", type=int, nargs="+", default=[4])
    parser.add_argument("--modes", default="official", help=f"comma-separated, from: {', '.join(MODES)}")
    parser.add_argument("--sweep-mode", default=None, help="mode for the N sweep and the ablations")
    parser.add_argument("--sweep-views", type=int, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--ablations", action="store_true", help="the paper's efficiency ablations at N = 4 (with --sweep-mode)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--phase-iterations", type=int, default=5)
    parser.add_argument("--reference-steps", type=int, default=100, help="teacher steps of the first reference edit (one-time cost)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON result file")
    parser.add_argument("--kernels", default="auto", choices=typing.get_args(KernelChoice),
                        help="the acceleration option `kernels` of every configuration (auto: the Triton kernels "
                        "inside CUDA-graph captures, torch's ops eagerly)")
    parser.add_argument("--torch-ops", default="", help=f"comma-separated, from: {', '.join(KERNEL_OPS)}: run those ops on "
                        "torch's ops instead of the Triton kernels (the acceleration option `torch_ops`, for before/after "
                        "numbers; the fused AdamW: the mode graphed_torch_adamw)")
    parser.add_argument("--profile-dir", type=Path, default=None, help="write a torch.profiler table of the first configuration here")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="cap the CUDA caching allocator at this many GiB before building the models (a 24 GB card: 24); "
                        "a configuration that does not fit fails with out-of-memory in its row; no effect on CPU")
    args = parser.parse_args(argv)
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"])  # the GPU machine's result folder
    unknown = [m for m in args.modes.split(",") if m and m not in MODES]
    if unknown:
        parser.error(f"unknown modes {', '.join(unknown)}; modes: {', '.join(MODES)}")
    runs = configurations(args)
    # The allocator is read when CUDA initialises: one setting for the process when every mode agrees.
    if len({mode_allocator(name) for name, _, _ in runs}) == 1:
        apply_allocator(mode_profile(runs[0][0]), os.environ)
    process_allocator = os.environ.get(ALLOCATOR_ENV, "")
    # The kernels through the acceleration options, as any run chooses them (the execution plan
    # decides); checked before the models are built.
    try:
        base = default_config(args.preset).overridden({"kernels": args.kernels, "torch_ops": args.torch_ops})
    except ConfigError as error:
        parser.error(str(error))

    # Only now touch CUDA: the allocator configuration above is read when CUDA initialises.
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # Official numerics: bf16 autocast compute, fp32 master weights; TF32 for leftover fp32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cap_allocator(device, args.memory_cap_gib)
    started = time.perf_counter()
    editor = build_editor(args.preset, device=device, random_weights=args.preset == "full", metrics=False)
    _sync(device)
    build_seconds = time.perf_counter() - started

    # One-time cost of the reference edit (the full IP2P pipeline at the default step count).
    scene = synthetic_scene(4, max(base.method.student_image_size, 64))
    started = time.perf_counter()
    editor.preview(scene, Edit("turn him into a knight"), base.overridden({"teacher_steps": args.reference_steps}))
    _sync(device)
    reference_edit_seconds = time.perf_counter() - started
    base = base.overridden({"teacher_steps": 2})  # the per-configuration reference edits are not what is measured

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    measurements: list[Measurement] = []

    def write_report() -> None:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, *sys.argv]),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "preset": args.preset,
            "kernels": args.kernels,
            "torch_ops": args.torch_ops,
            "memory_cap_gib": args.memory_cap_gib,
            "total_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
            "process_allocator": process_allocator,
            "default_schedule_iterations": DEFAULT_SCHEDULE_ITERATIONS,
            "one_time_seconds": {"model_build": build_seconds, "reference_edit": reference_edit_seconds},
            "reference_edit_steps": args.reference_steps,
            "config": base.to_dict(),
            "modes": {name: dict(_parse_set(item) for item in spec) for name, spec in MODES.items()},
            "measurements": [m.__dict__ for m in measurements],
        }
        text = json.dumps(report, indent=1)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            gpu = (report["gpu"] or "cpu").replace(" ", "-")
            (args.out / f"bench_edit_{gpu}_{stamp}.json").write_text(text)

    for name, n_views, overrides in runs:
        allocator = mode_allocator(name)
        switched = device.type == "cuda" and allocator != process_allocator
        if switched:
            switch_allocator(allocator or "expandable_segments:False")
        try:
            m = measure(editor, name, n_views, base, overrides, args)
        finally:
            if switched:
                switch_allocator(process_allocator or "expandable_segments:False")
        m.allocator = allocator if device.type == "cuda" else ""
        measurements.append(m)
        line = (
            f"{m.name:<38} N={m.n_views:<3} "
            + (f"{m.seconds_per_iteration:.4f} s/it  {m.projected_minutes_per_scene:6.1f} min/scene  "
               f"peak {((m.peak_memory_allocated_bytes or 0) / 2**30):5.1f} GiB allocated "
               f"{((m.peak_memory_reserved_bytes or 0) / 2**30):5.1f} GiB reserved  "
               + " ".join(f"{k}={v:.4f}" for k, v in m.phase_seconds.items())
               if m.seconds_per_iteration is not None else "")
            + (f"  {m.error}" if m.error else "")
        )
        print(line, flush=True)
        if m.memory_breakdown:
            print(f"  setup peak {(m.setup_peak_allocated_bytes or 0) / 2**30:.2f} GiB allocated "
                  f"{(m.setup_peak_reserved_bytes or 0) / 2**30:.2f} GiB reserved; held after the iterations (GiB): "
                  + json.dumps(rounded(m.memory_breakdown)), flush=True)
        write_report()  # after every configuration: a run cut short keeps what it measured

    print(json.dumps({m.name + f"@N={m.n_views}": m.seconds_per_iteration for m in measurements}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
