"""Channels-last models with the fused NHWC GroupNorm compute what the NCHW models compute.

On the GPU, ``EditConfig.channels_last`` puts the student's and the teacher's convolutions in NHWC
memory and their GroupNorms on the Triton kernels of :mod:`imix2mix.kernels.group_norm`.  Here the
same kernels run in Triton's CPU interpreter, in child processes (:mod:`kernel_programs.channels_last`,
see :mod:`kernel_programs` for why): the tiny SEVA forward + backward and the tiny teacher UNet,
NCHW with torch's ops against channels-last with the kernels, the same weights.
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU as DiffusersGEGLU
from kernel_checks import run_program

from imix2mix.presets import TeacherArchitecture, build_random_teacher_pipeline
from imix2mix.seva.attention import GEGLU
from imix2mix.seva.layers import GroupNorm32
from imix2mix.teachers.ip2p import InstructPix2PixTeacher


def test_tiny_student_channels_last_matches_nchw_forward_and_backward(tmp_path):
    entry = run_program("channels_last", "student", folder=tmp_path)
    tolerance = 1e-5  # fp32
    # the reference took no kernel; every GroupNorm of the network took the fused kernel once in the
    # forward pass, and each ResBlock's second norm with its timestep embedding added inside (the shift)
    assert entry["calls_before"] == 0, entry
    assert entry["fused_calls"] == entry["norms"] > 20, entry
    assert entry["shifted_calls"] == entry["res_blocks"] > 5, entry
    assert entry["same_grad_names"]
    assert entry["output"] < tolerance, entry
    assert entry["worst_grad"] < 10 * tolerance, entry


def test_tiny_teacher_channels_last_matches_nchw(tmp_path):
    report = run_program("channels_last", "teacher", folder=tmp_path)
    assert report["weights_channels_last"]
    # torch's ops until the teacher's kernel set is the fused one; every GroupNorm took the kernel
    # once then; torch's ops again once the previous set is back
    assert report["previous_was_torch"] and report["calls_before"] == 0, report
    assert report["fused_calls"] == report["norms"] > 5, report
    assert report["calls_after"] == 0, report
    assert report["diff"] < 1e-5, report


def test_teacher_group_norms_and_geglus_become_ours_with_the_same_function():
    pipeline = build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=0)
    unet = pipeline.unet
    plain = sum(type(m) is torch.nn.GroupNorm for m in unet.modules())
    diffusers_geglus = sum(type(m) is DiffusersGEGLU for m in unet.modules())
    parameters = dict(unet.named_parameters())
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(3, 8, 12, 12, generator=g)
    text = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    with torch.inference_mode():
        before = unet(latents, 500, encoder_hidden_states=text).sample

    teacher = InstructPix2PixTeacher(pipeline)
    with torch.inference_mode():
        after = teacher.unet(latents, 500, encoder_hidden_states=text).sample
    assert plain > 0
    assert sum(type(m) is GroupNorm32 for m in teacher.unet.modules()) == plain
    assert not any(type(m) is torch.nn.GroupNorm for m in teacher.unet.modules())
    assert diffusers_geglus > 0
    assert sum(type(m) is GEGLU for m in teacher.unet.modules()) == diffusers_geglus
    assert not any(type(m) is DiffusersGEGLU for m in teacher.unet.modules())
    # the very same Parameter objects under the same names (the checkpoint's keys are unchanged)
    assert all(p is parameters[n] for n, p in teacher.unet.named_parameters())
    assert any(type(m) is torch.nn.GroupNorm for m in teacher.vae.modules())  # the VAE is left alone
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_transformer_blocks_with_fused_layer_norms_match_autocast_layer_norm(tmp_path):
    """Under bf16 autocast the fused LayerNorm (bf16 out) computes what LayerNorm in fp32 followed by
    the Linear's cast computes, gradients included."""
    report = run_program("channels_last", "transformer_blocks", folder=tmp_path)
    assert sorted(report) == ["TransformerBlock", "TransformerBlockTimeMix"]
    for name, entry in report.items():
        assert entry["reference_took_no_kernel"], (name, entry)
        assert entry["fused_calls"] == entry["norms"] >= 3, (name, entry)
        assert entry["same_grad_names"]
        # one bf16 rounding of a LayerNorm output may differ by an ulp, which the matmuls carry on
        assert entry["output"] < 1e-2, (name, entry)
        assert entry["worst_grad"] < 5e-2, (name, entry)


def test_teacher_transformers_keep_channels_last_tokens_for_proj_out():
    """The teacher's transformer blocks hand their NHWC tokens to the 1×1 ``proj_out`` without
    diffusers' NCHW copy (and the convolution's copy back), computing the same output."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    teacher = InstructPix2PixTeacher(build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=0))
    teacher.set_memory_format(torch.channels_last)
    block = next(m for m in teacher.unet.modules() if isinstance(m, Transformer2DModel))
    assert not block.use_linear_projection  # IP2P's (SD 1.5) blocks project with 1×1 convolutions
    channels = block.proj_out.out_channels
    g = torch.Generator().manual_seed(3)
    residual = torch.randn(2, channels, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    tokens = torch.randn(2, 30, channels, generator=g)
    seen = []
    hook = block.proj_out.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.inference_mode():
        ours = block._get_output_for_continuous_inputs(tokens, residual, 2, 6, 5, channels)
        diffusers = Transformer2DModel._get_output_for_continuous_inputs(block, tokens, residual, 2, 6, 5, channels)
        nchw = block._get_output_for_continuous_inputs(tokens, residual.contiguous(), 2, 6, 5, channels)
    hook.remove()
    assert seen == [True, False, False]  # ours: NHWC in; diffusers' path (and NCHW residuals): NCHW in
    torch.testing.assert_close(ours, diffusers, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nchw, diffusers, rtol=0, atol=0)
