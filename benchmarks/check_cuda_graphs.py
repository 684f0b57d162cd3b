"""GPU check that CUDA-graph replay of the student (and channels-last with the fused NHWC GroupNorm)
computes what the eager NCHW student computes.

Full-size random weights, the same scene and seed: four distillation iterations and one Euler step
each way; prints the relative differences of the losses, of the latents after the Euler step, and of
the weight updates (the weights minus the pristine copy).

    python benchmarks/check_cuda_graphs.py        # on a CUDA machine
    python benchmarks/check_cuda_graphs.py --configs "eager,compiled+graphs" --timed-steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_edit import KERNEL_SWITCHES, disable_kernels, synthetic_scene  # noqa: E402
from imix2mix.edits import Edit  # noqa: E402
from imix2mix.presets import build_editor  # noqa: E402


# A configuration key (not an EditConfig field): run the layers on torch's ops, no Triton kernel.
KERNELS_OFF = "torch_ops_only"
CONFIGURATIONS = {
    # The reference: eager, NCHW, torch's ops only (no Triton kernel: KERNELS_OFF, which also means
    # torch's fused AdamW under autocast's per-use weight casts, not bf16 weight copies).
    "eager": {"cuda_graphs": False, "channels_last": False, KERNELS_OFF: True},
    "eager again": {"cuda_graphs": False, "channels_last": False, KERNELS_OFF: True},
    "graphed": {"cuda_graphs": True, "channels_last": False, KERNELS_OFF: True},
    # The default before bf16 weight copies (every other kernel on).
    "graphed+channels_last-copies": {"cuda_graphs": True, "channels_last": True, "bf16_weight_copies": False},
    # eager with every Triton kernel (LayerNorm, GEGLU, bias gradients; GroupNorm needs channels-last)
    "eager+kernels": {"cuda_graphs": False, "channels_last": False},
    # channels-last with the fused NHWC GroupNorm kernels, and every other kernel (the default)
    "channels_last": {"cuda_graphs": False, "channels_last": True},
    "graphed+channels_last": {"cuda_graphs": True, "channels_last": True},
    # Last: compiling is in place and stays.
    "compiled+graphs": {"compile": True, "cuda_graphs": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="eager,eager again,graphed", help=f"comma-separated, from: {', '.join(CONFIGURATIONS)}")
    parser.add_argument("--no-euler", action="store_true", help="skip the Euler step (and its latents comparison)")
    parser.add_argument("--timed-steps", type=int, default=0, help="then time this many more steps (median, synchronised)")
    args = parser.parse_args()
    editor = build_editor("full", device="cuda", random_weights=True, metrics=False)
    scene = synthetic_scene(4, 576)
    results = {}
    for name in args.configs.split(","):
        overrides = dict(CONFIGURATIONS[name])
        restore = disable_kernels(KERNEL_SWITCHES) if overrides.pop(KERNELS_OFF, False) else []
        config = editor.default_config.overridden({"teacher_steps": 2, **overrides})
        started = time.perf_counter()
        distillation = editor.prepare_distillation(scene, Edit("turn him into a knight"), config)
        torch.cuda.synchronize()
        setup = time.perf_counter() - started
        losses, step_seconds = [], []
        for _ in range(4):
            started = time.perf_counter()
            losses.append(float(distillation.step().loss))
            step_seconds.append(time.perf_counter() - started)
            print(f"{name}: step {len(losses)} {step_seconds[-1]:.2f} s", flush=True)
        started = time.perf_counter()
        if not args.no_euler:
            distillation.advance()
        torch.cuda.synchronize()
        advance_seconds = time.perf_counter() - started
        latents = distillation.latents.clone()
        # The fp32 weights: with bf16 weight copies the parameters hold the copies until close().
        distillation.close()
        updates = {n: (p.detach().float() - editor._pristine[n].cuda().float()) for n, p in editor.student.named_parameters()}
        results[name] = (losses, latents, updates)
        if args.timed_steps:  # a fresh run: close() ended the first one's weight copies
            editor.finish_distillation(distillation)
            del distillation
            torch.cuda.empty_cache()
            distillation = editor.prepare_distillation(scene, Edit("turn him into a knight"), config)
            distillation.step()
            timed = []
            for _ in range(args.timed_steps):
                started = time.perf_counter()
                distillation.step()
                torch.cuda.synchronize()
                timed.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"{name}: {statistics.median(timed):.4f} s/it (median of {len(timed)}), peak allocated {peak:.1f} GiB", flush=True)
        editor.finish_distillation(distillation)
        del distillation  # its graphs and their memory go before the next capture
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for undo in restore:
            undo()
        steps = ", ".join(f"{x:.2f}" for x in step_seconds)
        print(f"{name}: setup {setup:.1f} s, first steps {steps} s, Euler step {advance_seconds:.1f} s, losses {losses}", flush=True)
    reference = "eager" if "eager" in results else next(iter(results))
    (reference_losses, reference_latents, reference_updates) = results[reference]
    for name in [n for n in results if n != reference]:
        losses, latents, updates = results[name]
        loss_diff = max(abs(a - b) / abs(a) for a, b in zip(reference_losses, losses))
        latent_diff = float((latents - reference_latents).norm() / reference_latents.norm())
        total = sum(float((updates[n] - reference_updates[n]).norm() ** 2) for n in updates) ** 0.5
        scale = sum(float(reference_updates[n].norm() ** 2) for n in updates) ** 0.5
        print(f"{name} vs {reference}: loss {loss_diff:.2e}, latents {latent_diff:.2e}, all weight updates {total / scale:.2e} (relative)")


if __name__ == "__main__":
    main()
