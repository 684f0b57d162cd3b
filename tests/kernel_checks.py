"""Helpers of the Triton kernel tests: the programs of :mod:`kernel_programs` run in Triton's
interpreter in a child process, and comparisons of low-precision results with their references in
units in the last place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
# Ten times the slowest child seen on a loaded machine: a hang, not slowness, ends a test here.
HANG_GUARD_SECONDS = 3600


def run_program(name: str, *args: str, folder: Path) -> dict:
    """Run ``kernel_programs.<name>`` with ``args`` in a fresh Python in Triton's interpreter; the
    results it saved (``torch.save``) to a file in ``folder``.

    Under the interpreter on a loaded machine a child may take many minutes (the channels-last student
    took about 380 s on a busy 2-core machine), so the limit is only a guard against a hung child,
    :data:`HANG_GUARD_SECONDS`; its output is captured, and a failure shows it."""
    out = folder / f"{name}.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", f"kernel_programs.{name}", *args, str(out)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,
    )
    assert proc.returncode == 0, f"kernel_programs.{name} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out, weights_only=False)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Steps between two bf16/fp16 tensors along the ordered floating-point line (sign-magnitude bits)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def check_low_precision(k: torch.Tensor, r: torch.Tensor, max_ulps: int, atol: float, label: str) -> dict:
    """Each element within ``max_ulps`` of the reference, or within ``atol`` where it is near zero
    (there an fp32-level difference of the inputs can be many ulps of a tiny result)."""
    assert k.dtype == r.dtype, label
    ulps = ulp_distance(k, r)
    diff = (k.float() - r.float()).abs()
    bad = (ulps > max_ulps) & (diff > atol)
    assert not bad.any(), (
        f"{label}: {int(bad.sum())} elements off by more than {max_ulps} ulp(s) and {atol:g}; "
        f"max ulps {int(ulps.max())}, max abs {float(diff.max()):.3g}"
    )
    return {"max_ulps": int(ulps.max()), "max_abs": float(diff.max()), "exact": float((ulps == 0).float().mean())}


def rel_to_max(k: torch.Tensor, r: torch.Tensor) -> float:
    return float((k.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12))
