"""The whole scene's time on a warm worker, and a worker's cold start, for one memory profile.

(a) Warm worker: the models are built (random full-size weights: the path, never quality); one short
untimed edit warms the kernels' caches; then two full ``Editor.edit`` runs of the N-view scene
(reference edit at the config's teacher steps, conditioning, the distillation loop, decode,
paste-back), each followed by the CLIP metrics and the outputs written to a temporary folder.  The two
runs use short schedules (every τ, k = k_initial = K₁ then K₂ iterations per τ), so the loop's time
per iteration and its fixed part (graph capture, the Euler steps between τ) come from a two-point
fit; the default schedule's time (2150 iterations) is **extrapolated** from them and labelled so.

(b) Cold start: the time to build the models (random weights, so no disk read), plus an **estimate**
of reading the real checkpoints: their sizes (:data:`CHECKPOINT_GB`) ÷ the disk read rate measured
here by writing a 2 GiB file, evicting it from the page cache (``posix_fadvise(DONTNEED)`` after
``fsync``; the report says whether that could be checked) and reading it back.

(c) ``--modes``: after those, one edit per run mode (``MODE`` or ``MODE:TEACHER``, e.g. ``t2vz``,
``distill:controlnet_canny``) at k = K₁ and ``--teacher-steps``: seconds, peak memory, CLIP metrics and
whether the outputs are finite (the comparison modes' and teachers' paths on the device).

The allocator configuration of a memory profile is a process setting, so one profile per process:

    python benchmarks/edit_end_to_end.py --memory default      # GPU: full size, N = 4
    python benchmarks/edit_end_to_end.py --memory 24gb --memory-cap-gib 24   # as on a 24 GB card
    python benchmarks/edit_end_to_end.py --modes teacher_only,student_only,t2vz,distill:controlnet_canny
    python benchmarks/edit_end_to_end.py --preset tiny --k 1 2  # CPU smoke test

Imports neither Prefect, Ray nor pycolmap (the report lists any of them found loaded).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from imix2mix.config import ALLOCATOR_ENV, MEMORY_PROFILES, apply_allocator, default_config, memory_settings  # noqa: E402

# Sizes of the real checkpoints an EditWorker reads (GB = 10⁹ bytes): SEVA modelv1.1.safetensors,
# the InstructPix2Pix pipeline (fp16 UNet, VAE, CLIP text encoder), CLIP ViT-H-14 (laion2B), the
# metrics' CLIP ViT-L/14 and SEVA's SD-2.1 VAE.  Sizes of the Hub files as listed by their model pages
# (not read here: no weights can be downloaded).
CHECKPOINT_GB = {"seva": 5.0, "ip2p": 2.1, "clip_h": 3.9, "clip_metrics": 1.7, "seva_vae": 0.33}
EDIT_TEXT = ("turn him into a knight", "a photo of a man", "a photo of a knight")
DISK_TEST_BYTES = 2 * 2**30


def disk_read_rate(folder: Path, size: int = DISK_TEST_BYTES, block: int = 16 * 2**20) -> dict:
    """Write ``size`` bytes to a file in ``folder``, fsync, evict its pages from the page cache, and
    read it back: bytes per second of the read, and whether the eviction could be confirmed."""
    path = folder / "imix2mix_disk_rate.bin"
    data = os.urandom(block)
    try:
        started = time.perf_counter()
        with open(path, "wb") as handle:
            for _ in range(size // block):
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        write_seconds = time.perf_counter() - started
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            evicted = _resident_fraction(fd, size)
            started = time.perf_counter()
            while os.read(fd, block):
                pass
            read_seconds = time.perf_counter() - started
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return {
        "folder": str(folder), "bytes": size, "write_bytes_per_second": size / write_seconds,
        "read_bytes_per_second": size / read_seconds,
        "page_cache_resident_before_read": evicted,
        "method": "write + fsync, posix_fadvise(DONTNEED), sequential 16 MiB reads",
    }


def _resident_fraction(fd: int, size: int) -> float | None:
    """The fraction of the file's pages in the page cache (``mincore`` of a mapping), or None where it
    cannot be asked (a read of a fully resident file measures memory, not the disk)."""
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
                return None
            return sum(v & 1 for v in vector) / pages
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    except (OSError, AttributeError):
        return None


class MemoryTrace:
    """The CUDA allocator's reserved and allocated bytes sampled every ``interval`` seconds from a
    thread while a block runs (host-side counters: no sync, no kernel), to find *when* an edit reaches
    its reserved peak.  ``samples``: (seconds since the start, reserved GiB, allocated GiB)."""

    def __init__(self, device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.samples: list[tuple[float, float, float]] = []
        self.started = 0.0  # time.perf_counter() when sampling began: the samples' zero
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryTrace":
        import torch

        self.started = time.perf_counter()

        def sample() -> None:
            while not self._stop.is_set():
                self.samples.append((time.perf_counter() - self.started, torch.cuda.memory_reserved(self.device) / 2**30,
                                     torch.cuda.memory_allocated(self.device) / 2**30))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, phases: list[tuple[str, float, float]], points: int = 400) -> dict | None:
        """The reserved peak, when it came and in which phase (``phases``: (name, start, end) in seconds
        on the samples' clock, as :func:`phases_on_trace_clock` gives them), and the trace thinned to
        about ``points`` samples; None without samples (a sampler that failed must not fail the benchmark)."""
        if not self.samples:
            return None
        at, reserved, allocated = max(self.samples, key=lambda sample: sample[1])
        step = max(1, len(self.samples) // points)
        return {
            "peak_reserved_gib": reserved, "allocated_then_gib": allocated, "peak_at_seconds": at,
            "peak_phase": phase_at(at, phases),
            "phases": [[name, round(start, 3), round(end, 3)] for name, start, end in phases],
            "trace": [[round(x, 3) for x in sample] for sample in self.samples[::step]],
        }


def phases_on_trace_clock(spans: list[tuple[str, float, float]], edit_started: float, trace_started: float) -> list[tuple[str, float, float]]:
    """An edit's phase spans (seconds since the edit began, ``EditResult.phase_spans``) moved onto the
    memory trace's clock (seconds since sampling began)."""
    offset = edit_started - trace_started
    return [(name, start + offset, end + offset) for name, start, end in spans]


def phase_at(seconds: float, phases: list[tuple[str, float, float]]) -> str:
    """The phase of ``phases`` ((name, start, end), in run order) that contains ``seconds``, or where
    it falls between them: untimed setup (the session's onloads, the view preparation) and the steps
    after the last phase (building the result) belong to no phase."""
    previous = None
    for name, start, end in phases:
        if seconds < start:
            return f"before {name}" if previous is None else f"between {previous} and {name}"
        if seconds < end:
            return name
        previous = name
    return "before any phase" if previous is None else f"after {previous}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="default", choices=tuple(MEMORY_PROFILES), help="memory profile (one per process)")
    parser.add_argument("--preset", default="full", choices=("full", "tiny"))
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--k", type=int, nargs=2, default=(2, 6), metavar=("K1", "K2"),
                        help="iterations per τ (and k_initial) of the two timed edits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EditConfig override")
    parser.add_argument("--scene", type=Path, default=None, help="a scene folder (default: a synthetic scene of --views views)")
    parser.add_argument("--modes", default="", help="also one edit per comma-separated MODE or MODE:TEACHER (c)")
    parser.add_argument("--teacher-steps", type=int, default=5, help="teacher steps of the --modes runs")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the disk-rate file (default: the temp dir)")
    parser.add_argument("--disk-bytes", type=int, default=DISK_TEST_BYTES)
    parser.add_argument("--no-disk", action="store_true", help="skip the disk read rate")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="cap the CUDA caching allocator at this many GiB before building the models (a 24 GB card: 24); "
                        "a profile that does not fit fails with out-of-memory; no effect on CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args(argv)
    if args.k[0] >= args.k[1]:
        parser.error("--k K1 K2 needs K1 < K2")
    apply_allocator(args.memory, os.environ)  # before torch initialises CUDA

    import numpy as np
    import torch

    from bench_edit import cap_allocator, synthetic_scene
    from imix2mix.edits import Edit
    from imix2mix.outputs import write_edit_outputs
    from imix2mix.accel import Execution, GraphedStudent
    from imix2mix.modes.distill import Distillation
    from imix2mix.presets import build_editor

    run_object_types = (Distillation, Execution, GraphedStudent)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cap_allocator(device, args.memory_cap_gib)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    base = default_config(args.preset).overridden(memory_settings(args.memory, dict(item.split("=", 1) for item in args.set)))
    schedule_iterations = base.total_iterations
    edit = Edit(EDIT_TEXT[0], source_caption=EDIT_TEXT[1], target_caption=EDIT_TEXT[2])
    if args.scene is not None:
        from imix2mix.scene import load_scene

        scene = load_scene(args.scene)
    else:
        scene = synthetic_scene(args.views, max(base.method.student_image_size, 64))

    # (b) cold start: building the models
    started = time.perf_counter()
    editor = build_editor(args.preset, device=device, random_weights=args.preset == "full", metrics=True)
    sync()
    build_seconds = time.perf_counter() - started

    def scene_run(k: int, overrides: dict | None = None, check: bool = False) -> dict:
        config = base.overridden({"k": k, "k_initial": k, **(overrides or {})})
        # What an earlier run left behind (a warm worker must hold none of it): memory, and the loop's
        # objects still alive, before any garbage collection.
        held = {
            "allocated_before_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "live_run_objects": sorted(type(o).__name__ for o in gc.get_objects() if isinstance(o, run_object_types)),
        }
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trace = MemoryTrace(device) if device.type == "cuda" else contextlib.nullcontext()
        with trace:
            started = time.perf_counter()
            result = editor.edit(scene, edit, config)
            sync()
        edit_seconds = time.perf_counter() - started
        memory_trace = None
        if isinstance(trace, MemoryTrace):
            memory_trace = trace.summary(phases_on_trace_clock(result.phase_spans, started, trace.started))
        started = time.perf_counter()
        metrics = editor.score(result, edit)
        metrics_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            write_edit_outputs(result, scene, folder, metrics=metrics)
        write_seconds = time.perf_counter() - started
        extra = {}
        if check:  # the --modes runs: what came out, not only how long it took
            extra = {
                "finite": all(bool(np.isfinite(view.astype(np.float32)).all()) for view in result.views),
                "views": len(result.views), "full_view_shapes": [list(v.shape) for v in result.full_views],
                "metrics": {k: getattr(metrics, k) for k in ("clip_sim", "clip_dir", "clip_cons")},
            }
        return {
            **extra, **held, "k": k, "iterations": result.iterations, "edit_seconds": edit_seconds, "metrics_seconds": metrics_seconds,
            "write_seconds": write_seconds, "timings": dict(result.timings),
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
            "memory_trace": memory_trace,
        }

    # (a) warm worker: one short untimed edit, then the two timed ones
    scene_run(1, {"teacher_steps": 2})
    short, long = (scene_run(k) for k in args.k)
    distill_per_iteration = (long["timings"]["distill"] - short["timings"]["distill"]) / (long["iterations"] - short["iterations"])
    distill_fixed = short["timings"]["distill"] - distill_per_iteration * short["iterations"]
    around_loop = long["edit_seconds"] - long["timings"]["distill"] + long["metrics_seconds"] + long["write_seconds"]
    scene_seconds = around_loop + distill_fixed + distill_per_iteration * schedule_iterations

    report = {
        "memory_profile": args.memory, "allocator": os.environ.get(ALLOCATOR_ENV, ""), "preset": args.preset,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "views": args.views, "memory_cap_gib": args.memory_cap_gib,
        "total_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
        "config": base.to_dict(),
        "warm_worker": {
            "runs": [short, long],
            "loop_seconds_per_iteration": distill_per_iteration,
            "loop_fixed_seconds": distill_fixed,
            "around_the_loop_seconds": around_loop,
            "schedule_iterations": schedule_iterations,
            "extrapolated_scene_seconds": scene_seconds,
            "label": f"extrapolated: loop fitted on {short['iterations']} and {long['iterations']} iterations, "
                     f"applied to {schedule_iterations}; reference edit, conditioning, decode, metrics and writing measured",
        },
        "cold_start": {"model_build_seconds_random_weights": build_seconds, "checkpoint_gb": CHECKPOINT_GB},
    }
    if not args.no_disk:
        scratch = args.scratch or Path(tempfile.gettempdir())
        disk = disk_read_rate(scratch, args.disk_bytes)
        load_seconds = sum(CHECKPOINT_GB.values()) * 1e9 / disk["read_bytes_per_second"]
        report["cold_start"].update(
            disk=disk, estimated_checkpoint_read_seconds=load_seconds,
            estimated_cold_start_seconds=build_seconds + load_seconds,
            label="estimate: build time with random weights + checkpoint bytes ÷ measured sequential read rate",
        )

    def write_report() -> None:  # after each part: a run cut short keeps what it measured
        report["imported"] = sorted(name for name in ("prefect", "ray", "pycolmap") if name in sys.modules)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"edit_end_to_end_{args.memory}.json").write_text(json.dumps(report, indent=1, default=str))

    warm = report["warm_worker"]
    print(f"{args.memory}: {warm['loop_seconds_per_iteration']:.4f} s/it in the loop, "
          f"{scene_seconds / 60:.1f} min per scene (extrapolated to {schedule_iterations} iterations); "
          f"build {build_seconds:.1f} s" + (f", checkpoint read ≈ {report['cold_start']['estimated_checkpoint_read_seconds']:.1f} s "
                                            f"at {report['cold_start']['disk']['read_bytes_per_second'] / 1e9:.2f} GB/s"
                                            if not args.no_disk else "")
          + (f"; peak {long['peak_allocated_gib']:.1f} GiB allocated, {long['peak_reserved_gib']:.1f} GiB reserved"
             if device.type == "cuda" else ""), flush=True)
    report["modes"] = {}
    write_report()
    for run in [item for item in args.modes.split(",") if item]:
        mode, _, teacher = run.partition(":")
        report["modes"][run] = scene_run(args.k[0], {"mode": mode, "teacher_steps": args.teacher_steps,
                                                     **({"teacher": teacher} if teacher else {})}, check=True)
        print(run, json.dumps(report["modes"][run], default=str), flush=True)
        write_report()
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
