"""The short-attention kernels, SDPA in the same dtype and SDPA in float64 on the cases of
tests/test_kernels_short_attention.py, and SEVA's time-mix block through the kernel set."""

from __future__ import annotations

import json

import torch

from imix2mix.kernels import short_attention as sa
from imix2mix.kernels.dispatch import TRITON, kernels_installed
from imix2mix.seva.attention import TransformerBlockTimeMix
from kernel_programs import counted_triton, run_main


def main(cases_json: str) -> dict:
    torch.manual_seed(0)
    results = {}
    for name, dtype, (B, L, H, D) in json.loads(cases_json):
        dtype = getattr(torch, dtype)
        spread = 6.0 if "large_scores" in name else 1.5  # large scores: a peaked softmax
        q, k, v = [(torch.randn(B, L, H * D) * spread).to(dtype) for _ in range(3)]
        do = torch.randn(B, L, H * D).to(dtype)
        res = {}
        for tag, fn, cast in (("k", sa.short_attention, dtype), ("torch", sa.short_attention_reference, dtype),
                              ("truth", sa.short_attention_reference, torch.float64)):  # fmt: skip
            ins = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
            o = fn(*ins, H)
            o.backward(do.to(cast))
            res[tag] = [o.detach()] + [t.grad for t in ins]
        results[name] = res

    # SEVA's time-mix block (T = 5 views) under bf16 autocast with the Triton kernel set takes the
    # kernel for its self-attention and computes what the set with torch's attention computes,
    # parameter gradients included.
    counted, calls = counted_triton("short_attention")
    block = TransformerBlockTimeMix(64, 4, 16, 32)
    x = torch.randn(12, 5, 64).bfloat16()
    context = torch.randn(12, 1, 32)
    target = torch.randn(12, 5, 64)
    grads = {}
    for tag, kernels in (("k", counted), ("r", TRITON.replace(short_attention="torch"))):
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), kernels_installed(block, kernels):
            out = block(x, context)
        (out.float() * target).sum().backward()
        grads[tag] = {"out": out.float().detach(), **{n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}}
    results["time_mix_block"] = grads
    results["time_mix_kernel_calls"] = len(calls)

    q = torch.randn(4, 5, 64)
    long, wide = torch.randn(2, 17, 64), torch.randn(2, 5, 256)
    results["available"] = {
        "ok": sa.short_attention_available(q, q, q, 4),
        "too_long": sa.short_attention_available(long, long, long, 4),
        "head_dim_too_wide": sa.short_attention_available(wide, wide, wide, 1),
        "heads_do_not_divide": sa.short_attention_available(q, q, q, 3),
        "non_contiguous": sa.short_attention_available(q.transpose(0, 1).contiguous().transpose(0, 1), q, q, 4),
        "mixed_dtypes": sa.short_attention_available(q, q.bfloat16(), q, 4),
    }
    return results


if __name__ == "__main__":
    run_main(main)
