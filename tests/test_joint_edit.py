"""T2VZ joint edit: every frame attends to frame 0's keys/values (diffusers' CrossFrameAttnProcessor)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import CrossFrameAttnProcessor

from imix2mix.attention import KeyViewState, RandomCrossViewAttnProcessor
from imix2mix.presets import TeacherArchitecture, build_random_teacher_pipeline
from imix2mix.config import TeacherConfig
from imix2mix.edits import Edit
from imix2mix.teachers.ip2p import InstructPix2PixTeacher
from imix2mix.teachers.control_images import CannyControl
from imix2mix.teachers.controlnet import ControlNetArchitecture, ControlNetTeacher, build_random_controlnet_pipeline
from imix2mix.teachers.joint_edit import JOINT_EDIT_STEPS, first_frame_attention, joint_edit

VIEWS, TOKENS, DIM, HEADS = 3, 10, 16, 2


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(QKᵀ/√d)V per head, written out with matmuls."""
    d = q.shape[-1] // heads
    split = lambda x: x.view(x.shape[0], heads, d).transpose(0, 1)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ split(v)).transpose(0, 1).reshape(q.shape[0], heads * d)


@pytest.mark.parametrize("groups", [2, 3])  # ControlNet (text CFG) and IP2P (dual CFG) batches
def test_every_frame_attends_to_frame_zero_of_its_group(groups):
    torch.manual_seed(0)
    attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS).eval()
    hidden = torch.randn(groups * VIEWS, TOKENS, DIM)
    state = KeyViewState()
    state.select(VIEWS, 0, "cpu")
    with torch.no_grad():
        ours = RandomCrossViewAttnProcessor(state)(attn, hidden)
        diffusers_t2vz = CrossFrameAttnProcessor(batch_size=groups)(attn, hidden)
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        for group in range(groups):
            first = group * VIEWS
            for view in range(VIEWS):
                i = group * VIEWS + view
                expected = attn.to_out[0](reference_attention(q[i], k[first], v[first], HEADS))
                torch.testing.assert_close(ours[i], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, diffusers_t2vz, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    images = torch.full((VIEWS, 3, 40, 40), -0.5)
    for i in range(VIEWS):
        images[i, :, 5 + 5 * i: 20 + 5 * i, 8:30] = 0.7
    return images


def _with_diffusers_cross_frame(models, groups: int):
    for model in models:
        model.set_attn_processor(CrossFrameAttnProcessor(batch_size=groups))


def test_ip2p_joint_edit_is_diffusers_text2video_zero(views):
    teacher = InstructPix2PixTeacher(build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=0))
    teacher.set_cross_view_attention("extended")
    inputs = teacher.pipeline_inputs(views, Edit("make it snowy"), TeacherConfig(image_size=96))
    edited = joint_edit(teacher, inputs, generator=torch.Generator().manual_seed(3), steps=3)
    assert teacher.attention_mode == "extended"  # restored
    assert edited.shape == (VIEWS, 3, 96, 96) and edited.min() >= -1 and edited.max() <= 1
    # the same pipeline with diffusers' own cross-frame processor (3 CFG groups) gives the same frames
    _with_diffusers_cross_frame([teacher.unet], groups=3)
    with torch.inference_mode():
        expected = teacher.pipeline(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(edited, expected * 2 - 1, rtol=1e-4, atol=1e-4)
    # and it differs from editing the views independently (the frames do attend to frame 0)
    teacher.set_cross_view_attention("none")
    with torch.inference_mode():
        independent = teacher.pipeline(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.allclose(edited[0], independent[0] * 2 - 1, atol=1e-4)  # frame 0 attends to itself
    assert not torch.allclose(edited[1:], independent[1:] * 2 - 1, atol=1e-3)


def test_controlnet_joint_edit_is_diffusers_text2video_zero_with_shared_noise(views):
    teacher = ControlNetTeacher(
        build_random_controlnet_pipeline(ControlNetArchitecture.from_teacher_architecture(TeacherArchitecture.tiny(), (8, 8, 16, 16))),
        CannyControl(),
    )
    inputs = teacher.pipeline_inputs(views, Edit("make it snowy", target_caption="a snowy face"), TeacherConfig(image_size=96))
    edited = joint_edit(teacher, inputs, generator=torch.Generator().manual_seed(4), steps=3, shared_initial_noise=True)
    assert edited.shape == (VIEWS, 3, 96, 96)
    assert teacher.attention_mode == "none"
    latents = torch.randn((1, 4, 12, 12), generator=torch.Generator().manual_seed(4)).expand(VIEWS, -1, -1, -1)
    _with_diffusers_cross_frame([teacher.unet, teacher.controlnet], groups=2)
    with torch.inference_mode():
        expected = teacher.pipeline(
            **inputs, latents=latents, num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="pt"
        ).images
    torch.testing.assert_close(edited, expected * 2 - 1, rtol=1e-4, atol=1e-4)


def test_first_frame_attention_sets_kappa_zero_and_restores():
    teacher = InstructPix2PixTeacher(build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=0))
    teacher.set_cross_view_attention("none")
    teacher.key_view_state.select(VIEWS, 2, "cpu")
    with first_frame_attention(teacher, 5):
        assert teacher.attention_mode == "rcv"
        assert teacher.key_view_state.num_views == 5 and teacher.key_view_state.key_view == 0
        assert int(teacher.key_view_state.key_view_index) == 0
    assert teacher.attention_mode == "none"
    assert JOINT_EDIT_STEPS == 100
