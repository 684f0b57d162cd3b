"""SDEdit fusion (App. E.1): noise level t, 50 Euler steps from t, SEVA CFG 2.0, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imix2mix.seva import ClipImageConditioner, Seva, SevaAutoencoder, SevaConfig, SevaDenoiser, build_student_conditioning
from imix2mix.seva.sampling import SDEDIT_DEFAULT_START, SDEDIT_STARTS, sdedit_views
from imix2mix.seva.schedule import EulerEDMSampler, MultiviewCFG, SevaSchedule
from imix2mix.seva.sdedit import SDEditSettings, sdedit_fusion
from test_seva_sampling import rig  # cameras on an arc

VIEWS, SIZE = 3, 64  # SEVA latents 8×8


@pytest.fixture(scope="module")
def models() -> tuple[SevaDenoiser, SevaAutoencoder, ClipImageConditioner]:
    torch.manual_seed(0)
    return SevaDenoiser(Seva(SevaConfig.tiny()).eval()), SevaAutoencoder.tiny(), ClipImageConditioner.tiny(projection_dim=32)


def test_app_e1_defaults():
    settings = SDEditSettings()
    assert (settings.start, settings.num_steps, settings.cfg, settings.image_size) == (500, 50, 2.0, 576)
    assert SDEDIT_STARTS == (250, 500, 750) and SDEDIT_DEFAULT_START == 500
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="noise level"):
            SDEditSettings(start=bad)


@pytest.mark.parametrize("start", SDEDIT_STARTS)
def test_the_sampler_schedule_starts_at_t(start):
    sampler = EulerEDMSampler(SevaSchedule(), num_steps=50, start=start)
    sigmas = sampler.sigmas()
    assert len(sigmas) == 51 and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    indices = np.linspace(start, 0, 50, endpoint=False).astype(int)
    torch.testing.assert_close(sigmas[:-1], SevaSchedule().sigmas[indices])
    assert sigmas[0] == SevaSchedule().sigmas[start]
    # the full 50-step schedule is unchanged
    torch.testing.assert_close(EulerEDMSampler(num_steps=50).sigmas()[:-1], SevaSchedule().sigmas[np.linspace(999, 0, 50, endpoint=False).astype(int)])


def test_noise_level_sigmas_and_cfg_are_app_e1s(models):
    start = SDEDIT_DEFAULT_START
    denoiser, _, _ = models
    c2w, K = rig(VIEWS)
    reference = 1
    clean = torch.randn(VIEWS, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    conditioning = build_student_conditioning(c2w, K, reference, clean[reference: reference + 1], torch.randn(32))
    window = clean[conditioning.layout]
    records = []
    out = sdedit_views(
        denoiser, conditioning, window, start=start, generator=torch.Generator().manual_seed(9),
        on_step=lambda i, record: records.append((i, record)),
    )
    assert out.shape == window.shape and torch.isfinite(out).all()
    # 50 Euler steps, from σ at DDPM index t (SEVA's table) down to 0, the official spacing
    assert len(records) == 50
    table = denoiser.schedule.sigmas
    indices = np.linspace(start, 0, 50, endpoint=False).astype(int)
    assert indices[0] == start and len(set(indices.tolist())) == 50
    # the starting latent is z + σ_t·ε with ε the generator's first draw
    epsilon = torch.randn(window.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(records[0][1].x, window + table[start] * epsilon)
    # every step is an Euler step from the table σ of its index (σ̂ = σ + 1e-6, s_churn = 0) to the next, the last to 0
    for i, record in records:
        sigma_next = float(table[indices[i + 1]]) if i + 1 < 50 else 0.0
        sigma_hat = float(table[indices[i]]) + 1e-6
        expected = record.x_hat + (sigma_next - sigma_hat) * (record.x_hat - record.denoised) / sigma_hat
        torch.testing.assert_close(record.out, expected, rtol=1e-4, atol=1e-4)
    # CFG 2.0 on frames away from the input camera: D = D_u + 2 (D_c − D_u) at the first step
    first = records[0][1]
    sigma0 = torch.full((len(window),), float(table[start]) + 1e-6)
    with torch.no_grad():
        d_cond = denoiser(first.x_hat, sigma0, conditioning.cond, conditioning.num_frames)
        d_uncond = denoiser(first.x_hat, sigma0, conditioning.cond.unconditional(), conditioning.num_frames)
    scales = MultiviewCFG(2.0, 1.2).scale_per_frame(conditioning.num_frames, conditioning.guidance_cameras, d_cond.device)
    away = [slot for slot in range(conditioning.num_frames) if float(scales[slot]) == 2.0]
    assert away and 0 not in away and (reference + 1) not in away  # the input frame and its own viewpoint get cfg_min
    torch.testing.assert_close(first.denoised[away], (d_uncond + 2.0 * (d_cond - d_uncond))[away], rtol=1e-4, atol=1e-4)


def test_lower_t_stays_closer_to_the_edits(models):
    denoiser, _, _ = models
    c2w, K = rig(VIEWS)
    clean = torch.randn(VIEWS, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    conditioning = build_student_conditioning(c2w, K, 0, clean[:1], torch.randn(32))
    window = clean[conditioning.layout]
    distance = {
        start: (sdedit_views(denoiser, conditioning, window, start=start, num_steps=8, generator=torch.Generator().manual_seed(3)) - window)[1:].abs().mean()
        for start in (50, 750)
    }
    assert distance[50] < distance[750]


def test_fusion_runs_on_tiny_models(models):
    denoiser, autoencoder, clip = models
    c2w, K = rig(VIEWS)
    edits = torch.rand(VIEWS, 3, 48, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1  # teacher-size edits
    settings = SDEditSettings(start=500, num_steps=3, image_size=SIZE)
    fused = sdedit_fusion(edits, c2w, K, 2, denoiser=denoiser, autoencoder=autoencoder, clip=clip, settings=settings,
                          generator=torch.Generator().manual_seed(5))
    assert fused.shape == (VIEWS, 4, SIZE // 8, SIZE // 8) and torch.isfinite(fused).all()
    again = sdedit_fusion(edits, c2w, K, 2, denoiser=denoiser, autoencoder=autoencoder, clip=clip, settings=settings,
                          generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fused, again)
    images = autoencoder.decode(fused)
    assert images.shape == (VIEWS, 3, SIZE, SIZE)
