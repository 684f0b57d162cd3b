"""Speed and memory of one SEVA forward + backward (the student's training step, without optimizer).

The network is built with random weights directly on the device (no checkpoint), fp32 master
weights, forward under bf16 autocast, loss = mean square of the output, backward into every
parameter. The default workload is the I-Mix2Mix one: T = 5 frames (reference + 4 views) at a
72×72 latent (576² images).

    python benchmarks/bench_seva.py --device cuda --out benchmarks/results/seva_h100.json
    python benchmarks/bench_seva.py --preset tiny --device cpu --iterations 2 --warmup 1   # smoke test

Prints one JSON line: median seconds per forward+backward (device-synchronised), every timing,
and the peak allocated memory (``torch.cuda.max_memory_allocated``; null on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from imix2mix.seva import Seva, SevaConfig  # noqa: E402

PRESETS = {"full": SevaConfig, "tiny": SevaConfig.tiny}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(config: SevaConfig, frames: int, latent: int, device: torch.device, seed: int) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {
        "x": torch.randn(frames, config.in_channels, latent, latent, generator=g, device=device),
        "t": torch.randint(0, 1000, (frames,), generator=g, device=device),
        "y": torch.randn(frames, 1, config.context_dim, generator=g, device=device),
        "dense_y": torch.randn(frames, config.dense_in_channels, latent, latent, generator=g, device=device),
        "num_frames": frames,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        # Official numerics (fp32 master weights) without TF32 shortcuts unless asked for.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    config = PRESETS[args.preset]()
    with device:
        network = Seva(config)
    network.train()
    network.enable_gradient_checkpointing(args.gradient_checkpointing)
    model = torch.compile(network) if args.compile else network
    inputs = make_inputs(config, args.frames, args.latent, device, args.seed)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16_autocast" else contextlib.nullcontext()
    )

    def step() -> None:
        network.zero_grad(set_to_none=True)
        with autocast:
            out = model(**inputs)
        out.float().square().mean().backward()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(args.iterations):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)

    return {
        "benchmark": "seva_forward_backward",
        "preset": args.preset,
        "parameters": sum(p.numel() for p in network.parameters()),
        "frames": args.frames,
        "latent": args.latent,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile,
        "tf32": args.tf32,
        "median_seconds": statistics.median(seconds),
        "seconds": seconds,
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "warmup": args.warmup,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--latent", type=int, default=72, help="latent side (image side / 8); multiple of 8")
    parser.add_argument("--precision", choices=["bf16_autocast", "fp32"], default="bf16_autocast")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here (a folder gets seva_<preset>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.out is not None:
        out = args.out / f"seva_{args.preset}.json" if args.out.suffix != ".json" else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
