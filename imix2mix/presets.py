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

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from imix2mix.config import PRESETS, EditConfig, TeacherConfig, WeightSources, default_config  # noqa: F401  (re-exported)
from imix2mix.editor import Editor
from imix2mix.errors import ConfigError
from imix2mix.metrics import ClipMetricsModel
from imix2mix.seva import Seva, SevaConfig
from imix2mix.seva.autoencoder import SevaAutoencoder
from imix2mix.seva.conditioner import ClipImageConditioner, vit_h14_config
from imix2mix.seva.loading import load_seva, save_seva
from imix2mix.students import SevaStudent
from imix2mix.teachers import teacher_class
from imix2mix.teachers.base import Teacher
from imix2mix.teachers.control_images import CannyControl, build_random_depth_control
from imix2mix.teachers.controlnet import (
    ControlNetArchitecture,
    ControlNetTeacher,
    ControlNetTeacherConfig,
    build_random_controlnet_pipeline,
)
from imix2mix.teachers.ip2p import InstructPix2PixTeacher

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


@contextlib.contextmanager
def random_init(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Build modules with seeded random weights directly on ``device`` (full-size models initialise in
    seconds on a GPU), leaving the global generators as they were."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        yield


def build_random_teacher_pipeline(arch: TeacherArchitecture, seed: int = 0, device: torch.device | str = "cpu"):
    """An InstructPix2Pix pipeline with random weights and no files (tokenizer built in memory)."""
    with random_init(seed, device):
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
    with random_init(seed, device):
        model = CLIPModel(CLIPConfig(text_config=arch.text, vision_config=arch.vision, projection_dim=arch.projection_dim))
    return ClipMetricsModel(model, byte_level_clip_tokenizer(), device=device)


# ---------------------------------------------------------------------------------------------
# Weight sources and editors
# ---------------------------------------------------------------------------------------------


def build_editor(
    preset: str = "tiny",
    device: torch.device | str = "cpu",
    weights: WeightSources | None = None,
    random_weights: bool = False,
    metrics: bool = True,
    seed: int = 0,
) -> Editor:
    """Build an :class:`~imix2mix.editor.Editor` with every model loaded once.

    * ``full``: official weights from ``weights`` (default :class:`WeightSources`); with
      ``random_weights=True`` the full-size architectures with random init and no files.
    * ``tiny``: small random models of the same classes (exercises the pipeline; edits are noise).
    ``metrics=False`` skips the CLIP ViT-L/14 used by :meth:`Editor.score`.
    """
    config = default_config(preset)
    device = torch.device(device)
    random = preset == "tiny" or random_weights
    weights = weights or WeightSources()
    if random:
        tiny = preset == "tiny"
        with random_init(seed, device):  # (the tiny builders also seed torch's global generator)
            if tiny:
                student, seva_vae, clip_image = Seva(SevaConfig.tiny()), SevaAutoencoder.tiny(seed), ClipImageConditioner.tiny(seed)
            else:
                student = Seva(SevaConfig())
                # SEVA's SD-2.1-base VAE has the SD-1.5 VAE architecture (config sample_size 768)
                seva_vae = SevaAutoencoder(AutoencoderKL(**{**TeacherArchitecture.sd15().vae, "sample_size": 768}))
                clip_image = ClipImageConditioner(CLIPVisionModelWithProjection(vit_h14_config()))
        clip_metrics = (
            build_random_metrics_clip(MetricsClipArchitecture.tiny() if tiny else MetricsClipArchitecture.vit_l14(), seed, device)
            if metrics else None
        )
    else:
        student = load_seva(weights.seva, filename=weights.seva_filename, dtype=torch.float32, device=device)
        seva_vae = SevaAutoencoder.from_pretrained(weights.seva_vae, subfolder=weights.seva_vae_subfolder, device=device)
        clip_image = ClipImageConditioner.from_pretrained(weights.clip_h, device=device)
        clip_metrics = ClipMetricsModel.from_pretrained(weights.clip_metrics, device=device) if metrics else None
    teacher_loader = TeacherLoader(preset=preset, random_weights=random, weights=weights, device=device, seed=seed)
    return Editor(
        teacher=teacher_loader(config.teacher), student=SevaStudent(student, device), seva_vae=seva_vae.to(device),
        clip_image=clip_image.to(device), clip_metrics=clip_metrics, device=device, default_config=config, preset=preset,
        random_weights=random, teacher_loader=teacher_loader,
    )


@dataclass(frozen=True)
class TeacherLoader:
    """Builds the teacher a run's :class:`~imix2mix.config.TeacherConfig` names, as the preset says:
    random weights of the preset's architecture, or the weights of ``model_id`` (a hub id or a local
    folder; default: the preset's :class:`WeightSources`).  For the ControlNet teachers ``model_id`` is
    the ControlNet; SD-1.5 and the depth estimator come from :class:`WeightSources`."""

    preset: str
    random_weights: bool
    weights: WeightSources
    device: torch.device
    seed: int = 0

    def __call__(self, settings: TeacherConfig) -> Teacher:
        cls = teacher_class(settings.name)
        if cls is InstructPix2PixTeacher:
            if self.random_weights:
                arch = TeacherArchitecture.tiny() if self.preset == "tiny" else TeacherArchitecture.sd15()
                return InstructPix2PixTeacher(build_random_teacher_pipeline(arch, self.seed, self.device), device=self.device)
            return InstructPix2PixTeacher.from_pretrained(settings.model_id or self.weights.teacher, device=self.device)
        if issubclass(cls, ControlNetTeacher):
            return self._controlnet_teacher(cls, settings)
        raise ConfigError(f"no preset builds teacher '{settings.name}'")  # pragma: no cover - every registered teacher is handled


    def _controlnet_teacher(self, cls: type[ControlNetTeacher], settings: TeacherConfig) -> ControlNetTeacher:
        if self.random_weights:
            tiny = self.preset == "tiny"
            arch = ControlNetArchitecture.from_teacher_architecture(TeacherArchitecture.tiny() if tiny else TeacherArchitecture.sd15())
            if tiny:
                arch = dataclasses.replace(arch, conditioning_channels=(8, 8, 16, 16))
            control = CannyControl() if cls.control == "canny" else build_random_depth_control(tiny, self.seed, self.device)
            return cls(build_random_controlnet_pipeline(arch, self.seed, self.device), control, device=self.device)
        source = settings.model_id or getattr(self.weights, f"controlnet_{cls.control}")
        config = ControlNetTeacherConfig(
            control=cls.control, base_model=self.weights.sd15, controlnet_model=source, depth_model=self.weights.depth_estimator,
        )
        return ControlNetTeacher.from_pretrained(config, device=self.device)


def save_editor_weights(editor: Editor, folder: str | Path) -> WeightSources:
    """Write an editor's models in the official formats under ``folder`` (the
    :meth:`WeightSources.local` layout) and return the sources that load them back."""
    folder = Path(folder)
    save_seva(editor.student.network, folder / "seva")  # keeps the SevaConfig in the metadata (tiny widths)
    editor.seva_vae.vae.save_pretrained(folder / "seva_vae")
    editor.clip_image.model.save_pretrained(folder / "clip_h")
    editor.teacher.pipeline.save_pretrained(folder / "teacher")
    if editor.clip_metrics is not None:
        editor.clip_metrics.model.save_pretrained(folder / "clip_metrics")
        editor.clip_metrics.tokenizer.save_pretrained(folder / "clip_metrics")
    return WeightSources.local(folder)
