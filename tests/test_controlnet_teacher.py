"""ControlNet teacher on a tiny random SD-1.5 + ControlNet: text CFG, control images, loading."""

from __future__ import annotations

import pytest
import torch

from imix2mix.config import TeacherConfig
from imix2mix.edits import Edit
from imix2mix.errors import ConfigError, MissingWeightsError
from imix2mix.presets import TeacherArchitecture
from imix2mix.teachers.control_images import CannyControl
from imix2mix.teachers.controlnet import (
    ControlNetArchitecture,
    ControlNetTeacher,
    ControlNetTeacherConfig,
    build_random_controlnet_pipeline,
)

VIEWS = 3
CAPTION = "a photo of a face in the snow"
EDIT = Edit("make it snowy", target_caption=CAPTION)
SETTINGS = TeacherConfig(name="controlnet_canny", image_size=96, steps=3)


def tiny_architecture() -> ControlNetArchitecture:
    return ControlNetArchitecture.from_teacher_architecture(TeacherArchitecture.tiny(), conditioning_channels=(8, 8, 16, 16))


@pytest.fixture(scope="module")
def teacher() -> ControlNetTeacher:
    return ControlNetTeacher(build_random_controlnet_pipeline(tiny_architecture(), seed=0), CannyControl())


@pytest.fixture(scope="module")
def originals() -> torch.Tensor:
    views = torch.full((VIEWS, 3, 40, 40), -0.5)
    for i in range(VIEWS):  # a bright square at a different place in each view: different edges
        views[i, :, 5 + 5 * i: 20 + 5 * i, 8:30] = 0.7
    return views


def test_sizes_and_schedule(teacher):
    assert teacher.latent_size == 12 and teacher.image_size == 96 and teacher.vae_scale_factor == 8
    assert teacher.unet.config.in_channels == 4
    assert teacher.alphas_cumprod[950].item() == pytest.approx(0.0082, abs=2e-4)  # SD's scaled-linear betas


def test_prepare_computes_caption_embeddings_and_one_control_image_per_view(teacher, originals):
    context = teacher.prepare(EDIT, originals, SETTINGS)
    assert context.num_views == VIEWS
    assert context.text_embeddings.shape == (2, 77, 32)
    assert not torch.allclose(context.text_embeddings[0], context.text_embeddings[1])
    assert context.control_images.shape == (VIEWS, 3, 96, 96)
    resized = torch.nn.functional.interpolate(originals, size=(96, 96), mode="bilinear", antialias=True)
    torch.testing.assert_close(context.control_images, CannyControl()(resized))
    assert not torch.equal(context.control_images[0], context.control_images[1])


@pytest.mark.parametrize("caption", [None, "", "   "])
def test_a_missing_caption_is_a_clear_error(teacher, originals, caption):
    with pytest.raises(ConfigError, match="target caption is required"):
        teacher.prepare(Edit("make it snowy", target_caption=caption), originals, SETTINGS)
    with pytest.raises(ConfigError, match="target caption is required"):
        teacher.edit_image(originals[0], Edit("make it snowy", target_caption=caption), SETTINGS, torch.Generator().manual_seed(0))


def test_text_cfg_matches_two_separate_controlnet_and_unet_calls(teacher, originals):
    context = teacher.prepare(EDIT, originals, SETTINGS)
    z_t = torch.randn(VIEWS, 4, 12, 12, generator=torch.Generator().manual_seed(4))
    t, scale = 600, context.guidance_scale
    assert scale == SETTINGS.text_cfg == 7.5
    teacher.set_cross_view_attention("none")
    guided = teacher.predict_noise(z_t, t, context)
    assert guided.shape == (VIEWS, 4, 12, 12) and guided.dtype == torch.float32 and torch.isfinite(guided).all()
    assert not guided.is_inference()

    def branch(text: torch.Tensor) -> torch.Tensor:
        text = text[None].expand(VIEWS, -1, -1)
        with torch.no_grad():
            down, mid = teacher.controlnet(z_t, t, encoder_hidden_states=text, controlnet_cond=context.control_images, return_dict=False)
            return teacher.unet(z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    eps_text, eps_uncond = branch(context.text_embeddings[0]), branch(context.text_embeddings[1])
    torch.testing.assert_close(guided, eps_uncond + scale * (eps_text - eps_uncond), rtol=1e-4, atol=1e-4)
    # the control images matter: a blank control changes the prediction
    blank = context.__class__(context.text_embeddings, torch.zeros_like(context.control_images), CAPTION, scale)
    assert not torch.allclose(teacher.predict_noise(z_t, t, blank), guided, atol=1e-4)


def test_cross_view_attention_in_unet_and_controlnet_with_two_cfg_groups(teacher, originals):
    context = teacher.prepare(EDIT, originals, SETTINGS)
    z_t = torch.randn(VIEWS, 4, 12, 12, generator=torch.Generator().manual_seed(5))
    teacher.set_cross_view_attention("none")
    plain = teacher.predict_noise(z_t, 700, context)
    try:
        for mode in ("rcv", "extended"):
            teacher.set_cross_view_attention(mode)
            mixed = teacher.predict_noise(z_t, 700, context, key_view=1)
            assert not torch.allclose(mixed, plain, atol=1e-4), mode
            assert teacher.key_view_state.key_view == teacher.controlnet_key_view_state.key_view == 1
        # identical views: RCVAttn is plain self-attention (the 2 groups are split correctly)
        same = context.__class__(context.text_embeddings, context.control_images[:1].expand(VIEWS, -1, -1, -1), CAPTION)
        z_same = z_t[:1].expand(VIEWS, -1, -1, -1)
        teacher.set_cross_view_attention("rcv")
        rcv_same = teacher.predict_noise(z_same, 700, same, key_view=2)
        teacher.set_cross_view_attention("none")
        torch.testing.assert_close(rcv_same, teacher.predict_noise(z_same, 700, same), rtol=1e-4, atol=1e-4)
    finally:
        teacher.set_cross_view_attention("none")


def test_reference_edit_is_the_pipelines_sample_and_seeded(teacher, originals):
    teacher.set_cross_view_attention("rcv")
    try:
        a = teacher.edit_image(originals[0], EDIT, SETTINGS, torch.Generator().manual_seed(1))
        b = teacher.edit_image(originals[0], EDIT, SETTINGS, torch.Generator().manual_seed(1))
        c = teacher.edit_image(originals[1], EDIT, SETTINGS, torch.Generator().manual_seed(1))
        assert teacher.attention_mode == "rcv"
    finally:
        teacher.set_cross_view_attention("none")
    assert a.shape == (3, 96, 96) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # another view: another control image
    control = teacher.control_images_for(originals[:1], 96)
    with torch.inference_mode():
        direct = teacher.pipeline(
            CAPTION, image=control, height=96, width=96, num_inference_steps=3, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(1), output_type="pt",
        ).images[0]
    torch.testing.assert_close(a, direct * 2 - 1)


def test_decode_and_encode_shapes(teacher):
    images = teacher.decode(torch.randn(2, 4, 12, 12))
    assert images.shape == (2, 3, 96, 96) and images.abs().max() <= 1
    assert teacher.encode(images).shape == (2, 4, 12, 12)


def test_from_pretrained_round_trip_and_clear_errors(tmp_path, teacher, originals):
    config = teacher.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "controlnet_canny" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ControlNetTeacher.from_pretrained(config)
    for model, reference in ((loaded.unet, teacher.unet), (loaded.controlnet, teacher.controlnet)):
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value)
    z_t = torch.randn(VIEWS, 4, 12, 12)
    torch.testing.assert_close(
        loaded.predict_noise(z_t, 500, loaded.prepare(EDIT, originals, SETTINGS)), teacher.predict_noise(z_t, 500, teacher.prepare(EDIT, originals, SETTINGS))
    )
    with pytest.raises(MissingWeightsError, match="no-controlnet-here"):
        ControlNetTeacher.from_pretrained(ControlNetTeacherConfig(base_model=config.base_model, controlnet_model=str(tmp_path / "no-controlnet-here")))
    with pytest.raises(MissingWeightsError, match="ControlNet \\(canny\\).*saved"):
        ControlNetTeacher.from_pretrained(ControlNetTeacherConfig(base_model=config.base_model, controlnet_model=str(tmp_path / "saved")))
    with pytest.raises(MissingWeightsError, match="Stable Diffusion 1.5.*controlnet"):
        ControlNetTeacher.from_pretrained(ControlNetTeacherConfig(base_model=config.controlnet_model, controlnet_model=config.controlnet_model))
    teacher.controlnet.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(MissingWeightsError, match="pickled.*safetensors"):
        ControlNetTeacher.from_pretrained(ControlNetTeacherConfig(base_model=config.base_model, controlnet_model=str(tmp_path / "pickled")))


def test_unknown_control_is_a_config_error():
    with pytest.raises(ConfigError, match="normal"):
        ControlNetTeacherConfig(control="normal")
    assert ControlNetTeacherConfig(control="depth").controlnet_source == "lllyasviel/sd-controlnet-depth"
