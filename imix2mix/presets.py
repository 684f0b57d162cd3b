"""Model presets: where weights come from, and the architectures of randomly initialised models.

* ``full``: the official weights (:class:`WeightSources`, each a hub id or a local path), or, with
  ``random_weights=True``, the same full-size architectures with random init and no files (for GPU
  benchmarks).
* ``tiny``: the very same classes with small configs and image sizes, random weights, and a short
  default schedule.  It exercises the whole pipeline on a CPU in seconds; its edits are noise, not edits.

:func:`save_editor_weights` writes an editor's models in the official folder layouts, so
``build_editor("full", weights=WeightSources.local(folder))`` tests the real loading code offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------
# Random-init architectures (same classes for full size and tiny)
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte ↔ printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_level_clip_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer with no files: start/end tokens plus the 256 byte characters (with and
    without the end-of-word suffix), no merges.  514 ids; random-weight text encoders only."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for char in _bytes_to_unicode().values():
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


@dataclass(frozen=True)
class TeacherArchitecture:
    """diffusers configs of the InstructPix2Pix networks (SD-1.5 with an 8-channel UNet input)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(
        default_factory=lambda: dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    )

    @classmethod
    def sd15(cls) -> "TeacherArchitecture":
        return cls(
            unet=dict(
                sample_size=64, in_channels=8, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
            ),
            vae=dict(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
            ),
            text_encoder=dict(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ),
        )

    @classmethod
    def tiny(cls) -> "TeacherArchitecture":
        """96² images ↔ 12² latents (the VAE keeps its ×8 factor), two UNet levels."""
        return cls(
            unet=dict(
                sample_size=12, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
            ),
            vae=dict(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, norm_num_groups=8, sample_size=96, scaling_factor=0.18215,
            ),
            text_encoder=dict(
                vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ),
        )


def build_random_teacher_pipeline(arch: TeacherArchitecture, seed: int = 0):
    """An InstructPix2Pix pipeline with random weights and no files (tokenizer built in memory)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    return StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=byte_level_clip_tokenizer(), unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**arch.scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass(frozen=True)
class MetricsClipArchitecture:
    """transformers ``CLIPConfig`` pieces of the metrics CLIP (OpenAI ViT-L/14)."""

    text: dict[str, Any]
    vision: dict[str, Any]
    projection_dim: int

    @classmethod
    def vit_l14(cls) -> "MetricsClipArchitecture":
        return cls(
            text=dict(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ),
            vision=dict(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                patch_size=14, hidden_act="quick_gelu", projection_dim=768,
            ),
            projection_dim=768,
        )

    @classmethod
    def tiny(cls) -> "MetricsClipArchitecture":
        return cls(
            text=dict(
                vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ),
            vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
            projection_dim=32,
        )


def build_random_metrics_clip(arch: MetricsClipArchitecture, seed: int = 0, device: torch.device | str = "cpu"):
    """A :class:`~imix2mix.metrics.ClipMetricsModel` with random weights and the in-memory tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from imix2mix.metrics import ClipMetricsModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=arch.text, vision_config=arch.vision, projection_dim=arch.projection_dim))
    return ClipMetricsModel(model, byte_level_clip_tokenizer(), device=device)
