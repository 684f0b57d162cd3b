"""Loading SEVA, its VAE and CLIP-H from local files (weights made here), and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imix2mix.errors import MissingWeightsError
from imix2mix.seva import ClipImageConditioner, Seva, SevaAutoencoder, SevaConfig, load_seva, save_seva
from imix2mix.seva.conditioner import antialiased_bicubic_resize, open_clip_to_transformers
from imix2mix.seva.loading import SEVA_V10_FILENAME


@pytest.fixture(scope="module")
def tiny_seva() -> Seva:
    torch.manual_seed(0)
    return Seva(SevaConfig.tiny())


@pytest.fixture(scope="module")
def saved_dir(tiny_seva: Seva, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seva")
    save_seva(tiny_seva, folder)
    return folder


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_load_by_folder_and_by_file(tiny_seva: Seva, saved_dir: Path) -> None:
    by_folder = load_seva(saved_dir)
    assert by_folder.config == tiny_seva.config
    assert_same_weights(by_folder, tiny_seva)
    by_file = load_seva(saved_dir / "modelv1.1.safetensors", config=SevaConfig.tiny())
    assert_same_weights(by_file, tiny_seva)
    assert not any(p.is_meta for p in by_file.parameters())
    assert all(p.requires_grad for p in by_file.parameters())


def test_v10_filename_and_dtype(tiny_seva: Seva, tmp_path: Path) -> None:
    save_seva(tiny_seva, tmp_path / SEVA_V10_FILENAME)
    network = load_seva(tmp_path, filename=SEVA_V10_FILENAME, dtype=torch.bfloat16)
    assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    with pytest.raises(MissingWeightsError, match="modelv1.1.safetensors"):
        load_seva(tmp_path)  # v1.1 is the default name and is not in this folder


def test_missing_and_extra_keys_are_named(tiny_seva: Seva, tmp_path: Path) -> None:
    tensors = {k: v.clone() for k, v in tiny_seva.state_dict().items()}
    del tensors["out.2.bias"]
    tensors["model.diffusion_model.extra"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(MissingWeightsError) as error:
        load_seva(path, config=SevaConfig.tiny())
    message = str(error.value)
    assert "out.2.bias" in message and "model.diffusion_model.extra" in message and str(path) in message


def test_wrong_config_is_a_shape_error(saved_dir: Path) -> None:
    with pytest.raises(MissingWeightsError, match="wrong shape"):
        load_seva(saved_dir, config=SevaConfig.tiny(model_channels=64))


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"not loaded")
    with pytest.raises(MissingWeightsError, match="pickle"):
        load_seva(path)


def test_missing_file_and_offline_repo(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_seva(tmp_path)
    with pytest.raises(MissingWeightsError, match="neither"):
        load_seva(tmp_path / "nowhere" / "x.safetensors")
    with pytest.raises(MissingWeightsError, match="stabilityai/stable-virtual-camera"):
        load_seva("stabilityai/stable-virtual-camera")  # tests run with HF_HUB_OFFLINE=1


# --- VAE ---------------------------------------------------------------------------------------


def test_vae_encode_decode_scaling_and_round_trip(tmp_path: Path) -> None:
    autoencoder = SevaAutoencoder.tiny()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = autoencoder.encode(images)
    assert latents.shape == (2, 4, 8, 8) and autoencoder.downsample == 8
    expected = autoencoder.vae.encode(images).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, expected)
    torch.testing.assert_close(autoencoder.decode(latents), autoencoder.vae.decode(latents / 0.18215).sample)

    autoencoder.vae.save_pretrained(tmp_path / "sd21" / "vae")
    for source in (tmp_path / "sd21", tmp_path / "sd21" / "vae"):
        loaded = SevaAutoencoder.from_pretrained(source)
        assert_same_weights(loaded.vae, autoencoder.vae)
    chunked = SevaAutoencoder.from_pretrained(tmp_path / "sd21", chunk_size=1)
    torch.testing.assert_close(chunked.encode(images), latents, rtol=1e-5, atol=1e-5)


def test_vae_is_frozen_but_decode_passes_gradients() -> None:
    autoencoder = SevaAutoencoder.tiny()
    assert not any(p.requires_grad for p in autoencoder.parameters())
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    autoencoder.decode(latents).sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_vae_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="config.json"):
        SevaAutoencoder.from_pretrained(tmp_path)
    with pytest.raises(MissingWeightsError, match="stable-diffusion-2-1-base"):
        SevaAutoencoder.from_pretrained("stabilityai/stable-diffusion-2-1-base")


# --- CLIP-H ------------------------------------------------------------------------------------


def test_clip_preprocessing_blurs_then_resizes_bicubic() -> None:
    images = torch.rand(1, 3, 576, 576) * 2 - 1
    resized = antialiased_bicubic_resize(images, 224)
    assert resized.shape == (1, 3, 224, 224)
    # A constant image stays constant (normalised blur, interpolation of a constant).
    constant = antialiased_bicubic_resize(torch.full((1, 3, 576, 576), 0.25), 224)
    torch.testing.assert_close(constant, torch.full_like(constant, 0.25))
    # Upscaling skips the blur: plain bicubic with align_corners=True.
    small = torch.rand(1, 3, 100, 100)
    torch.testing.assert_close(
        antialiased_bicubic_resize(small, 224),
        torch.nn.functional.interpolate(small, size=(224, 224), mode="bicubic", align_corners=True),
    )


@pytest.mark.parametrize("shape", [(576, 576), (576, 1024), (320, 512)])
def test_clip_resize_matches_kornia(shape: tuple[int, int]) -> None:
    """The official preprocessing is kornia's antialiased bicubic resize with align_corners=True."""
    from kornia.geometry.transform import resize

    images = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = resize(images, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
    torch.testing.assert_close(antialiased_bicubic_resize(images, 224), expected, rtol=0, atol=1e-6)


def test_clip_embedding_is_projected_and_averaged() -> None:
    clip = ClipImageConditioner.tiny()
    images = torch.rand(3, 3, 96, 96) * 2 - 1
    each = clip.embed_each(images)
    assert each.shape == (3, clip.embedding_dim)
    torch.testing.assert_close(clip(images), each.mean(dim=0, keepdim=True))
    pixels = clip.preprocess(images)
    outputs = clip.model(pixel_values=pixels)
    torch.testing.assert_close(each, outputs.image_embeds)  # projection applied, not normalised
    assert not torch.allclose(each.norm(dim=-1), torch.ones(3))


def test_clip_loads_from_transformers_folder_and_open_clip_file(tmp_path: Path) -> None:
    clip = ClipImageConditioner.tiny()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    reference = clip.embed_each(images)

    clip.model.save_pretrained(tmp_path / "hf")
    from_folder = ClipImageConditioner.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(from_folder.embed_each(images), reference)

    # open_clip layout of the same weights: fused q/k/v, proj stored as [width, embed].
    config = clip.model.config
    hf = clip.model.state_dict()
    open_clip = {
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].t().contiguous(),
        "text.unused": torch.zeros(1),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for old, new in [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            for kind in ("weight", "bias"):
                open_clip[f"{dst}{new}.{kind}"] = hf[f"{src}{old}.{kind}"]
        for kind in ("weight", "bias"):
            open_clip[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
    path = tmp_path / "open_clip_model.safetensors"
    save_file(open_clip, str(path))
    converted = open_clip_to_transformers(open_clip, config.num_hidden_layers)
    assert set(converted) == set(hf) - {"vision_model.embeddings.position_ids"}
    from_open_clip = ClipImageConditioner.from_open_clip(path, config)
    torch.testing.assert_close(from_open_clip.embed_each(images), reference)


def test_clip_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="neither config.json"):
        ClipImageConditioner.from_pretrained(tmp_path)
    with pytest.raises(MissingWeightsError, match="laion/CLIP-ViT-H-14"):
        ClipImageConditioner.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    bad = tmp_path / "bad.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(MissingWeightsError, match="not an open_clip"):
        ClipImageConditioner.from_open_clip(bad)
