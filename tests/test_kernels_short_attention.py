"""The short-sequence attention kernel (Triton; SEVA's time-mix over the views) against attention in
float64, forward and backward.

The kernels run under Triton's interpreter in a child process (:mod:`kernel_programs.short_attention`),
which saves the kernel's results, torch's SDPA in the same dtype and SDPA in float64 (the
truth); the comparisons live here.  The kernel computes in fp32 and rounds only its outputs, so in
half precision it must be about as close to the truth as torch's own half-precision attention.
"""

from __future__ import annotations

import json

import pytest
import torch
from kernel_checks import run_program

# (name, dtype, (B, L, heads, head_dim)): L = 5 is SEVA's T (4 views + 1 target at N = 4); B not a
# multiple of BLOCK_B leaves a ragged last program; head_dim 40 is not a power of two (masked lanes).
CASES = [
    ("fp32_L5", "float32", [7, 5, 3, 16]),
    ("bf16_L5_d64", "bfloat16", [9, 5, 2, 64]),
    ("fp16_L3_d40", "float16", [5, 3, 4, 40]),
    ("fp32_L1", "float32", [3, 1, 2, 8]),
    ("fp32_L16_d128", "float32", [3, 16, 1, 128]),
    ("bf16_L8_large_scores", "bfloat16", [6, 8, 2, 32]),
]

@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_program("short_attention", json.dumps(CASES), folder=tmp_path_factory.mktemp("short_attention"))


def _relative(a: torch.Tensor, truth: torch.Tensor) -> float:
    return float((a.double() - truth).norm() / truth.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_output_and_gradients_match_float64_attention(results: dict, case: tuple) -> None:
    name, dtype = case[0], getattr(torch, case[1])
    res = results[name]
    for index, label in enumerate(("out", "dq", "dk", "dv")):
        kernel, torch_same, truth = res["k"][index], res["torch"][index], res["truth"][index]
        assert kernel.dtype == dtype and kernel.shape == truth.shape, label
        assert torch.isfinite(kernel).all(), label
        if case[2][1] == 1 and label in ("dq", "dk"):
            # one key: the softmax is constant, so q and k get exactly zero gradient
            assert torch.equal(kernel, torch.zeros_like(kernel)), label
            continue
        if dtype == torch.float32:
            assert _relative(kernel, truth) < 2e-6, (name, label, _relative(kernel, truth))
        else:
            # fp32 inside, one rounding of each output: no further from the truth than torch's
            # attention in the same dtype (plus a fraction of an ulp).
            bound = 1.1 * _relative(torch_same, truth) + 2e-4
            assert _relative(kernel, truth) < bound, (name, label, _relative(kernel, truth), bound)


def test_time_mix_block_takes_the_kernel_with_the_same_result(results: dict) -> None:
    assert results["time_mix_kernel_calls"] == 1  # its self-attention, once
    kernel, reference = results["time_mix_block"]["k"], results["time_mix_block"]["r"]
    assert sorted(kernel) == sorted(reference) and len(kernel) > 10
    largest = max(float(g.norm()) for g in reference.values())
    for key in kernel:
        diff = float((kernel[key] - reference[key]).norm()) / max(float(reference[key].norm()), 1e-3 * largest)
        assert diff < 2e-2, (key, diff)  # bf16 activations: rounding-level differences only


def test_availability(results: dict) -> None:
    available = results["available"]
    assert available["ok"]
    assert not any(v for k, v in available.items() if k != "ok"), available
