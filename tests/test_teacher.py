"""InstructPix2Pix teacher on a tiny random pipeline: dual CFG, per-scene context, loading."""

from __future__ import annotations

import pytest
import torch

import dataclasses

from imix2mix.config import TeacherConfig
from imix2mix.edits import Edit
from imix2mix.errors import MissingWeightsError
from imix2mix.presets import TeacherArchitecture, build_random_teacher_pipeline
from imix2mix.teachers.ip2p import InstructPix2PixTeacher

VIEWS = 3
SETTINGS = TeacherConfig(image_size=96, steps=3)  # s_T 7.5, s_I 1.5
SNOWY = Edit("make it snowy")


@pytest.fixture(scope="module")
def teacher() -> InstructPix2PixTeacher:
    return InstructPix2PixTeacher(build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=0))


@pytest.fixture(scope="module")
def originals() -> torch.Tensor:
    return torch.rand(VIEWS, 3, 40, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_sizes_follow_the_unet_and_vae(teacher):
    assert teacher.latent_size == 12 and teacher.image_size == 96
    # SD's scaled-linear schedule: ᾱ_950 ≈ 0.0082 (METHOD §1.5 step 4)
    assert teacher.alphas_cumprod[950].item() == pytest.approx(0.0082, abs=2e-4)


def test_prepare_computes_text_and_image_latents_once(teacher, originals):
    context = teacher.prepare(SNOWY, originals, SETTINGS)
    assert context.num_views == VIEWS
    assert context.text_embeddings.shape == (3, 77, 32)
    torch.testing.assert_close(context.text_embeddings[1], context.text_embeddings[2])
    assert not torch.allclose(context.text_embeddings[0], context.text_embeddings[1])
    assert context.image_latents.shape == (VIEWS, 4, 12, 12)
    assert not context.image_latents.requires_grad
    pixels = torch.nn.functional.interpolate(originals[1:2], size=(96, 96), mode="bilinear", antialias=True)
    expected = teacher.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(context.image_latents[1:2], expected, rtol=1e-4, atol=1e-5)


def test_dual_cfg_matches_three_separate_unet_calls(teacher, originals):
    context = teacher.prepare(SNOWY, originals, SETTINGS)
    z_t = torch.randn(VIEWS, 4, 12, 12, generator=torch.Generator().manual_seed(4))
    t, s_text, s_image = 500, 6.0, 1.25
    context = dataclasses.replace(context, text_cfg=s_text, image_cfg=s_image)
    teacher.set_cross_view_attention("none")
    guided = teacher.predict_noise(z_t, t, context)
    src = context.image_latents
    edit_text = context.text_embeddings[0:1].expand(VIEWS, -1, -1)
    empty_text = context.text_embeddings[1:2].expand(VIEWS, -1, -1)
    with torch.no_grad():
        eps_text = teacher.unet(torch.cat([z_t, src], 1), t, edit_text).sample
        eps_image = teacher.unet(torch.cat([z_t, src], 1), t, empty_text).sample
        eps_uncond = teacher.unet(torch.cat([z_t, torch.zeros_like(src)], 1), t, empty_text).sample
    expected = eps_uncond + s_text * (eps_text - eps_image) + s_image * (eps_image - eps_uncond)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-4)
    assert not guided.is_inference()


def test_rcv_mixes_views_and_reduces_to_plain_for_identical_views(teacher, originals):
    context = teacher.prepare(SNOWY, originals, SETTINGS)
    z_t = torch.randn(VIEWS, 4, 12, 12)
    teacher.set_cross_view_attention("none")
    plain = teacher.predict_noise(z_t, 700, context)
    teacher.set_cross_view_attention("rcv")
    try:
        rcv = teacher.predict_noise(z_t, 700, context, key_view=1)
        assert not torch.allclose(rcv, plain, atol=1e-4)
        same = dataclasses.replace(context, image_latents=context.image_latents[:1].expand(VIEWS, -1, -1, -1))
        z_same = z_t[:1].expand(VIEWS, -1, -1, -1)
        teacher.set_cross_view_attention("none")
        plain_same = teacher.predict_noise(z_same, 700, same)
        teacher.set_cross_view_attention("rcv")
        rcv_same = teacher.predict_noise(z_same, 700, same, key_view=2)
        torch.testing.assert_close(rcv_same, plain_same, rtol=1e-4, atol=1e-4)
    finally:
        teacher.set_cross_view_attention("none")


def test_add_noise_uses_the_teacher_alphas(teacher):
    x0, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    a = teacher.alphas_cumprod[300]
    torch.testing.assert_close(teacher.add_noise(x0, 300, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_reference_edit_is_seeded_and_uses_plain_attention(teacher, originals):
    teacher.set_cross_view_attention("rcv")
    try:
        a = teacher.edit_image(originals[0], SNOWY, SETTINGS, torch.Generator().manual_seed(1))
        b = teacher.edit_image(originals[0], SNOWY, SETTINGS, torch.Generator().manual_seed(1))
        c = teacher.edit_image(originals[0], SNOWY, SETTINGS, torch.Generator().manual_seed(2))
        assert teacher.attention_mode == "rcv"  # restored after the edit
    finally:
        teacher.set_cross_view_attention("none")
    assert a.shape == (3, 96, 96) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_decode_and_encode_shapes(teacher):
    latents = torch.randn(2, 4, 12, 12)
    images = teacher.decode(latents)
    assert images.shape == (2, 3, 96, 96) and images.abs().max() <= 1
    images.requires_grad_(True)
    teacher.encode(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_from_pretrained_round_trip_and_missing_folder(tmp_path, teacher, originals):
    teacher.pipeline.save_pretrained(tmp_path / "ip2p")
    loaded = InstructPix2PixTeacher.from_pretrained(tmp_path / "ip2p")
    for key, value in teacher.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value)
    assert loaded.pipeline.safety_checker is None
    context = loaded.prepare(Edit("x"), originals, SETTINGS)
    assert context.text_embeddings.shape == (3, 77, 32)
    with pytest.raises(MissingWeightsError, match="does-not-exist"):
        InstructPix2PixTeacher.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(MissingWeightsError, match="InstructPix2Pix"):
        InstructPix2PixTeacher.from_pretrained(tmp_path)  # a folder that is not a pipeline
