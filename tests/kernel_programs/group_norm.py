"""The NHWC GroupNorm kernels and their reference on the cases of tests/test_kernels.py."""

from __future__ import annotations

import json

import torch

from imix2mix.kernels import group_norm as gn
from kernel_programs import run_main


def main(cases_json: str) -> dict:
    torch.manual_seed(0)
    results = {}
    for name, dtype, n, c, g, h, w, silu, affine, knobs, mean, shift in json.loads(cases_json):
        dtype = getattr(torch, dtype)
        launch = gn.GroupNormLaunch(**knobs)
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
        for tag in ("k", "r"):
            # The reference runs on an NCHW copy: torch's CPU GroupNorm for channels-last input
            # takes the variance as E[x^2] - E[x]^2 (3e-2 off for the large-mean case); its NCHW
            # path and the CUDA kernel use Welford.
            xi = (x if tag == "k" else x.contiguous()).clone().requires_grad_(True)
            wi = weight.clone().requires_grad_(True) if affine else None
            bi = bias.clone().requires_grad_(True) if affine else None
            si = x_shift.clone().requires_grad_(True) if shift else None
            if tag == "k":
                y = gn.group_norm_nhwc(xi, wi, bi, g, 1e-5, silu, si, launch=launch)
            else:
                y = gn.group_norm_reference(xi, wi, bi, g, 1e-5, silu, si)
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
            gn.group_norm_nhwc(xi, weight, bias, g, 1e-5, silu, launch=launch).backward(dy.contiguous())
            res["dx_k_nchw_dy"] = xi.grad
        # Gradients for one of x and shift only: the other's must not change (the dx kernel runs
        # for the shift's gradient alone, into a scratch dx).
        if name.startswith("bf16_c96_g32_17x17_silu_long_shift"):
            si = x_shift.clone().requires_grad_(True)
            gn.group_norm_nhwc(x, weight, bias, g, 1e-5, silu, si, launch=launch).backward(dy)
            res["dshift_k_only"] = si.grad
            xi = x.clone().requires_grad_(True)
            gn.group_norm_nhwc(xi, weight, bias, g, 1e-5, silu, x_shift, launch=launch).backward(dy)
            res["dx_k_only"] = xi.grad
        results[name] = res

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
    return results


if __name__ == "__main__":
    run_main(main)
