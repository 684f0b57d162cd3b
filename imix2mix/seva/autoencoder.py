"""SEVA's frozen VAE: the SD-2.1-base ``AutoencoderKL`` (f = 8, latents scaled by 0.18215)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from imix2mix.errors import MissingWeightsError
from imix2mix.hub import resolve_dir

SD21_BASE_REPO = "stabilityai/stable-diffusion-2-1-base"
WHAT = "SEVA VAE (SD-2.1-base)"


class SevaAutoencoder(nn.Module):
    """encode: images [N,3,H,W] in [−1,1] → ``latent_dist.mean`` × 0.18215 ([N,4,H/8,W/8]);
    decode: z / 0.18215 → images. Parameters are frozen, but gradients still flow through
    ``decode`` to its input (for decode-encode alignment)."""

    def __init__(self, vae: AutoencoderKL, chunk_size: int | None = None) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        # Frames per VAE call; the official demo uses 1 to bound memory. None = all at once.
        self.chunk_size = chunk_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = SD21_BASE_REPO,
        *,
        subfolder: str | None = "vae",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk_size: int | None = None,
    ) -> SevaAutoencoder:
        """From a diffusers model folder (with a ``vae`` subfolder), the VAE folder itself, or a Hub repo."""
        patterns = [f"{subfolder}/config.json", f"{subfolder}/*.safetensors"] if subfolder else None
        folder = resolve_dir(source, what=WHAT, allow_patterns=patterns)
        if subfolder and not (folder / subfolder).is_dir() and (folder / "config.json").is_file():
            subfolder = None  # the VAE folder was given directly
        vae_folder = folder / subfolder if subfolder else folder
        if not (vae_folder / "config.json").is_file():
            raise MissingWeightsError(f"{WHAT}: '{vae_folder}' has no config.json (a diffusers AutoencoderKL folder is needed).")
        try:
            vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=dtype, use_safetensors=True)
        except OSError as exc:
            raise MissingWeightsError(f"{WHAT}: cannot load '{vae_folder}': {exc}") from exc
        return cls(vae, chunk_size).to(device)

    @classmethod
    def tiny(cls, seed: int = 0) -> SevaAutoencoder:
        """Same class, four small blocks (keeps f = 8 and 4 latent channels), random weights."""
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64,
            scaling_factor=0.18215,
        )
        return cls(vae)

    def _chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(self.chunk_size) if self.chunk_size else (x,)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.vae.dtype)
        means = [self.vae.encode(chunk).latent_dist.mean for chunk in self._chunks(images)]
        return torch.cat(means) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.scaling_factor
        return torch.cat([self.vae.decode(chunk).sample for chunk in self._chunks(latents)])
