"""The LayerNorm kernels and their reference on the cases of tests/test_kernels_layer_norm.py."""

from __future__ import annotations

import json

import torch

from imix2mix.kernels import layer_norm as ln
from kernel_programs import run_main


def main(cases_json: str, noncontiguous_dy_case: str) -> dict:
    torch.manual_seed(0)
    results = {}
    for name, dtype, out_dtype, shape, affine, pdtype, knobs, shift in json.loads(cases_json):
        dtype, out_dtype, pdtype = getattr(torch, dtype), getattr(torch, out_dtype), getattr(torch, pdtype)
        launch = ln.LayerNormLaunch(**knobs)
        c = shape[-1]
        # Per-row offsets and scales, so that the statistics differ between rows.
        offset = torch.randn(*shape[:-1], 1) * 3 + shift
        x = (torch.randn(*shape) * (0.5 + 3 * torch.rand(*shape[:-1], 1)) + offset).to(dtype)
        weight = torch.randn(c).to(pdtype) if "w" in affine else None
        bias = torch.randn(c).to(pdtype) if "b" in affine else None
        dy = torch.randn(*shape).to(out_dtype)
        res = {}
        for tag in ("k", "r"):
            xi = x.clone().requires_grad_(True)
            wi = None if weight is None else weight.clone().requires_grad_(True)
            bi = None if bias is None else bias.clone().requires_grad_(True)
            if tag == "k":
                y = ln.layer_norm_rows(xi, wi, bi, 1e-5, out_dtype, launch)
            else:
                y = ln.layer_norm_reference(xi, wi, bi, 1e-5, out_dtype)
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
            ln.layer_norm_rows(xi, wi, bi, 1e-5, out_dtype, launch).backward(dy_t)
            res["noncontiguous_dy"] = (xi.grad, wi.grad, bi.grad)
        results[name] = res

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
    return results


if __name__ == "__main__":
    run_main(main)
