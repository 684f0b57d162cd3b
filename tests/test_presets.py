"""Presets: weight sources, full-size architectures (on the meta device), tiny editors, and the
real loading code exercised through saved tiny weights."""

from __future__ import annotations

import pytest
import torch

from imix2mix.config import EditConfig
from imix2mix.errors import ConfigError, MissingWeightsError
from imix2mix.schedules import StudentSchedule
from imix2mix.presets import (
    MetricsClipArchitecture,
    TeacherArchitecture,
    WeightSources,
    build_editor,
    byte_level_clip_tokenizer,
    default_config,
    save_editor_weights,
)


def test_weight_sources_name_the_official_models():
    sources = WeightSources()
    assert sources.seva == "stabilityai/stable-virtual-camera" and sources.seva_filename == "modelv1.1.safetensors"
    assert (sources.seva_vae, sources.seva_vae_subfolder) == ("stabilityai/stable-diffusion-2-1-base", "vae")
    assert sources.clip_h == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert sources.teacher == "timbrooks/instruct-pix2pix"
    assert sources.clip_metrics == "openai/clip-vit-large-patch14"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_random_architectures_have_the_published_sizes():
    """Parameter counts of the public checkpoints: SD-1.5 UNet 859,520,964 (+ 4·320·9 for IP2P's
    four extra input channels), SD VAE 83,653,863, CLIP ViT-L/14 text 123,060,480, CLIPModel 427,616,513."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    teacher, clip = TeacherArchitecture.sd15(), MetricsClipArchitecture.vit_l14()
    with torch.device("meta"):
        assert _count(UNet2DConditionModel(**teacher.unet)) == 859_520_964 + 4 * 320 * 9
        assert _count(AutoencoderKL(**teacher.vae)) == 83_653_863
        assert _count(CLIPTextModel(CLIPTextConfig(**teacher.text_encoder))) == 123_060_480
        model = CLIPModel(CLIPConfig(text_config=clip.text, vision_config=clip.vision, projection_dim=clip.projection_dim))
        assert _count(model) == 427_616_513


def test_byte_level_tokenizer_round_trips_text():
    tokenizer = byte_level_clip_tokenizer()
    ids = tokenizer("Turn him into a knight!").input_ids
    assert ids[0] == 0 and ids[-1] == 1 and max(ids) < 514
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "turnhimintoaknight!"


def test_default_configs():
    assert default_config("full") == EditConfig()
    tiny = default_config("tiny")
    assert (tiny.method.student_image_size, tiny.teacher.image_size) == (128, 96)
    assert len(StudentSchedule.from_method(tiny.method).taus) == 6 and tiny.total_iterations == 4 + 5 * 2
    assert tiny.teacher.steps == 4
    with pytest.raises(ConfigError, match="unknown preset"):
        default_config("huge")


@pytest.fixture(scope="module")
def tiny_editor():
    return build_editor("tiny", device="cpu")


def test_tiny_editor_uses_the_same_classes_as_full(tiny_editor):
    from imix2mix.seva import Seva
    from imix2mix.teachers.ip2p import InstructPix2PixTeacher

    assert isinstance(tiny_editor.student.network, Seva) and isinstance(tiny_editor.teacher, InstructPix2PixTeacher)
    assert tiny_editor.random_weights and tiny_editor.preset == "tiny"
    assert tiny_editor.default_config == default_config("tiny")
    assert tiny_editor.clip_metrics is not None


def test_reset_restores_bit_identical_weights(tiny_editor):
    network = tiny_editor.student.network
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p))
    network.requires_grad_(False)
    tensors_before_reset = [v.data_ptr() for v in network.state_dict().values()]
    tiny_editor.student.reset()
    after = network.state_dict()
    assert all(p.requires_grad for p in network.parameters())  # full fine-tuning: the student owns its trainable set
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [v.data_ptr() for v in after.values()] == tensors_before_reset  # copied in place


def test_saved_tiny_weights_load_through_the_full_loading_code(tmp_path, tiny_editor):
    sources = save_editor_weights(tiny_editor, tmp_path / "weights")
    loaded = build_editor("full", device="cpu", weights=sources)
    assert not loaded.random_weights and loaded.default_config == EditConfig()
    for name, value in tiny_editor.student.network.state_dict().items():
        assert torch.equal(loaded.student.network.state_dict()[name], value), name
    for name, value in tiny_editor.teacher.unet.state_dict().items():
        assert torch.equal(loaded.teacher.unet.state_dict()[name], value), name
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded.seva_vae.encode(images), tiny_editor.seva_vae.encode(images))
    torch.testing.assert_close(loaded.clip_image(images), tiny_editor.clip_image(images))
    torch.testing.assert_close(loaded.clip_metrics.embed_texts(["a knight"]), tiny_editor.clip_metrics.embed_texts(["a knight"]))


def test_missing_local_weights_name_the_path(tmp_path):
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "nothing")):
        build_editor("full", device="cpu", weights=WeightSources.local(tmp_path / "nothing"))
