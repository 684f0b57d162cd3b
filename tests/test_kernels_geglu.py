"""The fused GEGLU gate (Triton) against torch's ops on the two halves, forward and backward.

As for the other kernels, there is no GPU here: the kernels run under Triton's interpreter in a child
process (:mod:`kernel_programs.geglu`), which saves the kernel's and the reference's outputs and
gradients; the comparisons live here.

What "the same" means: each torch op rounds to the tensor's dtype (GELU, then the product; in
backward the two products and GELU's backward), and the kernel rounds at the same places, so almost
every element is bit-identical.  The rest differ where ``1 + erf(x)`` cancels (gates below about -3):
there the erf implementations (libdevice on the GPU, numpy's in the interpreter, Sleef in torch's CPU
kernel) differ in the last fp32 digits, which is an fp32-level absolute error of a tiny result.
"""

from __future__ import annotations

import json

import pytest
import torch
from kernel_checks import check_low_precision, run_program

# (name, dtype, h shape, knobs: GegluLaunch fields): tile = 64 with block_f = 16 gives several programs along both axes
# with ragged last tiles; F = 1280 (the student's narrowest inner width) spans three column tiles.
SMALL = {"block_f": 16, "tile": 64}
CASES = [
    ("bf16_f40", "bfloat16", [3, 7, 80], {}),
    ("bf16_f1280", "bfloat16", [37, 2560], {}),
    ("bf16_f40_small_tiles", "bfloat16", [29, 80], SMALL),
    ("fp16_f96", "float16", [21, 192], {}),
    ("fp32_f48_small_tiles", "float32", [2, 13, 96], SMALL),
]

@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_program("geglu", json.dumps(CASES), folder=tmp_path_factory.mktemp("geglu"))


def _assert_same(k: torch.Tensor, r: torch.Tensor, label: str) -> None:
    assert k.dtype == r.dtype and k.shape == r.shape, label
    assert torch.isfinite(k).all(), label
    scale = float(r.float().abs().max())
    if k.dtype == torch.float32:
        torch.testing.assert_close(k, r, atol=1e-6 * scale, rtol=1e-6)
        return
    # Two ulps: a one-ulp difference of the rounded GELU (erf, above) becomes up to two ulps of the
    # rounded product.
    stats = check_low_precision(k, r, max_ulps=2, atol=1e-6 * scale, label=label)
    # fp16 keeps three more bits than bf16, so erf's last-digit differences show in more elements.
    assert stats["exact"] >= (0.99 if k.dtype == torch.bfloat16 else 0.97), (label, stats)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_torch(kernel_results: dict, case: tuple) -> None:
    name, shape = case[0], case[2]
    res = kernel_results[name]
    assert list(res["y_k"].shape) == [*shape[:-1], shape[-1] // 2] and res["y_contiguous"]
    _assert_same(res["y_k"], res["y_r"], f"{name} forward")
    _assert_same(res["dh_k"], res["dh_r"], f"{name} dh")
    torch.testing.assert_close(res["dh_noncontiguous_dout"], res["dh_k"], rtol=0, atol=0)


def test_feed_forward_under_autocast_takes_the_kernel_with_the_same_result(kernel_results: dict) -> None:
    kernel, reference = kernel_results["feed_forward"]["k"], kernel_results["feed_forward"]["r"]
    assert kernel_results["feed_forward_kernel_calls"] == 1
    assert sorted(kernel) == sorted(reference) == ["net.0.proj.bias", "net.0.proj.weight", "net.2.bias", "net.2.weight", "out", "x"]
    for key in kernel:
        k, r = kernel[key].float(), reference[key].float()
        # bf16 activations: one-ulp differences in the gate's output move what follows by ~1e-3.
        assert float((k - r).norm() / r.norm()) < 2e-3, key
    assert not torch.equal(kernel["out"], torch.zeros_like(kernel["out"]))


def test_availability_and_errors(kernel_results: dict) -> None:
    available = kernel_results["available"]
    assert available["contiguous"] and available["bf16_3d"]
    assert not any(available[k] for k in ("odd_width", "transposed", "float64", "empty"))
    assert kernel_results["odd_width_raises"]
