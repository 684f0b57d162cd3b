"""The GEGLU kernels and torch's ops on the cases of tests/test_kernels_geglu.py, and the student's
feed-forward through the kernel set."""

from __future__ import annotations

import json

import torch

from imix2mix.kernels import geglu as gg
from imix2mix.kernels.dispatch import TRITON, kernels_installed
from imix2mix.seva.attention import FeedForward
from kernel_programs import counted_triton, run_main


def main(cases_json: str) -> dict:
    torch.manual_seed(0)
    results = {}
    for name, dtype, shape, knobs in json.loads(cases_json):
        dtype = getattr(torch, dtype)
        launch = gg.GegluLaunch(**knobs)
        # Gates over [-6, 6]: the tails (GELU ~ 0 and ~ x) and the curved middle.
        h = (torch.randn(shape) * 2.5).to(dtype)
        dout = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
        res = {}
        for tag in ("k", "r"):
            hi = h.clone().requires_grad_(True)
            y = gg.geglu(hi, launch) if tag == "k" else gg.geglu_reference(hi)
            y.backward(dout)
            res["y_" + tag], res["dh_" + tag] = y.detach(), hi.grad
        res["y_contiguous"] = res["y_k"].is_contiguous()
        # A non-contiguous output gradient (same values) must give the same dh.
        hi = h.clone().requires_grad_(True)
        dout_t = dout.reshape(-1, dout.shape[-1]).t().contiguous().t().reshape(dout.shape)
        gg.geglu(hi, launch).backward(dout_t)
        res["dh_noncontiguous_dout"] = hi.grad
        results[name] = res

    # The student's feed-forward under bf16 autocast with the Triton kernel set takes the GEGLU
    # kernel and matches the same set with torch's GEGLU, parameter gradients included.
    ff = FeedForward(32)
    x = torch.randn(4, 9, 32).bfloat16()
    counted, calls = counted_triton("geglu")
    grads = {}
    for tag, kernels in (("k", counted), ("r", TRITON.replace(geglu="torch"))):
        ff.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), kernels_installed(ff, kernels):
            out = ff(xi)
        out.float().square().sum().backward()
        grads[tag] = {"out": out.detach(), "x": xi.grad, **{n: p.grad for n, p in ff.named_parameters()}}
    results["feed_forward"] = grads
    results["feed_forward_kernel_calls"] = len(calls)

    x = torch.randn(6, 64)
    results["available"] = {
        "contiguous": gg.fused_geglu_available(x),
        "bf16_3d": gg.fused_geglu_available(torch.randn(2, 3, 64).bfloat16()),
        "odd_width": gg.fused_geglu_available(torch.randn(6, 63)),
        "transposed": gg.fused_geglu_available(x.t()),
        "float64": gg.fused_geglu_available(x.double()),
        "empty": gg.fused_geglu_available(torch.zeros(0, 64)),
    }
    try:
        gg.geglu(torch.randn(6, 63))
        results["odd_width_raises"] = False
    except ValueError as exc:
        results["odd_width_raises"] = "even last dimension" in str(exc)
    return results


if __name__ == "__main__":
    run_main(main)
