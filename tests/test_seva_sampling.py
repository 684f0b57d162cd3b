"""Novel-view sampling with tiny random models: shapes, value range, CFG batching, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from imix2mix.seva import (
    ClipImageConditioner,
    Seva,
    SevaAutoencoder,
    SevaConfig,
    SevaDenoiser,
    build_student_conditioning,
    render_novel_views,
    sample_novel_views,
)

SIZE = 64  # images; latents are 8×8


@pytest.fixture(scope="module")
def models() -> tuple[SevaDenoiser, SevaAutoencoder, ClipImageConditioner]:
    torch.manual_seed(0)
    network = Seva(SevaConfig.tiny()).eval()
    return SevaDenoiser(network), SevaAutoencoder.tiny(), ClipImageConditioner.tiny(projection_dim=32)


def rig(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras on an arc looking at the origin (OpenCV c2w) with the default 54° intrinsics."""
    c2w = torch.eye(4).repeat(count, 1, 1)
    for i, angle in enumerate(torch.linspace(-0.4, 0.4, count)):
        c, s = torch.cos(angle), torch.sin(angle)
        c2w[i, :3, :3] = torch.tensor([[c, 0, -s], [0, 1, 0], [s, 0, c]])
        c2w[i, :3, 3] = -2.0 * c2w[i, :3, 2]
    focal = 0.5 / torch.tan(torch.deg2rad(torch.tensor(27.0)))
    K = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]]).repeat(count, 1, 1)
    return c2w, K


def test_render_novel_views_shapes_range_and_seed(models) -> None:
    denoiser, autoencoder, clip = models
    c2w, K = rig(4)
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1

    def render(seed: int) -> torch.Tensor:
        return render_novel_views(
            denoiser, autoencoder, clip, images, c2w[:2], K[:2], c2w[2:], K[2:], num_steps=3, seed=seed
        )

    first = render(7)
    assert first.shape == (2, 3, SIZE, SIZE)
    assert first.min() >= -1 and first.max() <= 1 and torch.isfinite(first).all()
    assert torch.equal(render(7), first)
    assert not torch.equal(render(8), first)


def test_sample_novel_views_runs_cfg_batches_for_every_step(models) -> None:
    denoiser, _, _ = models
    c2w, K = rig(3)
    conditioning = build_student_conditioning(c2w, K, 1, torch.randn(1, 4, 8, 8), torch.randn(32))
    batches: list[int] = []
    handle = denoiser.network.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        latents = sample_novel_views(
            denoiser, conditioning, num_steps=4, generator=torch.Generator().manual_seed(0)
        )
    finally:
        handle.remove()
    assert latents.shape == (4, 4, 8, 8)
    assert batches == [2 * 4] * 4  # [uncond, cond] of the T = 4 window at each of the 4 steps
    again = sample_novel_views(denoiser, conditioning, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, latents)


def test_default_is_fifty_steps(models) -> None:
    denoiser, _, _ = models
    c2w, K = rig(2)
    conditioning = build_student_conditioning(c2w, K, 0, torch.randn(1, 4, 8, 8), torch.randn(32))
    calls: list[int] = []
    handle = denoiser.network.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        sample_novel_views(denoiser, conditioning, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(calls) == 50


def test_sampling_under_autocast_keeps_a_float32_state(models) -> None:
    denoiser, _, _ = models
    c2w, K = rig(2)
    conditioning = build_student_conditioning(c2w, K, 0, torch.randn(1, 4, 8, 8), torch.randn(32))
    generator = torch.Generator().manual_seed(0)
    low = sample_novel_views(denoiser, conditioning, num_steps=2, generator=generator, autocast_dtype=torch.bfloat16)
    full = sample_novel_views(denoiser, conditioning, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).norm() / full.norm() < 0.05
