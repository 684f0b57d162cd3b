"""CLIP-H image conditioner of SEVA (open_clip ViT-H-14, ``laion2b_s32b_b79k``) on transformers.

open_clip cannot be imported here (it needs torchvision); the Hub repo of the same weights ships a
transformers copy (config.json + model.safetensors), and open_clip's own safetensors is converted.
The embedding is ``image_embeds``: pooled class token after ``post_layernorm``, times the projection,
not L2-normalised (open_clip ``encode_image(normalize=False)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from imix2mix.errors import MissingWeightsError
from imix2mix.hub import describe_key_mismatch, load_safetensors, resolve_dir

CLIP_H_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPEN_CLIP_FILENAME = "open_clip_model.safetensors"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHAT = "CLIP-H image encoder"


def vit_h14_config() -> CLIPVisionConfig:
    """open_clip ``ViT-H-14`` vision tower: 32 layers, width 1280, 16 heads of 80, patch 14, embed 1024."""
    return CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
    )


def gaussian_kernel1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def antialiased_bicubic_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """kornia ``resize(..., "bicubic", align_corners=True, antialias=True)``: Gaussian pre-blur
    (σ = (factor−1)/2, reflect border) when downscaling, then bicubic interpolation."""
    height, width = images.shape[-2:]
    factors = (height / size, width / size)
    if max(factors) > 1:
        sigmas = [max((f - 1.0) / 2.0, 0.001) for f in factors]
        sizes = [int(max(4.0 * s, 3)) for s in sigmas]
        sizes = [k if k % 2 else k + 1 for k in sizes]
        channels = images.shape[1]
        ky = gaussian_kernel1d(sizes[0], sigmas[0], images.dtype, images.device)
        kx = gaussian_kernel1d(sizes[1], sigmas[1], images.dtype, images.device)
        pad_y, pad_x = sizes[0] // 2, sizes[1] // 2
        images = F.pad(images, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
        images = F.conv2d(images, kx.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        images = F.conv2d(images, ky.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=True)


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename open_clip ``visual.*`` weights to ``CLIPVisionModelWithProjection`` names (text tower dropped)."""
    out: dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": state_dict["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state_dict["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state_dict["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state_dict["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state_dict["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state_dict["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state_dict["visual.ln_post.bias"],
        "visual_projection.weight": state_dict["visual.proj"].t().contiguous(),  # open_clip: x @ proj
    }
    renames = {
        "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    }
    for i in range(num_layers):
        src, dst = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = state_dict[f"{src}{old}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = state_dict[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q.contiguous()
            out[f"{dst}self_attn.k_proj.{kind}"] = k.contiguous()
            out[f"{dst}self_attn.v_proj.{kind}"] = v.contiguous()
    return out


class ClipImageConditioner(nn.Module):
    """Frozen CLIP image encoder: images in [−1, 1] → the SEVA cross-attention context.

    ``forward`` returns the embedding averaged over the given (input) frames, [1, D];
    ``embed_each`` returns one embedding per image, [N, D].
    """

    def __init__(self, model: CLIPVisionModelWithProjection) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(model.config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @classmethod
    def tiny(cls, seed: int = 0, projection_dim: int = 32) -> ClipImageConditioner:
        """Same class with a small random vision tower (for tests and the ``tiny`` preset)."""
        config = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            patch_size=14, image_size=224, projection_dim=projection_dim, hidden_act="gelu",
        )
        torch.manual_seed(seed)
        return cls(CLIPVisionModelWithProjection(config))

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = CLIP_H_REPO,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ClipImageConditioner:
        """Load from a transformers folder (config.json + model.safetensors), the Hub repo, or an
        open_clip ``open_clip_model.safetensors`` file / folder holding one."""
        path = Path(str(source)).expanduser()
        if path.is_file():
            return cls.from_open_clip(path, dtype=dtype, device=device)
        folder = resolve_dir(
            source, what=WHAT, allow_patterns=["config.json", "model.safetensors"],
            hint=f"The SEVA context encoder is '{CLIP_H_REPO}'.",
        )
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            model = CLIPVisionModelWithProjection.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
            return cls(model).to(device)
        if (folder / OPEN_CLIP_FILENAME).is_file():
            return cls.from_open_clip(folder / OPEN_CLIP_FILENAME, dtype=dtype, device=device)
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
        raise MissingWeightsError(
            f"{WHAT}: '{folder}' holds neither config.json + model.safetensors (transformers) nor"
            f" {OPEN_CLIP_FILENAME} (open_clip); it holds: {present}."
        )

    @classmethod
    def from_open_clip(
        cls,
        path: str | Path,
        config: CLIPVisionConfig | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ClipImageConditioner:
        """Load open_clip's own safetensors (``visual.*`` keys) into the transformers module;
        ``config`` defaults to ViT-H-14."""
        path = Path(path)
        state_dict = load_safetensors(path, what=WHAT)
        config = config or vit_h14_config()
        try:
            converted = open_clip_to_transformers(state_dict, config.num_hidden_layers)
        except KeyError as exc:
            raise MissingWeightsError(f"{WHAT}: '{path}' is not an open_clip ViT checkpoint (no key {exc}).") from exc
        with torch.device("meta"):
            model = CLIPVisionModelWithProjection(config)
        expected = set(model.state_dict())
        missing = sorted(expected - set(converted))
        unexpected = sorted(set(converted) - expected)
        if missing or unexpected:
            raise MissingWeightsError(describe_key_mismatch(f"{WHAT} '{path}'", missing, unexpected))
        model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
        # Non-persistent buffers (position ids) are not in checkpoints: rebuild them off the meta device.
        for name, buffer in list(model.named_buffers()):
            if buffer.is_meta:
                module_name, _, buffer_name = name.rpartition(".")
                module = model.get_submodule(module_name)
                module.register_buffer(
                    buffer_name, torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(), persistent=False
                )
        return cls(model).to(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [−1,1] → CLIP pixel values at 224² (whole frame, aspect not kept, as official)."""
        pixels = antialiased_bicubic_resize(images.float(), self.image_size)
        pixels = (pixels + 1.0) / 2.0
        return (pixels - self.mean) / self.std

    def embed_each(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.model.dtype)
        return self.model(pixel_values=pixels).image_embeds

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_each(images).mean(dim=0, keepdim=True)
