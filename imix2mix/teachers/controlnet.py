"""ControlNet teachers (METHOD.md §7 "Beyond editing", §8.1 ``src/teachers.py``): Stable Diffusion 1.5
with ``lllyasviel/sd-controlnet-canny`` or ``lllyasviel/sd-controlnet-depth``, registered as
``controlnet_canny`` and ``controlnet_depth``.

The text is the **target caption** (what the scene should look like), not an instruction; guidance is
text CFG only (two branches: caption, unconditional), ε̃ = ε_u + s·(ε_text − ε_u), s = ``TeacherConfig.text_cfg``
(``image_cfg`` is unused).  Each view is conditioned on its own control image (Canny edges or depth of
its source view, computed once per scene in :meth:`ControlNetTeacher.prepare`).  It implements
:class:`imix2mix.teachers.base.Teacher`; :class:`ControlNetTeacherConfig` says where its weights are.

Cross-view attention (RCVAttn / extended) replaces the self-attention of the UNet and, unless
``cross_view_in_controlnet`` is off, of the ControlNet too (as diffusers' Text2Video-Zero ControlNet
recipe does for cross-frame attention), with one κ for both; the batch is 2 CFG groups × N views.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.models.activations import GEGLU as DiffusersGEGLU
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel

from imix2mix.attention import CrossViewAttention, KeyViewState, set_cross_view_attention
from imix2mix.config import TeacherConfig
from imix2mix.edits import Edit
from imix2mix.errors import ConfigError, MissingWeightsError
from imix2mix.hub import resolve_dir
from imix2mix.kernels.dispatch import TORCH, KernelSet, install_kernels
from imix2mix.seva.attention import GEGLU
from imix2mix.seva.layers import replace_modules, use_group_norm32
from imix2mix.teachers import register_teacher
from imix2mix.teachers.control_images import CONTROL_KINDS, DEPTH_MODEL, ControlImages, load_control_images
from imix2mix.teachers.ip2p import InstructPix2PixTeacher, _CapturedUnet, _output_in_input_layout, resize_images, unet_noise

BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONTROLNET_MODELS = {"canny": "lllyasviel/sd-controlnet-canny", "depth": "lllyasviel/sd-controlnet-depth"}
# What a snapshot of each needs: the diffusers components we load, safetensors weights only (the SD-1.5
# repo also holds multi-GB .ckpt/.bin/fp16/EMA files that would otherwise be downloaded).
BASE_MODEL_FILES = [
    "model_index.json", "scheduler/*.json", "tokenizer/*", "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
CONTROLNET_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


@dataclass(frozen=True)
class ControlNetTeacherConfig:
    """Which weights and which control image a ControlNet teacher uses (its guidance scale is the run's
    ``TeacherConfig.text_cfg``)."""

    control: str = "canny"  # "canny" | "depth"
    base_model: str = BASE_MODEL  # hub id or local diffusers SD-1.5 folder
    controlnet_model: str | None = None  # None: CONTROLNET_MODELS[control]
    depth_model: str = DEPTH_MODEL  # the depth estimator of the "depth" control
    conditioning_scale: float = 1.0  # diffusers' controlnet_conditioning_scale
    cross_view_in_controlnet: bool = True

    def __post_init__(self) -> None:
        if self.control not in CONTROL_KINDS:
            raise ConfigError(f"unknown ControlNet control '{self.control}'; choose one of {', '.join(CONTROL_KINDS)}")

    @property
    def controlnet_source(self) -> str:
        return self.controlnet_model or CONTROLNET_MODELS[self.control]


@dataclass(frozen=True)
class ControlNetContext:
    """Per-scene constants: ``text_embeddings`` [2, L, D] in the CFG order (caption, ""), and
    ``control_images`` [N, 3, S, S] in [0, 1], one per source view, in the teacher's dtype;
    ``guidance_scale``: the text CFG s."""

    text_embeddings: torch.Tensor
    control_images: torch.Tensor
    caption: str = ""
    guidance_scale: float = 7.5

    @property
    def num_views(self) -> int:
        return int(self.control_images.shape[0])


class ControlledUNet(torch.nn.Module):
    """ControlNet residuals added into the UNet: one callable with the UNet's signature, so a scene's
    fixed control images ride along like its text (and the pass can be compiled or graph-captured)."""

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel, conditioning_scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.conditioning_scale = unet, controlnet, conditioning_scale
        self.control: torch.Tensor | None = None  # [B, 3, S, S] in [0, 1], B = the UNet batch

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = False):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=self.control,
            conditioning_scale=self.conditioning_scale, return_dict=False,
        )
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=return_dict,
        )


def use_fast_modules(model: torch.nn.Module) -> None:
    """The teacher UNet's module swaps (same functions; fused kernels on CUDA): GroupNorm32, the
    sharing-projection GEGLU, and transformer outputs kept in the input layout (channels-last)."""
    use_group_norm32(model)
    replace_modules(model, DiffusersGEGLU, GEGLU.sharing_projection)
    for module in model.modules():
        if isinstance(module, Transformer2DModel):
            module._get_output_for_continuous_inputs = types.MethodType(_output_in_input_layout, module)


class ControlNetTeacher:
    """Frozen SD-1.5 + ControlNet: reference edits, text-CFG ε̃ for SDS, VAE encode/decode.

    On CUDA the networks run in fp16 under ``torch.inference_mode``; on CPU in fp32.  The registered
    teachers are the subclasses of one control kind each (:class:`ControlNetCannyTeacher`,
    :class:`ControlNetDepthTeacher`).
    """

    name = "controlnet"
    control = "canny"
    joint_edit_shared_noise = True  # T2VZ: diffusers' Text2Video-Zero ControlNet recipe draws one latent for all frames

    def __init__(
        self,
        pipeline: StableDiffusionControlNetPipeline,
        control_images: ControlImages,
        config: ControlNetTeacherConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ):
        self.config = config or ControlNetTeacherConfig(control=control_images.kind)
        self.name = f"controlnet_{self.config.control}"
        if control_images.kind != self.config.control:
            raise ConfigError(f"ControlNet teacher: control images '{control_images.kind}' but config control '{self.config.control}'")
        device = torch.device(device)
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        self.pipeline = pipeline.to(device) if pipeline.unet.dtype == self.dtype else pipeline.to(device=device, dtype=self.dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        for module in (self.unet, self.controlnet, self.vae, self.pipeline.text_encoder):
            module.requires_grad_(False).eval()
        self.control_images = control_images
        self.device = device
        self.alphas_cumprod = pipeline.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        # One κ for the UNet and the ControlNet; two states because each caches its own processors by layer name.
        self.key_view_state = KeyViewState()
        self.controlnet_key_view_state = KeyViewState()
        self.attention_mode: CrossViewAttention = "none"
        self._install_attention("none")
        for model in (self.unet, self.controlnet):
            use_fast_modules(model)
        self.controlled_unet = ControlledUNet(self.unet, self.controlnet, self.config.conditioning_scale)
        self.noise_model: torch.nn.Module = self.controlled_unet  # what predict_noise calls: eager or compiled
        self.graph_capture = False
        self._captured: _CapturedUnet | None = None
        self._captured_context: ControlNetContext | None = None
        self.memory_format = torch.contiguous_format
        self.kernels: KernelSet = TORCH

    # The same Stable Diffusion text encoder, noise schedule and VAE as the IP2P teacher: its methods.
    encode_prompts = InstructPix2PixTeacher.encode_prompts
    add_noise = InstructPix2PixTeacher.add_noise
    decode = InstructPix2PixTeacher.decode
    encode = InstructPix2PixTeacher.encode
    scaling_factor = InstructPix2PixTeacher.scaling_factor

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, config: ControlNetTeacherConfig | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> "ControlNetTeacher":
        """Load SD-1.5, the ControlNet and (depth) the depth estimator: hub ids or local folders,
        safetensors weights only, without the safety checker."""
        config = config or ControlNetTeacherConfig()
        device = torch.device(device)
        load_dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        base = resolve_dir(
            config.base_model, what="Stable Diffusion 1.5 (ControlNet teacher)",
            hint=f"It is public: `hf download {BASE_MODEL}`.", allow_patterns=BASE_MODEL_FILES,
        )
        control_folder = resolve_dir(
            config.controlnet_source, what=f"ControlNet ({config.control})",
            hint=f"It is public: `hf download {CONTROLNET_MODELS[config.control]}`.", allow_patterns=CONTROLNET_FILES,
        )
        try:
            controlnet = ControlNetModel.from_pretrained(control_folder, dtype=load_dtype, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(
                f"ControlNet ({config.control}): '{control_folder}' is not a diffusers ControlNet folder with safetensors weights ({exc})."
            ) from exc
        try:
            pipeline = StableDiffusionControlNetPipeline.from_pretrained(
                base, controlnet=controlnet, dtype=load_dtype, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False, use_safetensors=True,
            )
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(
                f"Stable Diffusion 1.5 (ControlNet teacher): '{base}' is not a usable diffusers pipeline folder with safetensors weights ({exc})."
            ) from exc
        control_images = load_control_images(config.control, depth_model=config.depth_model, device=device)
        return controlnet_teacher_class(config.control)(pipeline, control_images, config, device=device, dtype=load_dtype)

    def save_pretrained(self, folder: str | Path) -> ControlNetTeacherConfig:
        """Write SD-1.5 (``folder/sd15``) and the ControlNet (``folder/controlnet_<kind>``) as safetensors,
        the :meth:`imix2mix.config.WeightSources.local` layout; returns the config that loads them back
        (the depth estimator is not written)."""
        folder = Path(folder)
        self.pipeline.save_pretrained(folder / "sd15", safe_serialization=True)
        self.controlnet.save_pretrained(folder / self.weights_folder, safe_serialization=True)
        return ControlNetTeacherConfig(
            control=self.config.control, base_model=str(folder / "sd15"), controlnet_model=str(folder / self.weights_folder),
            depth_model=self.config.depth_model, conditioning_scale=self.config.conditioning_scale,
            cross_view_in_controlnet=self.config.cross_view_in_controlnet,
        )

    @property
    def weights_folder(self) -> str:
        """This ControlNet's folder in the :meth:`imix2mix.config.WeightSources.local` layout."""
        return f"controlnet_{self.config.control}"

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipeline.unet

    @property
    def controlnet(self) -> ControlNetModel:
        return self.pipeline.controlnet

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipeline.vae

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_scale_factor

    def to(self, device: torch.device | str) -> "ControlNetTeacher":
        self.device = torch.device(device)
        self.pipeline.to(self.device)
        self.alphas_cumprod = self.alphas_cumprod.to(self.device)
        self._captured = None
        return self

    def offload(self) -> None:
        """The text encoder is used once per scene (in :meth:`prepare`)."""
        self.pipeline.text_encoder.to("cpu")

    def onload(self) -> None:
        self.pipeline.text_encoder.to(self.device)

    def compile_noise_prediction(self, mode: str | None = "default") -> None:
        """``torch.compile`` the ControlNet + UNet pass of :meth:`predict_noise` (None: eager again)."""
        self.noise_model = self.controlled_unet if mode is None else torch.compile(self.controlled_unet, dynamic=False, mode=mode)
        self._captured = None

    def set_graph_capture(self, enabled: bool) -> None:
        """On CUDA, replay :meth:`predict_noise`'s pass as a graph captured once per scene and attention mode."""
        self.graph_capture = enabled
        self._captured = None

    def set_kernels(self, kernels: KernelSet) -> KernelSet:
        """The kernel set of the UNet's and the ControlNet's fused ops until set again; a captured graph
        is recaptured.  Returns the previous set."""
        previous = self.kernels
        if kernels != previous:
            for model in (self.unet, self.controlnet):
                install_kernels(model, kernels)
            self.kernels = kernels
            self._captured = None
        return previous

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        if memory_format != self.memory_format:
            self.unet.to(memory_format=memory_format)
            self.controlnet.to(memory_format=memory_format)
            self.memory_format = memory_format
            self._captured = None

    # -- attention ------------------------------------------------------------------------------
    def _install_attention(self, mode: CrossViewAttention) -> None:
        set_cross_view_attention(self.unet, mode, self.key_view_state)
        controlnet_mode = mode if self.config.cross_view_in_controlnet else "none"
        set_cross_view_attention(self.controlnet, controlnet_mode, self.controlnet_key_view_state)

    def select_key_view(self, num_views: int, key_view: int) -> None:
        """N and κ of the next forward, for the UNet's and the ControlNet's processors alike."""
        self.key_view_state.select(num_views, key_view, self.device)
        self.controlnet_key_view_state.select(num_views, key_view, self.device)

    def set_cross_view_attention(self, mode: CrossViewAttention) -> None:
        self._captured = None
        self._install_attention(mode)
        self.attention_mode = mode

    @contextlib.contextmanager
    def plain_attention(self) -> Iterator[None]:
        """Run with ordinary self-attention, restoring the current cross-view mode afterwards."""
        previous = self.attention_mode
        self._install_attention("none")
        try:
            yield
        finally:
            self._install_attention(previous)

    # -- per-scene context ----------------------------------------------------------------------
    @staticmethod
    def check_caption(caption: str | None) -> str:
        if not caption or not caption.strip():
            raise ConfigError(
                "ControlNet teacher: a target caption is required (a description of the edited scene, e.g."
                " 'a photo of a man with a beard'); the ControlNet teachers take no instruction."
            )
        return caption

    def control_images_for(self, views: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        """Control images [N, 3, S, S] in [0, 1] of views [N, 3, H, W] in [−1, 1] resized to S."""
        pixels = resize_images(views.float(), image_size or self.image_size)
        return self.control_images(pixels.cpu()).to(self.device, self.dtype)

    @torch.no_grad()
    def prepare(self, edit: Edit, originals: torch.Tensor, settings: TeacherConfig) -> ControlNetContext:
        """Text embeddings (the edit's target caption, "") and each view's control image at
        ``settings.image_size``, once per scene; the guidance scale is ``settings.text_cfg``."""
        caption = self.check_caption(edit.target_caption)
        self._captured = None
        return ControlNetContext(
            text_embeddings=self.encode_prompts([caption, ""]),
            control_images=self.control_images_for(originals, settings.image_size),
            caption=caption,
            guidance_scale=settings.text_cfg,
        )

    # -- full-pipeline edit and score distillation -----------------------------------------------
    def pipeline_inputs(self, views: torch.Tensor, edit: Edit, settings: TeacherConfig) -> dict[str, Any]:
        """The ControlNet pipeline's arguments for N views [N, 3, H, W] in [−1, 1] at ``settings.image_size``."""
        caption = self.check_caption(edit.target_caption)
        size = settings.image_size
        control = self.control_images_for(views, size)
        return dict(
            prompt=[caption] * len(views), image=control, height=size, width=size,
            guidance_scale=settings.text_cfg, controlnet_conditioning_scale=self.config.conditioning_scale,
        )

    def edit_image(self, image: torch.Tensor, edit: Edit, settings: TeacherConfig, generator: torch.Generator) -> torch.Tensor:
        """The ControlNet pipeline's own sample for one view [3, H, W] in [−1, 1], conditioned on that
        view's control image (``settings.steps`` steps); returns [3, S, S] in [−1, 1] (plain attention)."""
        inputs = self.pipeline_inputs(image[None], edit, settings)
        with self.plain_attention(), torch.inference_mode():
            edited = self.pipeline(**inputs, num_inference_steps=settings.steps, generator=generator, output_type="pt").images
        return (edited[0].float() * 2 - 1).clone()

    def predict_noise(self, noisy_latents: torch.Tensor, t: int, context: ControlNetContext, *, key_view: int = 0) -> torch.Tensor:
        """Text-CFG ε̃ for N views: ε_u + s(ε_text − ε_u); fp32, no graph.

        The batch is [z_t ×2] with text [caption, ""] and each view's control image in both groups:
        two CFG groups of N views, the layout the cross-view attention processors expect.
        """
        views = noisy_latents.shape[0]
        if views != context.num_views:
            raise ValueError(f"{views} noisy views for a context of {context.num_views} control images")
        self.select_key_view(views, key_view)
        with torch.inference_mode():
            latents = noisy_latents.detach().to(self.device, self.dtype)
            model_input = torch.cat([latents, latents])
            text = context.text_embeddings.repeat_interleave(views, dim=0)
            timestep = torch.full((2 * views,), t, device=self.device, dtype=torch.long)
            if self.controlled_unet.control is None or self._captured_context is not context:
                self.controlled_unet.control = torch.cat([context.control_images, context.control_images])
                self._captured, self._captured_context = None, context
            capture = self.graph_capture and self.device.type == "cuda"
            eps, self._captured = unet_noise(self.noise_model, model_input, timestep, text, self._captured, capture=capture)
            eps_text, eps_uncond = eps.chunk(2)
            guided = eps_uncond + context.guidance_scale * (eps_text - eps_uncond)
        return guided.clone()  # a normal tensor: it is saved for backward by the SDS surrogate


@register_teacher("controlnet_canny")
class ControlNetCannyTeacher(ControlNetTeacher):
    """SD-1.5 + ``lllyasviel/sd-controlnet-canny`` on OpenCV Canny edges of each source view."""

    control = "canny"
    name = "controlnet_canny"


@register_teacher("controlnet_depth")
class ControlNetDepthTeacher(ControlNetTeacher):
    """SD-1.5 + ``lllyasviel/sd-controlnet-depth`` on Depth-Anything-V2 depth of each source view."""

    control = "depth"
    name = "controlnet_depth"


def controlnet_teacher_class(control: str) -> type[ControlNetTeacher]:
    return {"canny": ControlNetCannyTeacher, "depth": ControlNetDepthTeacher}[control]


# ---------------------------------------------------------------------------------------------
# Random-weight pipelines of the same classes (tests, the tiny preset, GPU benchmarks)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlNetArchitecture:
    """diffusers configs of SD-1.5 + ControlNet; the ControlNet mirrors the UNet's encoder."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    conditioning_channels: tuple[int, ...] = (16, 32, 96, 256)  # the control-image encoder (×8 down)
    scheduler: dict[str, Any] = field(
        default_factory=lambda: dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
        )
    )

    @classmethod
    def from_teacher_architecture(cls, arch, conditioning_channels: tuple[int, ...] = (16, 32, 96, 256)) -> "ControlNetArchitecture":
        """From :class:`imix2mix.presets.TeacherArchitecture` (IP2P): the same networks with SD-1.5's
        4-channel UNet input."""
        return cls(unet={**arch.unet, "in_channels": 4}, vae=dict(arch.vae), text_encoder=dict(arch.text_encoder), conditioning_channels=conditioning_channels)


def build_random_controlnet_pipeline(arch: ControlNetArchitecture, seed: int = 0, device: torch.device | str = "cpu") -> StableDiffusionControlNetPipeline:
    """An SD-1.5 ControlNet pipeline with random weights and no files (tokenizer built in memory)."""
    from imix2mix.presets import byte_level_clip_tokenizer, random_init

    unet_keys = (
        "in_channels", "layers_per_block", "block_out_channels", "down_block_types", "cross_attention_dim",
        "attention_head_dim", "norm_num_groups",
    )
    with random_init(seed, device):
        unet = UNet2DConditionModel(**arch.unet)
        controlnet = ControlNetModel(
            **{key: arch.unet[key] for key in unet_keys if key in arch.unet},
            conditioning_embedding_out_channels=arch.conditioning_channels,
        )
        # A ControlNet starts from zero convolutions (training init): its residuals would all be 0 and
        # the control image would not matter.  Random weights instead, and variance-keeping (He) ones in
        # the 8-layer control-image encoder, whose default init shrinks the signal ~3× per layer.
        for convolution in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            convolution.reset_parameters()
        for convolution in controlnet.controlnet_cond_embedding.modules():
            if isinstance(convolution, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(convolution.weight, nonlinearity="relu")
        vae = AutoencoderKL(**arch.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    return StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=byte_level_clip_tokenizer(), unet=unet, controlnet=controlnet,
        scheduler=PNDMScheduler(**arch.scheduler), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
