"""SDEdit fusion (the paper's App. E.1 baseline, METHOD.md §5.1): independent 2D teacher edits made
consistent by SEVA.

1. each view is edited on its own by the teacher (its pipeline decodes with the teacher VAE; the
   caller passes these images);
2. bilinear resize to SEVA's resolution (576);
3. SEVA-VAE encode;
4. SEVA conditioning on one input view: the edited reference (slot 0), all N views as targets, the
   layout of the distillation student;
5. noise to t ∈ {250, 500, 750} (default 500): x = z + σ_t·ε;
6. denoise with SEVA: 50 Euler steps from t down to 0, CFG 2.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from imix2mix.seva.camera import CAMERA_SCALE, ArrayLike, build_student_conditioning
from imix2mix.seva.sampling import DEFAULT_CFG, DEFAULT_CFG_MIN, DEFAULT_STEPS, SDEDIT_DEFAULT_START, sdedit_views
from imix2mix.seva.schedule import SevaDenoiser

if TYPE_CHECKING:
    from imix2mix.seva.autoencoder import SevaAutoencoder
    from imix2mix.seva.conditioner import ClipImageConditioner


@dataclass(frozen=True)
class SDEditSettings:
    """App. E.1's settings: noise level t (0–999 scale), Euler steps from t, SEVA CFG, image size."""

    start: int = SDEDIT_DEFAULT_START  # the paper shows 250, 500 and 750
    num_steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    cfg_min: float = DEFAULT_CFG_MIN  # SEVA's MultiviewCFG on frames at an input camera; = cfg for plain CFG
    image_size: int = 576

    def __post_init__(self) -> None:
        if not 0 < self.start < 1000:
            raise ValueError(f"SDEdit noise level t must be in 1..999 (got {self.start})")
        if self.num_steps < 1:
            raise ValueError(f"SDEdit needs at least one denoising step (got {self.num_steps})")
        if self.image_size < 64 or self.image_size % 64:
            raise ValueError(f"SDEdit image size must be a positive multiple of 64 (got {self.image_size})")


@torch.no_grad()
def sdedit_fusion(
    edited_views: torch.Tensor,
    c2ws: ArrayLike,
    K_normalized: ArrayLike,
    reference: int,
    *,
    denoiser: SevaDenoiser,
    autoencoder: SevaAutoencoder,
    clip: ClipImageConditioner,
    settings: SDEditSettings | None = None,
    generator: torch.Generator | None = None,
    camera_scale: float = CAMERA_SCALE,
) -> torch.Tensor:
    """Fuse N independent teacher edits [N, 3, S_T, S_T] in [−1, 1] (in scene view order, with
    cameras ``c2ws`` [N,4,4] OpenCV and ``K_normalized`` [N,3,3]) into SEVA latents [N, 4, h, w] of
    the N views (h = image_size / 8), conditioned on the edit of view ``reference``."""
    settings = settings or SDEditSettings()
    device = next(denoiser.network.parameters()).device
    # 2. bilinear to SEVA's resolution
    size = settings.image_size
    pixels = F.interpolate(edited_views.float().to(device), size=(size, size), mode="bilinear", align_corners=False)
    # 3. SEVA-VAE encode
    latents = autoencoder.encode(pixels).float()
    # 4. conditioning on the edited reference as the one input view
    conditioning = build_student_conditioning(
        c2ws, K_normalized, reference, latents[reference: reference + 1], clip(pixels[reference: reference + 1]).reshape(-1).float(),
        camera_scale,
    ).to(device)
    window = latents[conditioning.layout]  # [reference, view_1 … view_N]
    # 5–6. noise to t and denoise
    fused = sdedit_views(
        denoiser, conditioning, window, start=settings.start, num_steps=settings.num_steps, cfg=settings.cfg,
        cfg_min=settings.cfg_min, generator=generator,
    )
    return fused[1:]
