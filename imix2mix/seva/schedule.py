"""SEVA's diffusion formulation: σ table, ε-denoiser with clean-frame replacement, CFG guiders and
the Euler-EDM sampler. Arithmetic follows the official code in float32 so sampling reproduces it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from imix2mix.seva.network import Seva

# EDM's σ̂ = σ·(γ+1) + 1e-6 (the official sampler adds this even with s_churn = 0).
SIGMA_HAT_EPS = 1e-6


class SevaSchedule:
    """1000-step DDPM discretisation (β linear in √β from 5e-6 to 0.012) with a log-SNR shift.

    ``sigmas`` is the denoiser's lookup table: ascending float32, position = DDPM index
    (0.02465 at index 0 … 84.916 at index 999).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        linear_start: float = 5e-6,
        linear_end: float = 0.012,
        log_snr_shift: float = 2.4,
    ) -> None:
        self.num_timesteps = num_timesteps
        self.log_snr_shift = log_snr_shift
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod: np.ndarray = np.cumprod(1.0 - betas.numpy(), axis=0)
        self.sigmas = self._sigmas_for(self.alphas_cumprod)
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _sigmas_for(self, alphas_cumprod: np.ndarray) -> torch.Tensor:
        # The shift is applied in float64 before the single cast to float32 (bit-exact with the official table).
        sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod) * math.exp(self.log_snr_shift)
        return torch.tensor(sigmas, dtype=torch.float32)

    def sampling_timesteps(self, num_steps: int, start: int | None = None) -> np.ndarray:
        """DDPM indices of an ``num_steps`` sub-schedule from ``start`` (default: the last index, 999)
        down, ascending (50 steps: 19, 39, …, 999; from 500: 10, 20, …, 500)."""
        last = self.num_timesteps - 1 if start is None else int(start)
        if not 0 <= last < self.num_timesteps:
            raise ValueError(f"start index {last} outside 0..{self.num_timesteps - 1}")
        if num_steps > last:
            return np.arange(last + 1)
        return np.linspace(last, 0, num_steps, endpoint=False).astype(int)[::-1]

    def sampling_sigmas(self, num_steps: int, start: int | None = None) -> torch.Tensor:
        """σ of the sampler: descending, float32, with a trailing 0 (``num_steps + 1`` values)."""
        sigmas = self._sigmas_for(self.alphas_cumprod[self.sampling_timesteps(num_steps, start)])
        return torch.cat([sigmas.flip(0), sigmas.new_zeros(1)])

    def table(self, device: torch.device | str) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.sigmas.to(device)
        return self._tables[device]

    def sigma_to_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index (int64) of the nearest table σ."""
        table = self.table(sigma.device)
        return (sigma.float().reshape(1, -1) - table[:, None]).abs().argmin(dim=0).reshape(sigma.shape)

    def index_to_sigma(self, index: torch.Tensor | int) -> torch.Tensor:
        index = torch.as_tensor(index)
        return self.table(index.device)[index]

    def quantize(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nearest table σ, its DDPM index): what the denoiser uses for scalings and ``c_noise``."""
        index = self.sigma_to_index(sigma)
        return self.index_to_sigma(index), index


@dataclass
class SevaConditioning:
    """Per-frame conditioning of one T-frame scene (or a batch of scenes stacked on dim 0).

    crossattn [T,1,ctx]: CLIP-H image embedding; replace [T,5,h,w]: [clean latent, 1] at input frames,
    zeros elsewhere; concat [T,7,h,w]: [input mask, Plücker]; dense_vector [T,6,h,w]: Plücker.
    """

    crossattn: torch.Tensor
    replace: torch.Tensor
    concat: torch.Tensor
    dense_vector: torch.Tensor

    def unconditional(self) -> SevaConditioning:
        """The CFG null branch: no image context, no clean frames, mask 0; cameras are kept (Plücker)."""
        concat = torch.cat([torch.zeros_like(self.concat[:, :1]), self.concat[:, 1:]], dim=1)
        return SevaConditioning(
            crossattn=torch.zeros_like(self.crossattn),
            replace=torch.zeros_like(self.replace),
            concat=concat,
            dense_vector=self.dense_vector,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SevaConditioning:
        return SevaConditioning(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    @staticmethod
    def cat(parts: list[SevaConditioning]) -> SevaConditioning:
        """Stack scenes on the batch axis (e.g. ``[uncond, cond]`` for a CFG batch)."""
        return SevaConditioning(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts], dim=0) for f in fields(SevaConditioning)}
        )


class SevaDenoiser(nn.Module):
    """ε-parametrised denoiser D(x; σ) = x̃ − σ_q·ε_θ(c_in·x̃, idx(σ), cond).

    σ is quantised to the nearest table entry σ_q (its index is the network timestep); x̃ is x with
    the clean latents of input frames substituted (``replace``). Gradients flow to the network.
    """

    def __init__(self, network: Seva, schedule: SevaSchedule | None = None) -> None:
        super().__init__()
        self.network = network
        self.schedule = schedule or SevaSchedule()

    @staticmethod
    def replace_input_frames(x: torch.Tensor, replace: torch.Tensor) -> torch.Tensor:
        mask = replace[:, -1:]
        return x * (1 - mask) + replace[:, :-1] * mask

    def epsilon(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: SevaConditioning, num_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x̃, σ_q per frame, raw network output ε) for a noisy latent ``x`` [B·T,4,h,w]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        sigma_q, index = self.schedule.quantize(sigma)
        x_replaced = self.replace_input_frames(x, cond.replace)
        c_in = (1.0 / (sigma_q**2 + 1.0) ** 0.5)[:, None, None, None]
        net_in = torch.cat([x_replaced * c_in, cond.concat], dim=1)
        eps = self.network(net_in, index, cond.crossattn, cond.dense_vector, num_frames=num_frames)
        return x_replaced, sigma_q, eps

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: SevaConditioning, num_frames: int
    ) -> torch.Tensor:
        x_replaced, sigma_q, eps = self.epsilon(x, sigma, cond, num_frames)
        return x_replaced - sigma_q[:, None, None, None] * eps


# ----------------------------------------------------------------------------------------------
# Guiders: how the conditional and unconditional predictions are combined.


@dataclass(frozen=True)
class GuidanceCameras:
    """What MultiviewCFG needs to find frames that sit on an input camera: normalised c2w [T,4,4]
    (or [T,3,4]), normalised K [T,3,3] and which frames are inputs [T] bool."""

    c2w: torch.Tensor
    K: torch.Tensor
    input_frame_mask: torch.Tensor


class NoCFG:
    """Conditional prediction only (what I-Mix2Mix's student uses)."""

    def prepare_inputs(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: SevaConditioning, uncond: SevaConditioning | None
    ) -> tuple[torch.Tensor, torch.Tensor, SevaConditioning]:
        return x, sigma, cond

    def __call__(self, denoised: torch.Tensor, cameras: GuidanceCameras | None = None) -> torch.Tensor:
        return denoised


class VanillaCFG:
    """D = D_u + s·(D_c − D_u) with one scale for every frame; batch order [uncond, cond]."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def prepare_inputs(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: SevaConditioning, uncond: SevaConditioning | None
    ) -> tuple[torch.Tensor, torch.Tensor, SevaConditioning]:
        if uncond is None:
            uncond = cond.unconditional()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        return torch.cat([x, x]), torch.cat([sigma, sigma]), SevaConditioning.cat([uncond, cond])

    def scale_per_frame(self, num_frames: int, cameras: GuidanceCameras | None, device: torch.device) -> torch.Tensor:
        return torch.full((num_frames,), float(self.scale), device=device)

    def __call__(self, denoised: torch.Tensor, cameras: GuidanceCameras | None = None) -> torch.Tensor:
        uncond, cond = denoised.chunk(2)
        num_frames = uncond.shape[0] if cameras is None else cameras.input_frame_mask.shape[0]
        scale = self.scale_per_frame(num_frames, cameras, denoised.device).to(denoised.dtype)
        scale = scale.repeat(uncond.shape[0] // num_frames)[:, None, None, None]
        return uncond + scale * (cond - uncond)


def rotation_distance_degrees(rot_a: torch.Tensor, rot_b: torch.Tensor) -> torch.Tensor:
    """Pairwise geodesic angle [A,B] between rotations [A,3,3] and [B,3,3]."""
    trace = torch.einsum("aij,bij->ab", rot_a, rot_b)  # tr(R_a R_bᵀ)
    return torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0)))


class MultiviewCFG(VanillaCFG):
    """VanillaCFG, but frames "close" to an input camera get ``cfg_min`` (official rule):
    rotation < 10° AND translation < 1e-5 from some input camera AND K exactly equal to an input's K."""

    max_rotation_degrees = 10.0
    max_translation = 1e-5

    def __init__(self, scale: float = 2.0, cfg_min: float = 1.2) -> None:
        super().__init__(scale)
        self.cfg_min = cfg_min

    def close_to_input(self, cameras: GuidanceCameras) -> torch.Tensor:
        c2w, K = cameras.c2w.double(), cameras.K
        inputs = cameras.input_frame_mask.bool()
        rotation = rotation_distance_degrees(c2w[:, :3, :3], c2w[inputs, :3, :3]).min(dim=1).values
        translation = torch.cdist(c2w[:, :3, 3], c2w[inputs, :3, 3]).min(dim=1).values
        same_k = (K[:, None] == K[inputs][None]).flatten(2).all(dim=2).any(dim=1)
        return (rotation < self.max_rotation_degrees) & (translation < self.max_translation) & same_k

    def scale_per_frame(self, num_frames: int, cameras: GuidanceCameras | None, device: torch.device) -> torch.Tensor:
        scale = super().scale_per_frame(num_frames, cameras, device)
        if cameras is None:
            return scale
        close = self.close_to_input(cameras).to(device)
        return torch.where(close, torch.full_like(scale, float(self.cfg_min)), scale)


Guider = NoCFG | VanillaCFG


# ----------------------------------------------------------------------------------------------
# Euler-EDM sampling.


def sigma_hat(sigma: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """EDM's raised noise level σ̂ = σ·(γ+1) + 1e-6, in σ's dtype (float32 rounding matters)."""
    return sigma * (gamma + 1.0) + SIGMA_HAT_EPS


def noise_term_scale(sigma: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """√(σ̂² − σ²), the factor of the fresh noise an Euler-EDM step adds before denoising (in σ's
    dtype: in float32 it is exactly 0 while σ + 1e-6 rounds back to σ, i.e. for σ ≥ 32, SEVA's τ ≥ 814)."""
    return (sigma_hat(sigma, gamma) ** 2 - sigma**2) ** 0.5


def euler_edm_step(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from ``sigma`` (at which ``denoised`` was predicted)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device)
    if sigma.ndim:
        sigma, sigma_next = sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1)
    return x + (sigma_next - sigma) * ((x - denoised) / sigma)


NoiseSource = Callable[[int, torch.Tensor], torch.Tensor]
"""(step index, x) -> ε with x's shape: where the sampler's per-step noise comes from."""


def generator_noise(generator: torch.Generator | None) -> NoiseSource:
    def draw(step: int, x: torch.Tensor) -> torch.Tensor:
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)

    return draw


@dataclass
class StepRecord:
    """What one sampler step computed (for tests and diagnostics)."""

    x: torch.Tensor
    x_hat: torch.Tensor
    denoised: torch.Tensor
    out: torch.Tensor


class EulerEDMSampler:
    """Official ``EulerEDMSampler`` with s_churn = 0: σ̂ = σ + 1e-6, the (tiny) noise term ε·√(σ̂²−σ²)
    is still drawn every step, D is the guided denoiser output, x ← x + (σ_next − σ̂)·(x − D)/σ̂."""

    def __init__(
        self,
        schedule: SevaSchedule | None = None,
        num_steps: int = 50,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = 999.0,
        s_noise: float = 1.0,
        start: int | None = None,
    ) -> None:
        self.schedule = schedule or SevaSchedule()
        self.num_steps = num_steps
        self.start = start  # first DDPM index of the sub-schedule (None: the last, 999)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def sigmas(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.schedule.sampling_sigmas(self.num_steps, self.start).to(device)

    def initial_latent(self, standard_normal: torch.Tensor) -> torch.Tensor:
        """Scale N(0,1) noise to the first noise level: x₀ = n·√(1+σ₀²)."""
        sigma_max = self.sigmas(standard_normal.device)[0]
        return standard_normal * torch.sqrt(1.0 + sigma_max**2.0)

    def step(
        self,
        denoiser: SevaDenoiser,
        x: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        cond: SevaConditioning,
        uncond: SevaConditioning | None,
        guider: Guider,
        num_frames: int,
        eps: torch.Tensor,
        cameras: GuidanceCameras | None = None,
        gamma: float = 0.0,
    ) -> StepRecord:
        """One sampler step; ``sigma``/``sigma_next`` are per-frame float32 [B·T]; ``eps`` the drawn noise."""
        sig_hat = sigma_hat(sigma, gamma)
        x_hat = x + eps * self.s_noise * noise_term_scale(sigma, gamma)[:, None, None, None]
        batch_x, batch_sigma, batch_cond = guider.prepare_inputs(x_hat, sig_hat, cond, uncond)
        denoised = guider(denoiser(batch_x, batch_sigma, batch_cond, num_frames), cameras)
        out = euler_edm_step(x_hat, denoised, sig_hat, sigma_next)
        return StepRecord(x=x, x_hat=x_hat, denoised=denoised, out=out)

    def __call__(
        self,
        denoiser: SevaDenoiser,
        standard_normal: torch.Tensor,
        cond: SevaConditioning,
        uncond: SevaConditioning | None,
        guider: Guider,
        num_frames: int,
        cameras: GuidanceCameras | None = None,
        noise: NoiseSource | None = None,
        generator: torch.Generator | None = None,
        on_step: Callable[[int, StepRecord], None] | None = None,
    ) -> torch.Tensor:
        """Sample from N(0,1) ``standard_normal`` [B·T,4,h,w]; per-step noise from ``noise`` or ``generator``."""
        return self.denoise(
            denoiser, self.initial_latent(standard_normal), cond, uncond, guider, num_frames, cameras, noise, generator, on_step
        )

    def denoise(
        self,
        denoiser: SevaDenoiser,
        x: torch.Tensor,
        cond: SevaConditioning,
        uncond: SevaConditioning | None,
        guider: Guider,
        num_frames: int,
        cameras: GuidanceCameras | None = None,
        noise: NoiseSource | None = None,
        generator: torch.Generator | None = None,
        on_step: Callable[[int, StepRecord], None] | None = None,
    ) -> torch.Tensor:
        """Run every step from ``x`` [B·T,4,h,w] at the first σ of :meth:`sigmas` down to 0."""
        noise = noise or generator_noise(generator)
        sigmas = self.sigmas(x.device)
        ones = x.new_ones(x.shape[0])
        num_sigmas = len(sigmas)
        for i in range(num_sigmas - 1):
            in_range = self.s_tmin <= float(sigmas[i]) <= self.s_tmax
            gamma = min(self.s_churn / (num_sigmas - 1), 2**0.5 - 1) if in_range else 0.0
            record = self.step(
                denoiser, x, ones * sigmas[i], ones * sigmas[i + 1], cond, uncond, guider, num_frames,
                eps=noise(i, x), cameras=cameras, gamma=gamma,
            )
            if on_step is not None:
                on_step(i, record)
            x = record.out
        return x
