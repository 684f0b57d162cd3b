"""Channels-last models with the Triton kernel set against NCHW models with torch's ops
(tests/test_channels_last.py): the tiny SEVA student forward + backward, the tiny teacher UNet, and
SEVA's transformer blocks with the fused LayerNorm.  One check per run, named by the first argument."""

from __future__ import annotations

import torch

from imix2mix.kernels.dispatch import TORCH, kernels_installed
from imix2mix.kernels.group_norm import GroupNormLaunch
from kernel_programs import counted_triton, run_main

# The interpreter runs each Triton program in Python: one program per sample and channel block here
# (the GPU's grid splitting is covered by tests/test_kernels.py).
FEW_PROGRAMS = GroupNormLaunch(reduce_min_programs=1, apply_min_programs=1)


def _relative_gradient_error(grads: dict, grads_ref: dict) -> float:
    # Relative to the largest gradient: with one channel per group (tiny widths), the biases just
    # before a norm have a true gradient of zero, and their ~1e-6 of rounding noise is not a
    # relative error.
    largest = max(float(g.norm()) for g in grads_ref.values())
    return max(float((grads[n] - grads_ref[n]).norm()) / max(float(grads_ref[n].norm()), 1e-3 * largest) for n in grads_ref)


def student() -> dict:
    from imix2mix.seva import Seva, SevaConfig
    from imix2mix.seva.layers import GroupNorm32, ResBlock

    counted, calls = counted_triton("group_norm")
    # Only the GroupNorm kernels: the other ops' kernels have their own tests, and the interpreter
    # is slow (about 1 s a norm).
    kernels = TORCH.replace(group_norm=counted.group_norm, group_norm_launch=FEW_PROGRAMS)
    torch.manual_seed(0)
    config = SevaConfig.tiny()
    network = Seva(config)
    g = torch.Generator().manual_seed(1)
    T, H = 3, 8
    x = torch.randn(T, config.in_channels, H, H, generator=g)
    t = torch.randint(0, 1000, (T,), generator=g)
    y = torch.randn(T, 1, config.context_dim, generator=g)
    dense = torch.randn(T, config.dense_in_channels, H, H, generator=g)
    target = torch.randn(T, config.out_channels, H, H, generator=g)

    def run(memory_format: torch.memory_format) -> tuple[torch.Tensor, dict]:
        network.zero_grad(set_to_none=True)
        network.to(memory_format=memory_format)
        out = network(x, t, y, dense, num_frames=T)
        (out.float() * target).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}
        return out.detach().float(), grads

    # fp32 only: bf16 rounding is the kernel tests' business.
    with kernels_installed(network, TORCH):
        out_ref, grads_ref = run(torch.contiguous_format)
    calls_before = len(calls)
    with kernels_installed(network, kernels):
        out_cl, grads_cl = run(torch.channels_last)
    return dict(
        output=float((out_cl - out_ref).norm() / out_ref.norm()),
        worst_grad=_relative_gradient_error(grads_cl, grads_ref),
        same_grad_names=sorted(grads_cl) == sorted(grads_ref),
        calls_before=calls_before,
        fused_calls=len(calls),
        norms=sum(isinstance(m, GroupNorm32) for m in network.modules()),
        shifted_calls=sum(call.get("shift") is not None for call in calls),
        res_blocks=sum(isinstance(m, ResBlock) for m in network.modules()),
    )


def teacher() -> dict:
    from imix2mix.presets import TeacherArchitecture, build_random_teacher_pipeline
    from imix2mix.seva.layers import GroupNorm32
    from imix2mix.teachers.ip2p import InstructPix2PixTeacher

    teacher = InstructPix2PixTeacher(build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=0))
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(6, 8, 12, 12, generator=g)
    text = torch.randn(6, 77, teacher.unet.config.cross_attention_dim, generator=g)
    counted, calls = counted_triton("group_norm")
    kernels = counted.replace(group_norm_launch=FEW_PROGRAMS)  # and the Triton GEGLU
    with torch.inference_mode():
        reference = teacher.unet(latents, 500, encoder_hidden_states=text).sample
        calls_before = len(calls)
        teacher.set_memory_format(torch.channels_last)
        weight = teacher.unet.conv_in.weight
        previous = teacher.set_kernels(kernels)
        channels_last = teacher.unet(latents, 500, encoder_hidden_states=text).sample
        fused_calls = len(calls)
        teacher.set_kernels(previous)
        teacher.unet(latents, 500, encoder_hidden_states=text)
    return dict(
        diff=float((channels_last - reference).norm() / reference.norm()),
        weights_channels_last=weight.is_contiguous(memory_format=torch.channels_last),
        calls_before=calls_before,
        fused_calls=fused_calls,
        calls_after=len(calls) - fused_calls,
        norms=sum(isinstance(m, GroupNorm32) for m in teacher.unet.modules()),
        previous_was_torch=previous == TORCH,
    )


def transformer_blocks() -> dict:
    from imix2mix.seva.attention import TransformerBlock, TransformerBlockTimeMix
    from imix2mix.seva.layers import LayerNorm32

    counted, calls = counted_triton("layer_norm")
    torch.manual_seed(0)
    report = {}
    for block in (TransformerBlock(64, 4, 16, 32), TransformerBlockTimeMix(64, 4, 16, 32)):
        x = torch.randn(6, 40, 64).bfloat16()
        context = torch.randn(6, 1, 32)
        target = torch.randn(6, 40, 64)

        def run(kernels: object) -> tuple[torch.Tensor, dict]:
            block.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16), kernels_installed(block, kernels):
                out = block(x, context)
            (out.float() * target).sum().backward()
            return out.float().detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}

        before = len(calls)
        out_ref, grads_ref = run(TORCH)
        unchanged = len(calls) == before
        out_fused, grads_fused = run(TORCH.replace(layer_norm="counted"))
        report[type(block).__name__] = dict(
            reference_took_no_kernel=unchanged,
            fused_calls=len(calls) - before,
            norms=sum(isinstance(m, LayerNorm32) for m in block.modules()),
            output=float((out_fused - out_ref).norm() / out_ref.norm()),
            worst_grad=_relative_gradient_error(grads_fused, grads_ref),
            same_grad_names=sorted(grads_fused) == sorted(grads_ref),
        )
    return report


def main(check: str) -> dict:
    return {"student": student, "teacher": teacher, "transformer_blocks": transformer_blocks}[check]()


if __name__ == "__main__":
    run_main(main)
