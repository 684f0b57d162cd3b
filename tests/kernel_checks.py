"""Helpers of the Triton kernel tests: a child process in Triton's interpreter, and comparisons of
low-precision results with their references in units in the last place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 240


def run_child(code: str, *args: str, interpret: bool) -> str:
    """Run ``code`` in a fresh Python (with ``TRITON_INTERPRET=1`` when ``interpret``); its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run_interpreted(code: str, *args: str, folder: Path) -> dict:
    """Run ``code`` in Triton's interpreter with ``args`` and the path of a results file in ``folder``
    as its last argument; the results it saved there with ``torch.save``."""
    out = folder / "results.pt"
    run_child(code, *args, str(out), interpret=True)
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
