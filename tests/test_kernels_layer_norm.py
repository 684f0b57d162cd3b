"""The fused LayerNorm (last dimension, low-precision output) Triton kernels against their torch reference.

There is no GPU here, so the kernels run under the Triton interpreter, in a child process
(:mod:`kernel_programs.layer_norm`, see :mod:`kernel_programs` for why): it computes the kernel's and
the reference's outputs and gradients for every case and saves them; the comparisons (and their
tolerances) live here.

Rounding: the interpreter truncates on fp32 -> bf16 casts (CUDA rounds to nearest even), so the
kernels round to bf16 by integer arithmetic themselves; the exact-match fractions asserted below would
fall to about one half if that rounding were truncation.
"""

from __future__ import annotations

import json

import pytest
from kernel_checks import check_low_precision, rel_to_max, run_program
import torch

from imix2mix.kernels.layer_norm import LayerNormLaunch, layer_norm_reference


# One entry per kernel case: (name, x dtype, out dtype, shape, affine, param dtype, knobs, shift).
# affine: which of weight ("w") and bias ("b") are given.  knobs: LayerNormLaunch fields to change for
# the case, so that small shapes still take every path: SMALL_TILES gives the forward several
# programs of 4 rows (C <= 64) and each backward program 16 rows walked in 2-row tiles (several loop
# iterations, a ragged last chunk and tile).  shift: a mean common to all channels; 300 against a
# row variance of about 1-10 makes E[x^2] - E[x]^2 cancel away four of fp32's seven digits.
SMALL_TILES = {"fwd_tile": 256, "bwd_tile": 128, "bwd_max_rows": 16, "bwd_min_programs": 1}
CASES = [
    ("fp32_fp32_c40", "float32", "float32", [2, 3, 7, 40], "wb", "float32", {}, 0.0),
    ("fp32_fp32_c96_large_mean", "float32", "float32", [37, 96], "wb", "float32", {}, 300.0),
    ("fp32_fp32_c40_small_tiles", "float32", "float32", [50, 40], "wb", "float32", SMALL_TILES, 0.0),
    ("bf16_bf16_c40_small_tiles", "bfloat16", "bfloat16", [50, 40], "wb", "float32", SMALL_TILES, 0.0),
    ("bf16_fp32_c320", "bfloat16", "float32", [19, 320], "wb", "float32", {}, 0.0),
    ("bf16_bf16_c96_large_mean", "bfloat16", "bfloat16", [37, 96], "wb", "float32", {}, 300.0),
    ("bf16_bf16_c40_noaffine", "bfloat16", "bfloat16", [3, 11, 40], "", "float32", {}, 0.0),
    ("bf16_fp32_c72_weight_only", "bfloat16", "float32", [29, 72], "w", "float32", {}, 0.0),
    ("bf16_bf16_c48_bias_only", "bfloat16", "bfloat16", [29, 48], "b", "float32", SMALL_TILES, 0.0),
    ("fp16_fp16_c96_fp16_params", "float16", "float16", [21, 96], "wb", "float16", {}, 0.0),
]
# The case whose backward is also run with a non-contiguous dy (must give the same gradients).
NONCONTIGUOUS_DY_CASE = "bf16_bf16_c40_small_tiles"

@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_program("layer_norm", json.dumps(CASES), NONCONTIGUOUS_DY_CASE, folder=tmp_path_factory.mktemp("layer_norm"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(kernel_results: dict, case: tuple) -> None:
    name, out_dtype, shape, shift = case[0], getattr(torch, case[2]), case[3], case[7]
    res = kernel_results[name]
    y_k, y_r = res["y_k"], res["y_r"]
    assert y_k.dtype == out_dtype and y_r.dtype == out_dtype
    assert list(y_k.shape) == shape and res["y_contiguous"]
    assert torch.isfinite(y_k).all()
    # With a mean of 300, the fp32 mean itself is ~3e-5 off, so any two correct fp32 implementations
    # differ by ~1e-4 (both are ~1e-4 from float64); E[x^2] - E[x]^2 would be ~1e-2 off.
    tol = 3e-4 if shift else 1e-5
    if out_dtype == torch.float32:
        torch.testing.assert_close(y_k, y_r, atol=tol, rtol=tol)
        # The two-pass variance is as accurate as torch's: no worse against float64.
        err_k = float((y_k.double() - res["y_truth"]).abs().max())
        err_r = float((y_r.double() - res["y_truth"]).abs().max())
        assert err_k <= 1.5 * err_r + 1e-6, (err_k, err_r)
    else:
        # One ulp, or an fp32-level absolute error near zero (many ulps of a tiny result).
        stats = check_low_precision(y_k, y_r, max_ulps=1, atol=tol, label=f"{name} forward")
        # Round-to-nearest-even like torch: almost every element is bit-identical (truncation,
        # the interpreter's own fp32 -> bf16 cast, would leave about half of them one ulp low).
        assert stats["exact"] >= 0.98, stats


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(kernel_results: dict, case: tuple) -> None:
    name, dtype, affine, pdtype = case[0], getattr(torch, case[1]), case[4], getattr(torch, case[5])
    res = kernel_results[name]
    dx_k, dx_r = res["dx_k"], res["dx_r"]
    assert dx_k.dtype == dtype and dx_r.dtype == dtype and dx_k.shape == dx_r.shape
    scale = float(dx_r.float().abs().max())
    if dtype == torch.float32:
        torch.testing.assert_close(dx_k, dx_r, atol=1e-5 * scale, rtol=1e-5)
    else:
        # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) cancels: near zero, allow an
        # fp32-level absolute error (many ulps of a tiny result).
        stats = check_low_precision(dx_k, dx_r, max_ulps=1, atol=1e-5 * scale, label=f"{name} dx")
        assert stats["exact"] >= 0.98, stats
    for key, flag in (("dw", "w"), ("db", "b")):
        if flag not in affine:
            assert f"{key}_k" not in res and f"{key}_r" not in res
            continue
        k, r = res[f"{key}_k"], res[f"{key}_r"]
        assert k.dtype == pdtype and r.dtype == pdtype and k.shape == r.shape
        # fp32: sums of the same products in another order (observed <= 5e-7 of the largest entry,
        # 2e-5 with the large mean, whose fp32 error x_hat carries); fp16 parameters: their
        # gradients are rounded to fp16 (2**-11 relative).
        tol = (1e-4 if case[7] else 1e-5) if pdtype == torch.float32 else 1e-3
        assert rel_to_max(k, r) <= tol, (name, key, rel_to_max(k, r))
    if "noncontiguous_dy" in res:
        dx_nc, dw_nc, db_nc = res["noncontiguous_dy"]
        assert torch.equal(dx_nc, dx_k) and torch.equal(dw_nc, res["dw_k"]) and torch.equal(db_nc, res["db_k"])


def test_noncontiguous_dy_case_ran(kernel_results: dict) -> None:
    assert "noncontiguous_dy" in kernel_results[NONCONTIGUOUS_DY_CASE]


def test_availability(kernel_results: dict) -> None:
    assert kernel_results["available"] == {
        "contiguous": True,
        "three_d_bf16": True,
        "transposed": False,
        "strided_last_dim": False,
        "float64": False,
        "int32": False,
        "c_8192": True,
        "c_8193": False,
        "empty": False,
        "zero_dim": False,
    }
    assert kernel_results["transposed_raises"]


def test_block_sizes_are_powers_of_two() -> None:
    """Compiled Triton needs power-of-two tl.arange sizes; the interpreter does not check them."""
    from imix2mix.kernels import layer_norm as ln

    def pow2(v: int) -> bool:
        return v >= 1 and v & (v - 1) == 0

    launch = LayerNormLaunch()
    assert pow2(launch.fwd_tile) and pow2(launch.bwd_tile) and pow2(launch.bwd_max_rows)
    for c in (1, 3, 40, 96, 320, 640, 1280, 4096, 5000, 8192):
        for tile in (launch.fwd_tile, launch.bwd_tile):
            block_rows, block_c = ln._block_rows(c, tile)
            assert pow2(block_rows) and pow2(block_c) and block_c >= c > block_c // 2
        block_rows, _ = ln._block_rows(c, launch.bwd_tile)
        for r in (1, 7, 1620, 6480, 25920):
            rows, programs = ln._backward_grid(r, block_rows, launch)
            assert rows % block_rows == 0 and programs * rows >= r > (programs - 1) * rows


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_reference_is_layernorm_then_cast(out_dtype: torch.dtype) -> None:
    """``layer_norm_reference`` is ``nn.LayerNorm`` run in fp32 on a bf16 activation, then cast, bit for bit."""
    torch.manual_seed(1)
    c = 96
    norm = torch.nn.LayerNorm(c, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c))
        norm.bias.copy_(torch.randn(c))
    x = (torch.randn(2, 9, c) * 2 + 1).to(torch.bfloat16)
    expected = norm(x.float()).to(out_dtype)
    got = layer_norm_reference(x, norm.weight, norm.bias, 1e-6, out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, expected)
    # And it is not vacuous: dropping the affine changes the result.
    assert not torch.equal(layer_norm_reference(x, None, None, 1e-6, out_dtype), expected)
    # Gradients: dx in x's dtype, parameter grads in theirs (fp32).
    xi = x.clone().requires_grad_(True)
    layer_norm_reference(xi, norm.weight, norm.bias, 1e-6, out_dtype).sum().backward()
    assert xi.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
