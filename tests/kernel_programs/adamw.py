"""AdamWWithComputeCopies (fp32 or bf16 moments; fp32 or split masters) and torch's AdamW after
``clip_grad_norm_`` (tests/test_optim_copies.py)."""

from __future__ import annotations

import torch

from imix2mix.kernels.adamw import AdamWLaunch
from imix2mix.optim import AdamWWithComputeCopies
from kernel_programs import run_main


def main(moments: str = "fp32", masters: str = "fp32") -> dict:
    """``moments``: fp32, or bf16 (the optimizer's ``state_dtype``, the 24gb memory profile);
    ``masters``: fp32, or split (copy + int16 residual, the 24gb memory profile)."""
    torch.manual_seed(0)
    # (shape, bf16 copy?, group): a 4-D weight in channels-last, ragged sizes, one tensor under a chunk.
    specs = [((700,), True, 0), ((3, 5), False, 0), ((16, 8, 3, 3), True, 0), ((40, 31), True, 1), ((300,), False, 1)]
    reference = [torch.nn.Parameter(torch.randn(shape)) for shape, _, _ in specs]
    reference[2].data = reference[2].data.contiguous(memory_format=torch.channels_last)
    ours = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in reference]
    # A master that is a view at an odd offset: the optimizer must take a dense, aligned copy.
    storage = torch.randn(1 + 40 * 31)
    ours[3].data = storage[1:].view(40, 31)
    reference[3].data = ours[3].detach().clone()

    def groups(params: list) -> list[dict]:
        return [
            {"params": [p for p, (_, _, g) in zip(params, specs) if g == 0]},
            {"params": [p for p, (_, _, g) in zip(params, specs) if g == 1], "lr": 3e-2, "weight_decay": 0.0},
        ]

    hyper = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    torch_adamw = torch.optim.AdamW(groups(reference), **hyper)
    optimizer = AdamWWithComputeCopies(
        groups(ours), **hyper, compute_copies=[p for p, (_, copy, _) in zip(ours, specs) if copy],
        # Small chunks: tensors of a few hundred elements have full chunks and a ragged last one.
        launch=AdamWLaunch(chunk=256, block=64), state_dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[moments],
        split_masters={"fp32": False, "split": True}[masters],
    )  # fmt: skip
    # What the optimizer keeps per parameter (the copied parameter's copy is the parameter itself).
    state_bytes = {key: [] for key in ("master", "copy")}
    for p in ours:
        for key in state_bytes:
            tensor = optimizer.state[p].get(key)
            state_bytes[key].append(None if tensor is None else (str(tensor.dtype), tensor.data_ptr() == p.data_ptr()))
    results = {"dtypes": [str(p.dtype) for p in ours], "strides": [p.stride() for p in ours],
               "master_strides": [optimizer.master(p).stride() for p in ours], "steps": [],
               "state": state_bytes}  # fmt: skip
    for step in range(4):
        grads = [(torch.randn(shape) * 10).to(torch.bfloat16) for shape, _, _ in specs]
        # A parameter without a gradient in one step is untouched, and its step count falls behind
        # its kind's: the next step splits that kind in two launches.
        skipped = 0 if step == 2 else None
        for number, (r, o, g) in enumerate(zip(reference, ours, grads)):
            if number == skipped:
                r.grad = o.grad = None
                continue
            r.grad = g.float().contiguous(memory_format=torch.preserve_format)
            if r.dim() == 4:
                r.grad = r.grad.contiguous(memory_format=torch.channels_last)
            # ours get the bf16 gradient (copied) or its fp32 widening, NCHW: a layout to fix up
            o.grad = g if o.dtype == torch.bfloat16 else g.float()
        max_norm = 0.5 if step != 3 else 1e9  # the last step unclipped
        norm_reference = torch.nn.utils.clip_grad_norm_(reference, max_norm)
        torch_adamw.step()
        norm = optimizer.clip_and_step(max_norm)
        results["steps"].append({
            "norm": (float(norm_reference), float(norm)),
            "masters": [optimizer.master(p).clone() for p in ours],
            "copies": [p.detach().clone() for p in ours],
            "reference": [p.detach().clone() for p in reference],
            "exp_avg": [(torch_adamw.state[r]["exp_avg"].clone(), optimizer.state[o]["exp_avg"].clone())
                        for r, o in zip(reference, ours) if torch_adamw.state[r]],
            "exp_avg_sq": [(torch_adamw.state[r]["exp_avg_sq"].clone(), optimizer.state[o]["exp_avg_sq"].clone())
                           for r, o in zip(reference, ours) if torch_adamw.state[r]],
        })  # fmt: skip
    results["plans"] = len(optimizer._plans)
    results["chunks"] = sum(len(plan.partial) for plan, _ in optimizer._plans.values())
    results["step_counts"] = [optimizer.state[p]["step"] for p in ours]
    masters = [optimizer.master(p) for p in ours]
    optimizer.release()
    results["released_same_tensors"] = [p.data.data_ptr() == m.data_ptr() and p.dtype == torch.float32 for p, m in zip(ours, masters)]
    results["released_values"] = [torch.equal(p.detach(), m) and p.dtype == torch.float32 for p, m in zip(ours, masters)]
    results["moments_after_release"] = [sorted(k for k in optimizer.state[p] if k.startswith("exp_avg")) for p in ours]
    try:
        optimizer.clip_and_step(0.5)
        results["after_release"] = "stepped"
    except RuntimeError as error:
        results["after_release"] = str(error)
    return results


if __name__ == "__main__":
    run_main(main)
