"""The fused LayerNorm (last dimension, low-precision output) Triton kernels against their torch reference.

There is no GPU here, so the kernels run under the Triton interpreter.  ``TRITON_INTERPRET=1`` has to
be set before Triton is imported (it decides at decoration time), and other tests in this process may
have imported Triton already, so the kernels run in a child process: it computes the kernel's and the
reference's outputs and gradients for every case and saves them with ``torch.save``; the comparisons
(and their tolerances) live here.

Rounding: the interpreter truncates on fp32 -> bf16 casts (CUDA rounds to nearest even), so the
kernels round to bf16 by integer arithmetic themselves; the exact-match fractions asserted below would
fall to about one half if that rounding were truncation.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from kernel_checks import check_low_precision, rel_to_max, run_child
import torch

from imix2mix.kernels.layer_norm import layer_norm_reference


# One entry per kernel case: (name, x dtype, out dtype, shape, affine, param dtype, knobs, shift).
# affine: which of weight ("w") and bias ("b") are given.  knobs: module constants to override for
# the case, so that small shapes still take every path: SMALL_TILES gives the forward several
# programs of 4 rows (C <= 64) and each backward program 16 rows walked in 2-row tiles (several loop
# iterations, a ragged last chunk and tile).  shift: a mean common to all channels; 300 against a
# row variance of about 1-10 makes E[x^2] - E[x]^2 cancel away four of fp32's seven digits.
SMALL_TILES = {"FWD_TILE": 256, "BWD_TILE": 128, "BWD_MAX_ROWS": 16, "BWD_MIN_PROGRAMS": 1}
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

_KERNEL_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import imix2mix.kernels.layer_norm as ln

    cases = json.loads(sys.argv[1])
    noncontiguous_dy_case = sys.argv[2]
    out_path = sys.argv[3]
    torch.manual_seed(0)
    defaults = {knob: getattr(ln, knob) for knob in ("FWD_TILE", "BWD_TILE", "BWD_MAX_ROWS", "BWD_MIN_PROGRAMS")}
    results = {}
    for name, dtype, out_dtype, shape, affine, pdtype, knobs, shift in cases:
        dtype, out_dtype, pdtype = getattr(torch, dtype), getattr(torch, out_dtype), getattr(torch, pdtype)
        for knob, value in {**defaults, **knobs}.items():
            setattr(ln, knob, value)
        c = shape[-1]
        # Per-row offsets and scales, so that the statistics differ between rows.
        offset = torch.randn(*shape[:-1], 1) * 3 + shift
        x = (torch.randn(*shape) * (0.5 + 3 * torch.rand(*shape[:-1], 1)) + offset).to(dtype)
        weight = torch.randn(c).to(pdtype) if "w" in affine else None
        bias = torch.randn(c).to(pdtype) if "b" in affine else None
        dy = torch.randn(*shape).to(out_dtype)
        res = {}
        for tag, fn in (("k", ln.layer_norm_rows), ("r", ln.layer_norm_reference)):
            xi = x.clone().requires_grad_(True)
            wi = None if weight is None else weight.clone().requires_grad_(True)
            bi = None if bias is None else bias.clone().requires_grad_(True)
            y = fn(xi, wi, bi, 1e-5, out_dtype)
            y.backward(dy)
            res["y_" + tag] = y.detach()
            res["dx_" + tag] = xi.grad
            if wi is not None:
                res["dw_" + tag] = wi.grad
            if bi is not None:
                res["db_" + tag] = bi.grad
        res["y_contiguous"] = res["y_k"].is_contiguous()
        # Ground truth in float64 (the same rounding to out_dtype), to judge both fp32 implementations.
        w64, b64 = (None if p is None else p.double() for p in (weight, bias))
        res["y_truth"] = torch.nn.functional.layer_norm(x.double(), (c,), w64, b64, 1e-5)
        if name == noncontiguous_dy_case:
            dy_t = dy.transpose(0, 1).contiguous().transpose(0, 1)  # same values, column-major
            assert not dy_t.is_contiguous()
            xi = x.clone().requires_grad_(True)
            wi = weight.clone().requires_grad_(True)
            bi = bias.clone().requires_grad_(True)
            ln.layer_norm_rows(xi, wi, bi, 1e-5, out_dtype).backward(dy_t)
            res["noncontiguous_dy"] = (xi.grad, wi.grad, bi.grad)
        results[name] = res

    for knob, value in defaults.items():
        setattr(ln, knob, value)
    x = torch.randn(6, 64)
    results["available"] = {
        "contiguous": ln.fused_layer_norm_available(x),
        "three_d_bf16": ln.fused_layer_norm_available(torch.randn(2, 3, 64).to(torch.bfloat16)),
        "transposed": ln.fused_layer_norm_available(x.t()),
        "strided_last_dim": ln.fused_layer_norm_available(x[:, ::2]),
        "float64": ln.fused_layer_norm_available(x.double()),
        "int32": ln.fused_layer_norm_available(torch.zeros(6, 64, dtype=torch.int32)),
        "c_8192": ln.fused_layer_norm_available(torch.zeros(1, 8192)),
        "c_8193": ln.fused_layer_norm_available(torch.zeros(1, 8193)),
        "empty": ln.fused_layer_norm_available(torch.zeros(0, 64)),
        "zero_dim": ln.fused_layer_norm_available(torch.tensor(1.0)),
    }
    try:
        ln.layer_norm_rows(x.t(), None, None, 1e-5, torch.float32)
        results["transposed_raises"] = False
    except ValueError:
        results["transposed_raises"] = True
    torch.save(results, out_path)
    """
)

_NO_TRITON_CHILD = textwrap.dedent(
    """
    import importlib, json, os, sys
    import torch

    sys.modules["triton"] = None  # makes `import triton` raise ImportError
    import imix2mix.kernels.layer_norm as ln

    x = torch.randn(4, 64).to(torch.bfloat16)
    out = {"no_triton_available": ln.fused_layer_norm_available(x)}
    try:
        ln.layer_norm_rows(x, None, None, 1e-5, torch.bfloat16)
        out["no_triton_raises"] = False
    except RuntimeError:
        out["no_triton_raises"] = True
    ref = ln.layer_norm_reference(x, None, None, 1e-5, torch.bfloat16)
    out["reference_runs"] = bool(torch.isfinite(ref).all())

    del sys.modules["triton"]
    os.environ.pop("TRITON_INTERPRET", None)
    ln = importlib.reload(ln)
    out["cpu_without_interpreter_available"] = ln.fused_layer_norm_available(x)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("layer_norm") / "results.pt"
    run_child(_KERNEL_CHILD, json.dumps(CASES), NONCONTIGUOUS_DY_CASE, str(out), interpret=True)
    return torch.load(out, weights_only=False)


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


def test_module_works_without_triton() -> None:
    out = json.loads(run_child(_NO_TRITON_CHILD, interpret=True).strip().splitlines()[-1])
    assert out == {
        "no_triton_available": False,
        "no_triton_raises": True,
        "reference_runs": True,
        "cpu_without_interpreter_available": False,
    }


def test_block_sizes_are_powers_of_two() -> None:
    """Compiled Triton needs power-of-two tl.arange sizes; the interpreter does not check them."""
    from imix2mix.kernels import layer_norm as ln

    def pow2(v: int) -> bool:
        return v >= 1 and v & (v - 1) == 0

    assert pow2(ln.FWD_TILE) and pow2(ln.BWD_TILE) and pow2(ln.BWD_MAX_ROWS)
    for c in (1, 3, 40, 96, 320, 640, 1280, 4096, 5000, 8192):
        for tile in (ln.FWD_TILE, ln.BWD_TILE):
            block_rows, block_c = ln._block_rows(c, tile)
            assert pow2(block_rows) and pow2(block_c) and block_c >= c > block_c // 2
        block_rows, _ = ln._block_rows(c, ln.BWD_TILE)
        for r in (1, 7, 1620, 6480, 25920):
            rows, programs = ln._backward_grid(r, block_rows)
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
