"""GPU check of the GEGLU, bias-gradient, short-attention and GroupNorm(+shift) kernels against torch
at the student's shapes.

The CPU tests run these kernels in Triton's interpreter; this runs the compiled kernels on CUDA:
fresh random inputs, outputs poisoned with NaN beforehand where the kernel allocates them, and
the same comparisons (ulps and bit-identical fractions against torch's ops, in bf16 and fp16).

    python benchmarks/check_kernels_gpu.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kernel_checks import ulp_distance  # noqa: E402

from imix2mix.kernels.geglu import geglu, geglu_reference  # noqa: E402
from imix2mix.kernels.group_norm import group_norm_nhwc, group_norm_reference  # noqa: E402
from imix2mix.kernels.linear import column_sum  # noqa: E402
from imix2mix.kernels.short_attention import short_attention, short_attention_reference  # noqa: E402
from imix2mix.seva.layers import Linear  # noqa: E402


def low_precision_report(k: torch.Tensor, r: torch.Tensor) -> dict:
    ulps = ulp_distance(k, r)
    return {
        "finite": bool(torch.isfinite(k).all()),
        "max_ulps": int(ulps.max()),
        "exact": round(float((ulps == 0).float().mean()), 6),
        "rel_max": float((k.float() - r.float()).abs().max() / r.float().abs().max()),
    }


def main() -> None:
    # On a machine without CUDA: a smoke test in Triton's interpreter (TRITON_INTERPRET=1), rows / 256.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shrink = 1 if device.type == "cuda" else 256
    torch.manual_seed(0)
    report = {}
    for rows, channels in ((25920, 320), (6480, 640), (1620, 1280), (4 * 4096 * 3, 320)):
        rows = max(rows // shrink, 3)
        for dtype in (torch.bfloat16, torch.float16):
            h = (torch.randn(rows, 8 * channels, device=device) * 2.5).to(dtype)
            dout = torch.randn(rows, 4 * channels, device=device).to(dtype)
            res = {}
            for tag, fn in (("k", geglu), ("r", geglu_reference)):
                hi = h.clone().requires_grad_(True)
                out = fn(hi)
                out.backward(dout)
                res[tag] = (out.detach(), hi.grad)
            report[f"geglu[{rows}x{8 * channels},{dtype}]"] = {
                "forward": low_precision_report(res["k"][0], res["r"][0]),
                "backward": low_precision_report(res["k"][1], res["r"][1]),
            }
        g = (torch.randn(rows, 8 * channels, device=device) + 3 * torch.randn(8 * channels, device=device)).bfloat16()
        truth = g.double().sum(0)
        report[f"column_sum[{rows}x{8 * channels}]"] = {
            "kernel_fp32_rel": float((column_sum(g, torch.float32).double() - truth).abs().max() / truth.abs().max()),
            "torch_fp32_rel": float((g.float().sum(0).double() - truth).abs().max() / truth.abs().max()),
            "bf16_vs_torch": low_precision_report(column_sum(g, torch.bfloat16), g.sum(0)),
        }
        layer = Linear(channels, 8 * channels).to(device)
        plain = torch.nn.Linear(channels, 8 * channels).to(device)
        plain.load_state_dict(layer.state_dict())
        x = torch.randn(rows, channels, device=device).bfloat16()
        grad = torch.randn(rows, 8 * channels, device=device).bfloat16()
        res = {}
        for tag, module in (("k", layer), ("r", plain)):
            xi = x.clone().requires_grad_(True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = module(xi)
            out.backward(grad)
            res[tag] = {"out": out.detach(), "x": xi.grad, "weight": module.weight.grad, "bias": module.bias.grad}
        report[f"linear[{rows}x{channels}->{8 * channels}]"] = {
            key: {"rel_max": float((res["k"][key].float() - res["r"][key].float()).abs().max() / res["r"][key].float().abs().max()),
                  "bit_identical": bool(torch.equal(res["k"][key], res["r"][key]))}
            for key in res["k"]
        }
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for positions, channels, heads in ((5184, 320, 5), (1296, 640, 10), (324, 1280, 20)):
        positions = max(positions // shrink, 3)
        q, k, v = (torch.randn(positions, 5, channels, device=device).bfloat16() for _ in range(3))
        do = torch.randn(positions, 5, channels, device=device).bfloat16()
        res = {}
        for tag, fn, dtype in (("kernel", short_attention, torch.bfloat16), ("sdpa_bf16", short_attention_reference, torch.bfloat16),
                               ("truth", short_attention_reference, torch.float64 if device.type == "cpu" else torch.float32)):
            ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
            out = fn(*ins, heads)
            out.backward(do.to(dtype))
            res[tag] = [out.detach()] + [t.grad for t in ins]
        report[f"short_attention[{positions}x5x{channels},heads={heads}]"] = {
            tag: [float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(res[tag], res["truth"])]
            for tag in ("kernel", "sdpa_bf16")
        }
    # The ResBlock's second norm: GroupNorm + SiLU of h + emb[:, :, None, None], the add inside the kernels.
    size_shrink = 1 if device.type == "cuda" else 9  # 72 / 9 = 8: 8x8, 4x4, 2x2 in the interpreter
    for channels, size in ((320, 72), (640, 36), (1280, 18)):
        size = max(size // size_shrink, 2)
        n, groups = 5, 32
        x = (torch.randn(n, channels, size, size, device=device) * 2 + torch.randn(1, channels, 1, 1, device=device))
        x = x.bfloat16().contiguous(memory_format=torch.channels_last)
        emb = (torch.randn(n, channels, device=device) * 2).bfloat16()
        weight = 1 + 0.1 * torch.randn(channels, device=device)
        bias = 0.1 * torch.randn(channels, device=device)
        dy = torch.randn(n, channels, size, size, device=device).bfloat16().contiguous(memory_format=torch.channels_last)
        res = {}
        for tag, fn in (("k", group_norm_nhwc), ("r", group_norm_reference)):
            ins = [t.clone().requires_grad_(True) for t in (x, weight, bias, emb)]
            out = fn(ins[0], ins[1], ins[2], groups, 1e-5, silu=True, shift=ins[3])
            out.backward(dy)
            res[tag] = [out.detach()] + [t.grad for t in ins]
        (y_k, dx_k, dw_k, db_k, de_k), (y_r, dx_r, dw_r, db_r, de_r) = res["k"], res["r"]
        report[f"group_norm_shift[{n}x{channels}x{size}x{size},bf16,silu]"] = {
            "forward": low_precision_report(y_k, y_r),
            "dx": low_precision_report(dx_k, dx_r),
            "dshift": low_precision_report(de_k, de_r),
            "dweight_rel_max": float((dw_k - dw_r).abs().max() / dw_r.abs().max()),
            "dbias_rel_max": float((db_k - db_r).abs().max() / db_r.abs().max()),
        }
    for key, value in report.items():
        print(key, json.dumps(value))


if __name__ == "__main__":
    main()
