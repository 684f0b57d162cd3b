"""Novel-view synthesis with SEVA (the official one-pass sampler for a single T-frame window):
50 Euler-EDM steps, MultiviewCFG 2.0 with cfg_min 1.2 on frames that sit on an input camera; and the
same sampler started from given latents noised to an intermediate level (SDEdit, App. E.1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from imix2mix.seva.camera import (
    CAMERA_SCALE,
    ArrayLike,
    StudentConditioning,
    as_float32_tensor,
    build_conditioning,
    to_homogeneous,
)
from imix2mix.seva.schedule import EulerEDMSampler, MultiviewCFG, NoiseSource, SevaDenoiser, StepRecord

if TYPE_CHECKING:  # the encoders pull in diffusers / transformers
    from imix2mix.seva.autoencoder import SevaAutoencoder
    from imix2mix.seva.conditioner import ClipImageConditioner

DEFAULT_STEPS = 50
DEFAULT_CFG = 2.0
DEFAULT_CFG_MIN = 1.2
DEFAULT_SEED = 23  # the official demos' seed
SDEDIT_STARTS = (250, 500, 750)  # App. E.1's noise levels t (0.25, 0.5, 0.75 of the 1000-step scale)
SDEDIT_DEFAULT_START = 500


@torch.no_grad()
def sample_novel_views(
    denoiser: SevaDenoiser,
    conditioning: StudentConditioning,
    *,
    num_steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    cfg_min: float = DEFAULT_CFG_MIN,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample the latents [T,4,h,w] of every frame of a conditioned window (input frames included).

    The initial N(0,1) latent and every step's noise come from ``generator`` (or ``noise``), drawn on
    the generator's device as the official sampler draws its first latent on the CPU.
    ``autocast_dtype`` runs the network under autocast (the official demo uses float16 on CUDA).
    """
    shape = (conditioning.num_frames, 4, *conditioning.cond.replace.shape[-2:])
    sampler = EulerEDMSampler(denoiser.schedule, num_steps=num_steps)
    start = sampler.initial_latent(_standard_normal(shape, generator, conditioning.cond.replace.device))
    return _denoise_window(sampler, denoiser, conditioning, start, cfg, cfg_min, generator, noise, autocast_dtype)


def _standard_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N(0, 1) drawn on the generator's device (the CPU without one), as the official sampler draws."""
    source_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=source_device).to(device)


def _denoise_window(
    sampler: EulerEDMSampler,
    denoiser: SevaDenoiser,
    conditioning: StudentConditioning,
    x: torch.Tensor,
    cfg: float,
    cfg_min: float,
    generator: torch.Generator | None,
    noise: NoiseSource | None,
    autocast_dtype: torch.dtype | None,
    on_step: Callable[[int, StepRecord], None] | None = None,
) -> torch.Tensor:
    """Every sampler step from ``x`` with MultiviewCFG, optionally under autocast."""
    cond = conditioning.cond
    device = cond.replace.device
    precision = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    with precision:
        return sampler.denoise(
            denoiser, x, cond, cond.unconditional(), MultiviewCFG(cfg, cfg_min), num_frames=conditioning.num_frames,
            cameras=conditioning.guidance_cameras, noise=noise, generator=generator, on_step=on_step,
        )


@torch.no_grad()
def sdedit_views(
    denoiser: SevaDenoiser,
    conditioning: StudentConditioning,
    latents: torch.Tensor,
    *,
    start: int = SDEDIT_DEFAULT_START,
    num_steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    cfg_min: float = DEFAULT_CFG_MIN,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[int, StepRecord], None] | None = None,
) -> torch.Tensor:
    """SDEdit with SEVA: clean latents [T,4,h,w] of a conditioned window noised to the DDPM index
    ``start`` (x = z + σ_start·ε, SEVA's σ table) and denoised by ``num_steps`` Euler-EDM steps from
    σ_start to 0 (the official spacing, ``linspace(start, 0, num_steps)``), with the sampler's CFG.

    ε comes from ``generator`` (drawn on its device, like :func:`sample_novel_views`' first latent),
    then the per-step noise from ``generator`` or ``noise``.  ``on_step`` sees every step's record.
    """
    device = conditioning.cond.replace.device
    sampler = EulerEDMSampler(denoiser.schedule, num_steps=num_steps, start=start)
    noisy = latents.to(device).float() + sampler.sigmas(device)[0] * _standard_normal(latents.shape, generator, device)
    return _denoise_window(sampler, denoiser, conditioning, noisy, cfg, cfg_min, generator, noise, autocast_dtype, on_step)


@torch.no_grad()
def render_novel_views(
    denoiser: SevaDenoiser,
    autoencoder: SevaAutoencoder,
    clip: ClipImageConditioner,
    input_images: torch.Tensor,
    input_c2ws: ArrayLike,
    input_Ks: ArrayLike,
    target_c2ws: ArrayLike,
    target_Ks: ArrayLike,
    *,
    num_steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    cfg_min: float = DEFAULT_CFG_MIN,
    seed: int = DEFAULT_SEED,
    camera_scale: float = CAMERA_SCALE,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Images [K,3,H,W] in [−1,1] at K target cameras from M posed input images [M,3,H,W] in [−1,1].

    Cameras: OpenCV camera-to-world [·,4,4] and normalised K [·,3,3]. The window is
    ``[inputs…, targets…]`` (T = M + K, all sharing H×W, multiples of 64).
    """
    device = next(denoiser.network.parameters()).device
    input_images = input_images.to(device)
    num_inputs = input_images.shape[0]
    c2w = torch.cat([to_homogeneous(as_float32_tensor(input_c2ws)), to_homogeneous(as_float32_tensor(target_c2ws))])
    K = torch.cat([as_float32_tensor(input_Ks), as_float32_tensor(target_Ks)])
    input_frame_mask = torch.arange(len(c2w)) < num_inputs

    latents = autoencoder.encode(input_images).float()
    embeddings = clip.embed_each(input_images).float()
    cond, c2w_normalized = build_conditioning(c2w, K, input_frame_mask, latents, embeddings, camera_scale)
    window = StudentConditioning(cond, c2w_normalized, K, input_frame_mask, layout=list(range(len(c2w))))
    generator = torch.Generator().manual_seed(seed)
    samples = sample_novel_views(
        denoiser, window.to(device), num_steps=num_steps, cfg=cfg, cfg_min=cfg_min, generator=generator,
        autocast_dtype=autocast_dtype,
    )
    return autoencoder.decode(samples[num_inputs:]).float().clamp(-1.0, 1.0)
