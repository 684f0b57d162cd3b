"""The column-sum kernel on the cases of tests/test_kernels_linear.py, and ``Linear`` through the
Triton kernel set against ``nn.Linear``."""

from __future__ import annotations

import json

import torch

from imix2mix.kernels import linear as kl
from imix2mix.kernels.dispatch import kernels_installed
from imix2mix.seva.layers import Linear
from kernel_programs import counted_triton, run_main


def main(sums_json: str) -> dict:
    torch.manual_seed(0)
    results = {}
    for name, dtype, shape, knobs in json.loads(sums_json):
        launch = kl.ColumnSumLaunch(**knobs)
        # A common offset per column: an fp32 sum in the wrong order or precision would show.
        g = (torch.randn(shape) + 3 * torch.randn(shape[1])).to(getattr(torch, dtype))
        results[name] = {
            "kernel": kl.column_sum(g, g.dtype, launch),
            "kernel_fp32": kl.column_sum(g, torch.float32, launch),
            "truth": g.double().sum(0),
            "reference": g.sum(0),
        }

    counted, calls = counted_triton("linear")
    layer = Linear(48, 40)
    plain = torch.nn.Linear(48, 40)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 17, 48)
    target = torch.randn(3, 17, 40)
    backward_functions = []
    for autocast in (False, True):
        grads = {}
        for tag, module in (("k", layer), ("r", plain)):
            module.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), kernels_installed(module, counted):
                out = module(xi)
            if tag == "k":
                backward_functions.append(type(out.grad_fn).__name__)
            (out.float() * target).sum().backward()
            grads[tag] = {"out": out.detach(), "x": xi.grad, "weight": module.weight.grad, "bias": module.bias.grad}
        results[f"module_autocast_{autocast}"] = grads
    results["kernel_calls"] = len(calls)
    results["backward_functions"] = backward_functions
    results["no_bias_available"] = kl.fused_bias_grad_available(x, None)
    return results


if __name__ == "__main__":
    run_main(main)
