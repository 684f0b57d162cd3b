"""Channels-last models with the fused NHWC GroupNorm compute what the NCHW models compute.

On the GPU, ``EditConfig.channels_last`` puts the student's and the teacher's convolutions in NHWC
memory and their GroupNorms on the Triton kernels of :mod:`imix2mix.kernels.group_norm`.  Here the
same kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before triton is imported,
hence a child process): the tiny SEVA forward + backward and the tiny teacher UNet, NCHW against
channels-last, the same weights.
"""

from __future__ import annotations

import json
import textwrap

import torch
from diffusers.models.activations import GEGLU as DiffusersGEGLU
from kernel_checks import run_child

from imix2mix.presets import TeacherArchitecture, build_random_teacher_pipeline
from imix2mix.seva.attention import GEGLU
from imix2mix.seva.layers import GroupNorm32
from imix2mix.teachers.ip2p import InstructPix2PixTeacher


# The interpreter runs each Triton program in Python: one program per sample and channel block here
# (the GPU's grid splitting is covered by tests/test_kernels.py).
FEW_PROGRAMS = """
import imix2mix.kernels.group_norm as kernels
kernels.REDUCE_MIN_PROGRAMS = kernels.APPLY_MIN_PROGRAMS = 1
"""


def _run_interpreted(code: str) -> dict:
    return json.loads(run_child(FEW_PROGRAMS + textwrap.dedent(code), interpret=True).strip().splitlines()[-1])


STUDENT = """
import json, torch
import imix2mix.seva.layers as layers
from imix2mix.seva import Seva, SevaConfig

fused_calls = shifted_calls = 0
kernel, available = layers.group_norm_nhwc, layers.fused_group_norm_available
def counted(*args, **kwargs):
    global fused_calls, shifted_calls
    fused_calls += 1
    shifted_calls += kwargs.get("shift") is not None
    return kernel(*args, **kwargs)
layers.group_norm_nhwc = counted

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

def run(memory_format, dtype):
    network.zero_grad(set_to_none=True)
    network.to(memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = network(x, t, y, dense, num_frames=T)
    (out.float() * target).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}
    return out.detach().float(), grads

report = {}
for dtype in ("fp32",):  # bf16 rounding is the kernel tests' business; the interpreter is slow (~1 s a norm)
    layers.fused_group_norm_available = lambda x, groups: False  # the reference: torch's GroupNorm only
    out_ref, grads_ref = run(torch.contiguous_format, dtype)
    layers.fused_group_norm_available = available
    before, shifted_before = fused_calls, shifted_calls
    out_cl, grads_cl = run(torch.channels_last, dtype)
    norms = sum(isinstance(m, layers.GroupNorm32) for m in network.modules())
    res_blocks = sum(isinstance(m, layers.ResBlock) for m in network.modules())
    # Relative to the largest gradient: with one channel per group (tiny widths), the biases just before
    # a norm have a true gradient of zero, and their ~1e-6 of rounding noise is not a relative error.
    largest = max(float(g.norm()) for g in grads_ref.values())
    worst = max(float((grads_cl[n] - grads_ref[n]).norm()) / max(float(grads_ref[n].norm()), 1e-3 * largest) for n in grads_ref)
    report[dtype] = dict(
        output=float((out_cl - out_ref).norm() / out_ref.norm()),
        worst_grad=worst,
        same_grad_names=sorted(grads_cl) == sorted(grads_ref),
        fused_calls=fused_calls - before,
        norms=norms,
        shifted_calls=shifted_calls - shifted_before,
        res_blocks=res_blocks,
    )
print(json.dumps(report))
"""


def test_tiny_student_channels_last_matches_nchw_forward_and_backward():
    report = _run_interpreted(STUDENT)
    for dtype, tolerance in (("fp32", 1e-5),):
        entry = report[dtype]
        # every GroupNorm of the network took the fused kernel once in the forward pass, and each
        # ResBlock's second norm with its timestep embedding added inside (the shift)
        assert entry["fused_calls"] == entry["norms"] > 20, entry
        assert entry["shifted_calls"] == entry["res_blocks"] > 5, entry
        assert entry["same_grad_names"]
        assert entry["output"] < tolerance, (dtype, entry)
        assert entry["worst_grad"] < 10 * tolerance, (dtype, entry)


TEACHER = """
import json, torch
from imix2mix.presets import TeacherArchitecture, build_random_teacher_pipeline
from imix2mix.teachers.ip2p import InstructPix2PixTeacher

teacher = InstructPix2PixTeacher(build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=0))
g = torch.Generator().manual_seed(2)
latents = torch.randn(6, 8, 12, 12, generator=g)
text = torch.randn(6, 77, teacher.unet.config.cross_attention_dim, generator=g)
with torch.inference_mode():
    reference = teacher.unet(latents, 500, encoder_hidden_states=text).sample
    teacher.set_memory_format(torch.channels_last)
    weight = teacher.unet.conv_in.weight
    channels_last = teacher.unet(latents, 500, encoder_hidden_states=text).sample
print(json.dumps(dict(
    diff=float((channels_last - reference).norm() / reference.norm()),
    weights_channels_last=weight.is_contiguous(memory_format=torch.channels_last),
)))
"""


def test_tiny_teacher_channels_last_matches_nchw():
    report = _run_interpreted(TEACHER)
    assert report["weights_channels_last"]
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


TRANSFORMER_BLOCK = """
import json, torch
import imix2mix.seva.layers as layers
from imix2mix.seva.attention import TransformerBlock, TransformerBlockTimeMix

fused_calls = 0
kernel, available = layers.layer_norm_rows, layers.fused_layer_norm_available
def counted(*args, **kwargs):
    global fused_calls
    fused_calls += 1
    return kernel(*args, **kwargs)
layers.layer_norm_rows = counted

torch.manual_seed(0)
report = {}
for block in (TransformerBlock(64, 4, 16, 32), TransformerBlockTimeMix(64, 4, 16, 32)):
    x = torch.randn(6, 40, 64).bfloat16()
    context = torch.randn(6, 1, 32)
    target = torch.randn(6, 40, 64)

    def run(fused):
        layers.fused_layer_norm_available = available if fused else (lambda x: False)
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x, context)
        (out.float() * target).sum().backward()
        return out.float().detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}

    before = fused_calls
    out_ref, grads_ref = run(False)
    assert fused_calls == before
    out_fused, grads_fused = run(True)
    largest = max(float(g.norm()) for g in grads_ref.values())
    report[type(block).__name__] = dict(
        fused_calls=fused_calls - before,
        norms=sum(isinstance(m, layers.LayerNorm32) for m in block.modules()),
        output=float((out_fused - out_ref).norm() / out_ref.norm()),
        worst_grad=max(float((grads_fused[n] - grads_ref[n]).norm()) / max(float(grads_ref[n].norm()), 1e-3 * largest) for n in grads_ref),
        same_grad_names=sorted(grads_fused) == sorted(grads_ref),
    )
print(json.dumps(report))
"""


def test_transformer_blocks_with_fused_layer_norms_match_autocast_layer_norm():
    """Under bf16 autocast the fused LayerNorm (bf16 out) computes what LayerNorm in fp32 followed by
    the Linear's cast computes, gradients included."""
    report = _run_interpreted(TRANSFORMER_BLOCK)
    for name, entry in report.items():
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
