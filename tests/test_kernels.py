"""The fused NHWC GroupNorm (+ SiLU) Triton kernels against their torch reference.

There is no GPU here, so the kernels run under the Triton interpreter, in a child process
(:mod:`kernel_programs.group_norm`, see :mod:`kernel_programs` for why): it computes the kernel's and
the reference's outputs and gradients and saves them; the comparisons (and their tolerances) live
here.

Rounding: the interpreter truncates on fp32 -> bf16 casts (CUDA rounds to nearest even), so the
kernels round to bf16 by integer arithmetic themselves; the exact-match fractions asserted below would
fall to about one half if that rounding were truncation.
"""

from __future__ import annotations

import json

import pytest
from kernel_checks import check_low_precision, rel_to_max, run_program, ulp_distance
import torch
import torch.nn.functional as F

from imix2mix.kernels.group_norm import GroupNormLaunch, group_norm_reference


# One entry per kernel case: (name, dtype, N, C, G, H, W, silu, affine, knobs, mean, shift).
# knobs: GroupNormLaunch fields to change for the case, so that small shapes still take every path:
# *_min_programs = 1 makes each program walk up to max_rows rows (several loop iterations, a ragged
# last chunk) instead of one block_hw tile; finish_tile = 8 makes the per-group kernels loop over
# the row chunks in several steps (at 9 x 9, several chunks per sample: steps that straddle two).
# mean: a mean common to all channels; 300 against a group variance of about 10 makes
# E[x^2] - E[x]^2 cancel away four of fp32's seven digits.
# shift: whether the norm also gets a per-(n, c) ``shift`` of x's dtype (the ResBlock's timestep
# embedding), added before the norm; there the mean is carried by the shift, not by x, so that the
# statistics' pivot (a sample of x) is only right if it has the shift added too.  With C = 96 the
# second channel block is half masked off; at 17 x 17 with LONG_ROWS the second row chunk is ragged.
LONG_ROWS = {"reduce_min_programs": 1, "apply_min_programs": 1}
SHORT_FINISH = {"finish_tile": 8}
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

@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_program("group_norm", json.dumps(CASES), folder=tmp_path_factory.mktemp("kernels"))


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


def test_block_sizes_are_powers_of_two() -> None:
    """Compiled Triton needs power-of-two tl.arange sizes; the interpreter does not check them."""
    from imix2mix.kernels import group_norm as gn

    def pow2(v: int) -> bool:
        return v >= 1 and v & (v - 1) == 0

    launch = GroupNormLaunch()
    assert pow2(launch.block_c) and pow2(launch.reduce_block_hw) and pow2(launch.apply_block_hw)
    for n in (1, 2, 3, 5, 8, 17):
        for cg in (1, 2, 3, 10, 20, 30, 40, 60, 80, 96):
            for rows in (1, 2, 3, 7, 41, 100, 1000):
                block_n = max(1 << (n - 1).bit_length(), 2)
                for per_row in (1, block_n):
                    block_rows, block_cg = gn._finish_blocks(rows * n, cg, launch, per_row=per_row)
                    assert pow2(block_rows) and pow2(block_cg) and block_cg >= cg, (n, cg, rows)
    for n, hw, c in ((5, 5184, 320), (5, 81, 2560), (2, 289, 96), (1, 1, 32)):
        for block_hw, min_programs in ((launch.reduce_block_hw, launch.reduce_min_programs), (launch.apply_block_hw, 1)):
            rows, grid = gn._launch_grid(n, hw, c, block_hw, min_programs, launch)
            assert rows % block_hw == 0 and grid[1] * rows >= hw > (grid[1] - 1) * rows
            assert grid[0] == n and grid[2] * launch.block_c >= c


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
