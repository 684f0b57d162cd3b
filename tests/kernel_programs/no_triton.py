"""The kernel modules, the dispatch and the layers without Triton (tests/test_kernel_dispatch.py):
nothing is available, the kernels raise a clear error, and the layers fall back to torch's ops even
under the Triton kernel set."""

from __future__ import annotations

import importlib
import os
import sys

import torch

from kernel_programs import run_main


def main() -> dict:
    sys.modules["triton"] = None  # makes `import triton` raise ImportError
    from imix2mix.kernels import geglu as gg
    from imix2mix.kernels import group_norm as gn
    from imix2mix.kernels import layer_norm as ln
    from imix2mix.kernels import linear as kl
    from imix2mix.kernels import short_attention as sa
    from imix2mix.kernels.adamw import fused_adamw_available
    from imix2mix.kernels.dispatch import kernels_installed
    from imix2mix.seva.layers import GroupNorm32

    x4 = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    rows = torch.randn(4, 64).bfloat16()
    q = torch.randn(4, 5, 64)
    out = {
        "available": {
            "group_norm": gn.fused_group_norm_available(x4, 32),
            "layer_norm": ln.fused_layer_norm_available(rows),
            "linear": kl.fused_bias_grad_available(rows, torch.zeros(64)),
            "geglu": gg.fused_geglu_available(rows),
            "short_attention": sa.short_attention_available(q, q, q, 4),
            "adamw": fused_adamw_available(torch.device("cpu")),
        }
    }
    raises = {}
    for name, call in (
        ("group_norm", lambda: gn.group_norm_nhwc(x4, None, None, 32, 1e-5)),
        ("layer_norm", lambda: ln.layer_norm_rows(rows, None, None, 1e-5, torch.bfloat16)),
        ("geglu", lambda: gg.geglu(rows)),
    ):
        try:
            call()
            raises[name] = None
        except (RuntimeError, ValueError) as error:
            raises[name] = type(error).__name__
    out["raises"] = raises
    norm = GroupNorm32(32, 64)
    with kernels_installed(norm, "triton"):
        fallback = norm(x4, silu=True)
    out["layer_falls_back"] = torch.equal(fallback, gn.group_norm_reference(x4, norm.weight, norm.bias, 32, norm.eps, silu=True))
    out["library_imports_prefect_or_ray"] = any(m in sys.modules for m in ("prefect", "ray"))

    # With Triton but without the interpreter, CPU tensors take no kernel.
    del sys.modules["triton"]
    os.environ.pop("TRITON_INTERPRET", None)
    importlib.reload(importlib.import_module("imix2mix.kernels.triton_support"))
    gn = importlib.reload(gn)
    out["cpu_without_interpreter_available"] = gn.fused_group_norm_available(x4, 32)
    return out


if __name__ == "__main__":
    run_main(main)
