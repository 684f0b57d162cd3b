"""GPU check that CUDA-graph replay of the student computes what the eager student computes.

Full-size random weights, the same scene and seed: four distillation iterations and one Euler step
each way; prints the relative differences of the losses, of the latents after the Euler step, and of
the weight updates (the weights minus the pristine copy).

    python benchmarks/check_cuda_graphs.py        # on a CUDA machine
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_edit import synthetic_scene  # noqa: E402
from imix2mix.distill import Edit  # noqa: E402
from imix2mix.presets import build_editor  # noqa: E402


def main() -> None:
    editor = build_editor("full", device="cuda", random_weights=True, metrics=False)
    scene = synthetic_scene(4, 576)
    results = {}
    for name, graphs in (("eager", False), ("eager again", False), ("graphed", True)):
        config = editor.default_config.overridden({"teacher_steps": 2, "cuda_graphs": graphs})
        started = time.perf_counter()
        distillation = editor.prepare_distillation(scene, Edit("turn him into a knight"), config)
        torch.cuda.synchronize()
        setup = time.perf_counter() - started
        losses = [float(distillation.step().loss) for _ in range(4)]
        distillation.advance()
        latents = distillation.latents.clone()
        updates = {n: (p.detach().float() - editor._pristine[n].cuda().float()) for n, p in editor.student.named_parameters()}
        editor.finish_distillation()
        results[name] = (losses, latents, updates)
        del distillation  # its graphs and their memory go before the next capture
        print(f"{name}: setup {setup:.1f} s, losses {losses}", flush=True)
    (reference_losses, reference_latents, reference_updates) = results["eager"]
    for name in ("eager again", "graphed"):
        losses, latents, updates = results[name]
        loss_diff = max(abs(a - b) / abs(a) for a, b in zip(reference_losses, losses))
        latent_diff = float((latents - reference_latents).norm() / reference_latents.norm())
        total = sum(float((updates[n] - reference_updates[n]).norm() ** 2) for n in updates) ** 0.5
        scale = sum(float(reference_updates[n].norm() ** 2) for n in updates) ** 0.5
        print(f"{name} vs eager: loss {loss_diff:.2e}, latents {latent_diff:.2e}, all weight updates {total / scale:.2e} (relative)")


if __name__ == "__main__":
    main()
