"""The fused NHWC GroupNorm (+ SiLU) Triton kernels against their torch reference.

There is no GPU here, so the kernels run under the Triton interpreter.  ``TRITON_INTERPRET=1`` has to
be set before Triton is imported (it decides at decoration time), and other tests in this process may
have imported Triton already, so the kernels run in one child process per scenario: it computes the
kernel's and the reference's outputs and gradients and saves them with ``torch.save``; the
comparisons (and their tolerances) live here.

Rounding: the interpreter truncates on fp32 -> bf16 casts (CUDA rounds to nearest even), so the
kernels round to bf16 by integer arithmetic themselves; the exact-match fractions asserted below would
fall to about one half if that rounding were truncation.
"""

from __future__ import annotations

import textwrap

import pytest
from kernel_checks import check_low_precision, rel_to_max, run_child, ulp_distance
import torch
import torch.nn.functional as F

from imix2mix.kernels.group_norm import group_norm_reference


# One entry per kernel case: (name, dtype, N, C, G, H, W, silu, affine, knobs, mean, shift).
# knobs: module constants to override for the case, so that small shapes still take every path:
# *_MIN_PROGRAMS = 1 makes each program walk up to MAX_ROWS rows (several loop iterations, a ragged
# last chunk) instead of one BLOCK_HW tile; FINISH_TILE = 8 makes the per-group kernels loop over
# the row chunks in several steps (at 9 x 9, several chunks per sample: steps that straddle two).
# mean: a mean common to all channels; 300 against a group variance of about 10 makes
# E[x^2] - E[x]^2 cancel away four of fp32's seven digits.
# shift: whether the norm also gets a per-(n, c) ``shift`` of x's dtype (the ResBlock's timestep
# embedding), added before the norm; there the mean is carried by the shift, not by x, so that the
# statistics' pivot (a sample of x) is only right if it has the shift added too.  With C = 96 the
# second channel block is half masked off; at 17 x 17 with LONG_ROWS the second row chunk is ragged.
LONG_ROWS = {"REDUCE_MIN_PROGRAMS": 1, "APPLY_MIN_PROGRAMS": 1}
SHORT_FINISH = {"FINISH_TILE": 8}
CASES = [
    ("fp32_c64_g32_8x8", "float32", 2, 64, 32, 8, 8, False, True, {}, 0.0, False),
    ("fp32_c96_g32_5x5_silu", "float32", 2, 96, 32, 5, 5, True, True, {}, 0.0, False),
    ("fp32_c96_g32_17x17_silu_long", "float32", 2, 96, 32, 17, 17, True, True, LONG_ROWS, 0.0, False),
    ("fp32_c160_g16_9x9_short_finish", "float32", 2, 160, 16, 9, 9, False, True, SHORT_FINISH, 0.0, False),
    ("fp32_c64_g32_8x8_large_mean", "float32", 2, 64, 32, 8, 8, False, True, {}, 300.0, False),
    ("fp32_n1_c32_g32_3x3_silu", "float32", 1, 32, 32, 3, 3, True, True, {}, 0.0, False),
    ("bf16_c64_g32_8x8", "bfloat16", 2, 64, 32, 8, 8, False, True, {}, 0.0, False),
    ("bf16_c96_g32_5x5_silu", "bfloat16", 2, 96, 32, 5, 5, True, True, {}, 0.0, False),
    ("bf16_c160_g16_5x5_silu", "bfloat16", 2, 160, 16, 5, 5, True, True, {}, 0.0, False),
    ("bf16_c96_g16_8x8_silu_noaffine", "bfloat16", 2, 96, 16, 8, 8, True, False, {}, 0.0, False),
    ("bf16_c96_g32_17x17_silu_short_finish", "bfloat16", 2, 96, 32, 17, 17, True, True, SHORT_FINISH, 0.0, False),
    ("bf16_c96_g32_17x17_long", "bfloat16", 2, 96, 32, 17, 17, False, True, LONG_ROWS, 0.0, False),
    ("fp16_c64_g16_5x5_silu", "float16", 2, 64, 16, 5, 5, True, True, {}, 0.0, False),
    ("fp32_c96_g32_5x5_silu_shift", "float32", 2, 96, 32, 5, 5, True, True, {}, 0.0, True),
    ("fp32_c96_g32_17x17_long_shift", "float32", 2, 96, 32, 17, 17, False, True, LONG_ROWS, 0.0, True),
    ("fp32_c64_g32_8x8_large_mean_shift", "float32", 2, 64, 32, 8, 8, False, True, {}, 300.0, True),
    ("bf16_c64_g32_8x8_shift", "bfloat16", 2, 64, 32, 8, 8, False, True, {}, 0.0, True),
    ("bf16_c96_g32_17x17_silu_long_shift", "bfloat16", 2, 96, 32, 17, 17, True, True, LONG_ROWS, 0.0, True),
    ("bf16_c160_g16_9x9_silu_short_finish_shift", "bfloat16", 2, 160, 16, 9, 9, True, True, SHORT_FINISH, 0.0, True),
    ("bf16_c96_g16_8x8_silu_noaffine_shift", "bfloat16", 2, 96, 16, 8, 8, True, False, {}, 0.0, True),
    ("fp16_c64_g16_5x5_silu_shift", "float16", 2, 64, 16, 5, 5, True, True, {}, 0.0, True),
    ("fp16_c96_g16_17x17_long_shift", "float16", 2, 96, 16, 17, 17, False, True, LONG_ROWS, 0.0, True),
]

_KERNEL_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import imix2mix.kernels.group_norm as gn

    cases = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    torch.manual_seed(0)
    defaults = {
        knob: getattr(gn, knob) for knob in ("REDUCE_MIN_PROGRAMS", "APPLY_MIN_PROGRAMS", "FINISH_TILE")
    }
    results = {}
    for name, dtype, n, c, g, h, w, silu, affine, knobs, mean, shift in cases:
        dtype = getattr(torch, dtype)
        for knob, value in {**defaults, **knobs}.items():
            setattr(gn, knob, value)
        # Per-channel offsets and scales, so that the statistics differ within and between groups.
        offset = torch.randn(1, c, 1, 1) * 3 + (0.0 if shift else mean)
        x = (torch.randn(n, c, h, w) * (1 + torch.rand(1, c, 1, 1)) + offset).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c) if affine else None
        bias = torch.randn(c) if affine else None
        # Of x's size: x + shift needs rounding in bf16/fp16 almost everywhere.
        x_shift = (torch.randn(n, c) * 2 + mean).to(dtype) if shift else None
        dy = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
        res = {"dtype": str(dtype)}
        for tag, fn in (("k", gn.group_norm_nhwc), ("r", gn.group_norm_reference)):
            # The reference runs on an NCHW copy: torch's CPU GroupNorm for channels-last input
            # takes the variance as E[x^2] - E[x]^2 (3e-2 off for the large-mean case); its NCHW
            # path and the CUDA kernel use Welford.
            xi = (x if tag == "k" else x.contiguous()).clone().requires_grad_(True)
            wi = weight.clone().requires_grad_(True) if affine else None
            bi = bias.clone().requires_grad_(True) if affine else None
            si = x_shift.clone().requires_grad_(True) if shift else None
            y = fn(xi, wi, bi, g, 1e-5, silu, si)
            y.backward(dy)
            res["y_" + tag] = y.detach()
            res["dx_" + tag] = xi.grad
            if affine:
                res["dw_" + tag] = wi.grad
                res["db_" + tag] = bi.grad
            if shift:
                res["dshift_" + tag] = si.grad
        res["y_channels_last"] = res["y_k"].is_contiguous(memory_format=torch.channels_last)
        res["dx_channels_last"] = res["dx_k"].is_contiguous(memory_format=torch.channels_last)
        # A dy that is not channels-last (NCHW-contiguous) must give the same dx.
        if name.startswith("bf16_c96_g32_5x5"):
            xi = x.clone().requires_grad_(True)
            gn.group_norm_nhwc(xi, weight, bias, g, 1e-5, silu).backward(dy.contiguous())
            res["dx_k_nchw_dy"] = xi.grad
        # Gradients for one of x and shift only: the other's must not change (the dx kernel runs
        # for the shift's gradient alone, into a scratch dx).
        if name.startswith("bf16_c96_g32_17x17_silu_long_shift"):
            si = x_shift.clone().requires_grad_(True)
            gn.group_norm_nhwc(x, weight, bias, g, 1e-5, silu, si).backward(dy)
            res["dshift_k_only"] = si.grad
            xi = x.clone().requires_grad_(True)
            gn.group_norm_nhwc(xi, weight, bias, g, 1e-5, silu, x_shift).backward(dy)
            res["dx_k_only"] = xi.grad
        results[name] = res

    for knob, value in defaults.items():
        setattr(gn, knob, value)
    x = torch.randn(2, 64, 4, 4)
    cl = x.contiguous(memory_format=torch.channels_last)
    results["available"] = {
        "channels_last": gn.fused_group_norm_available(cl, 32),
        "nchw": gn.fused_group_norm_available(x.contiguous(), 32),
        "c_not_divisible": gn.fused_group_norm_available(cl, 24),
        "three_d": gn.fused_group_norm_available(torch.randn(2, 64, 16), 32),
        "float64": gn.fused_group_norm_available(cl.double(), 32),
    }
    try:
        gn.group_norm_nhwc(x.contiguous(), None, None, 32, 1e-5)
        results["nchw_raises"] = False
    except ValueError:
        results["nchw_raises"] = True
    results["bad_shift_raises"] = []
    for bad in (torch.randn(2, 64).double(), torch.randn(2, 32), torch.randn(2, 64, 1, 1)):
        try:
            gn.group_norm_nhwc(cl, None, None, 32, 1e-5, shift=bad)
            results["bad_shift_raises"].append(False)
        except ValueError:
            results["bad_shift_raises"].append(True)
    torch.save(results, out_path)
    """
)

_NO_TRITON_CHILD = textwrap.dedent(
    """
    import importlib, json, os, sys
    import torch

    sys.modules["triton"] = None  # makes `import triton` raise ImportError
    import imix2mix.kernels.group_norm as gn

    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    out = {"no_triton_available": gn.fused_group_norm_available(x, 32)}
    try:
        gn.group_norm_nhwc(x, None, None, 32, 1e-5)
        out["no_triton_raises"] = False
    except RuntimeError:
        out["no_triton_raises"] = True
    ref = gn.group_norm_reference(x, None, None, 32, 1e-5, silu=True)
    out["reference_runs"] = bool(torch.isfinite(ref).all())

    del sys.modules["triton"]
    os.environ.pop("TRITON_INTERPRET", None)
    gn = importlib.reload(gn)
    out["cpu_without_interpreter_available"] = gn.fused_group_norm_available(x, 32)
    out["library_imports_prefect_or_ray"] = any(m in sys.modules for m in ("prefect", "ray"))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import json

    out = tmp_path_factory.mktemp("kernels") / "results.pt"
    run_child(_KERNEL_CHILD, json.dumps(CASES), str(out), interpret=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(kernel_results: dict, case: tuple) -> None:
    name, dtype, silu = case[0], getattr(torch, case[1]), case[7]
    res = kernel_results[name]
    y_k, y_r = res["y_k"], res["y_r"]
    assert y_k.shape == y_r.shape and y_k.dtype == dtype
    assert res["y_channels_last"]
    assert torch.isfinite(y_k).all()
    if dtype == torch.float32:
        # With a mean of 300, x - mean keeps only ~16 bits of fp32: any two correct fp32
        # implementations differ by ~1e-4 there (both are ~6e-5 from float64); E[x^2] - E[x]^2
        # would be 2e-2 off.
        tol = 3e-4 if case[10] else 1e-5
        torch.testing.assert_close(y_k, y_r, atol=tol, rtol=tol)
    else:
        # One ulp for the norm; with SiLU, a one-ulp flip of its input (from fp32-level differences
        # of the statistics) can come out as two ulps where silu(y) falls into a finer binade than y.
        max_ulps = 2 if silu else 1
        stats = check_low_precision(y_k, y_r, max_ulps=max_ulps, atol=1e-5, label=f"{name} forward")
        # Round-to-nearest-even like torch: almost every element is bit-identical (truncation,
        # the interpreter's own fp32 -> bf16 cast, would leave about half of them one ulp low).
        assert stats["exact"] >= 0.98, stats


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(kernel_results: dict, case: tuple) -> None:
    name, dtype, affine = case[0], getattr(torch, case[1]), case[8]
    res = kernel_results[name]
    dx_k, dx_r = res["dx_k"], res["dx_r"]
    assert dx_k.dtype == dtype and dx_k.shape == dx_r.shape
    assert res["dx_channels_last"]
    scale = float(dx_r.float().abs().max())
    if dtype == torch.float32:
        torch.testing.assert_close(dx_k, dx_r, atol=1e-5 * scale, rtol=1e-5)
    else:
        # dx = rstd * (g*w - A - x_hat*B) cancels: near zero, allow an fp32-level absolute error.
        stats = check_low_precision(dx_k, dx_r, max_ulps=2, atol=2e-3 * scale, label=f"{name} dx")
        # Nearly all bit-identical: skipping the bf16 rounding of the SiLU gradient (which the
        # reference's autograd does) leaves only about two thirds equal, each within two ulps.
        assert stats["exact"] >= 0.98, stats
    if affine:
        for key in ("dw", "db"):
            k, r = res[f"{key}_k"], res[f"{key}_r"]
            assert k.dtype == torch.float32 and k.shape == r.shape
            # Observed: <= 1e-6 of the largest entry in fp32 (2e-5 with the large mean); in
            # bf16/fp16 mostly <= 1e-5, up to 3e-4 where a one-ulp flip of y changes a rounded SiLU
            # gradient by a few ulps.
            tol = (1e-4 if case[10] else 1e-5) if dtype == torch.float32 else 3e-3
            assert rel_to_max(k, r) <= tol, (name, key, rel_to_max(k, r))
    else:
        assert "dw_k" not in res and "db_k" not in res
    if "dx_k_nchw_dy" in res:
        torch.testing.assert_close(res["dx_k_nchw_dy"], dx_k, atol=0, rtol=0)
    if case[11]:
        k, r = res["dshift_k"], res["dshift_r"]
        assert k.dtype == dtype and k.shape == r.shape == (case[2], case[3])
        # A sum over H*W of the rounded dx (fp32 partial sums per row chunk, summed, rounded once):
        # the same terms as autograd's sum in another order.  In bf16/fp16 a one-ulp flip of the
        # final rounding of the largest entry alone is 2**-8 of it, hence 1e-2.  Observed: <= 8e-7
        # in fp32 (2.4e-5 with the large mean, like dweight); in bf16/fp16 <= 2e-4, mostly bit-identical.
        tol = (1e-4 if case[10] else 1e-5) if dtype == torch.float32 else 1e-2
        assert rel_to_max(k, r) <= tol, (name, "dshift", rel_to_max(k, r))
        if dtype != torch.float32:
            # Summing the same rounded terms in fp32 and rounding once leaves nearly all entries
            # bit-identical (observed >= 0.99); partial sums of dx before its rounding would flip
            # about a third of them by an ulp, which the tolerance above cannot see.
            exact = float((ulp_distance(k, r) == 0).float().mean())
            assert exact >= 0.95, (name, "dshift exact fraction", exact)
    else:
        assert "dshift_k" not in res
    if "dshift_k_only" in res:
        torch.testing.assert_close(res["dshift_k_only"], res["dshift_k"], atol=0, rtol=0)
        torch.testing.assert_close(res["dx_k_only"], dx_k, atol=0, rtol=0)


def test_availability(kernel_results: dict) -> None:
    avail = kernel_results["available"]
    assert avail == {
        "channels_last": True,
        "nchw": False,
        "c_not_divisible": False,
        "three_d": False,
        "float64": False,
    }
    assert kernel_results["nchw_raises"]
    # a shift of the wrong dtype, width or rank
    assert kernel_results["bad_shift_raises"] == [True, True, True]


def test_module_works_without_triton() -> None:
    import json

    out = json.loads(run_child(_NO_TRITON_CHILD, interpret=True).strip().splitlines()[-1])
    assert out == {
        "no_triton_available": False,
        "no_triton_raises": True,
        "reference_runs": True,
        "cpu_without_interpreter_available": False,
        "library_imports_prefect_or_ray": False,
    }


def test_block_sizes_are_powers_of_two() -> None:
    """Compiled Triton needs power-of-two tl.arange sizes; the interpreter does not check them."""
    from imix2mix.kernels import group_norm as gn

    def pow2(v: int) -> bool:
        return v >= 1 and v & (v - 1) == 0

    assert pow2(gn.BLOCK_C) and pow2(gn.REDUCE_BLOCK_HW) and pow2(gn.APPLY_BLOCK_HW)
    for n in (1, 2, 3, 5, 8, 17):
        for cg in (1, 2, 3, 10, 20, 30, 40, 60, 80, 96):
            for rows in (1, 2, 3, 7, 41, 100, 1000):
                block_n = max(1 << (n - 1).bit_length(), 2)
                for per_row in (1, block_n):
                    block_rows, block_cg = gn._finish_blocks(rows * n, cg, per_row=per_row)
                    assert pow2(block_rows) and pow2(block_cg) and block_cg >= cg, (n, cg, rows)
    for n, hw, c in ((5, 5184, 320), (5, 81, 2560), (2, 289, 96), (1, 1, 32)):
        for block_hw, min_programs in ((gn.REDUCE_BLOCK_HW, gn.REDUCE_MIN_PROGRAMS), (gn.APPLY_BLOCK_HW, 1)):
            rows, grid = gn._launch_grid(n, hw, c, block_hw, min_programs)
            assert rows % block_hw == 0 and grid[1] * rows >= hw > (grid[1] - 1) * rows
            assert grid[0] == n and grid[2] * gn.BLOCK_C >= c


@pytest.mark.parametrize("silu", [False, True])
def test_reference_is_groupnorm32_semantics(silu: bool) -> None:
    """``group_norm_reference`` is the project's GroupNorm32 (+ SiLU) on a bf16 activation, bit for bit."""
    torch.manual_seed(1)
    c, groups = 96, 32
    gn = torch.nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        gn.weight.copy_(torch.randn(c))
        gn.bias.copy_(torch.randn(c))
    x = (torch.randn(2, c, 6, 6) * 2 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    expected = gn(x.float()).to(x.dtype)
    if silu:
        expected = F.silu(expected)
    got = group_norm_reference(x, gn.weight, gn.bias, groups, 1e-6, silu=silu)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    # And it is not vacuous: toggling SiLU changes the result.
    other = group_norm_reference(x, gn.weight, gn.bias, groups, 1e-6, silu=not silu)
    assert not torch.equal(other, expected)


def test_reference_shift_is_torchs_add_first() -> None:
    """With ``shift``, the reference normalises ``x + shift[:, :, None, None]`` as torch adds it (in bf16,
    rounded once), which is what the ResBlock computed before the add moved into the norm."""
    torch.manual_seed(2)
    c, groups = 64, 32
    weight, bias = torch.randn(c), torch.randn(c)
    x = (torch.randn(2, c, 5, 5) * 2 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    shift = (torch.randn(2, c) * 3).to(torch.bfloat16)
    expected = group_norm_reference(x + shift[:, :, None, None], weight, bias, groups, 1e-5, silu=True)
    got = group_norm_reference(x, weight, bias, groups, 1e-5, silu=True, shift=shift)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    assert not torch.equal(got, group_norm_reference(x, weight, bias, groups, 1e-5, silu=True))
