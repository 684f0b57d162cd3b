"""σ tables, quantisation, Euler-EDM arithmetic and guiders against the official fixtures (no network)."""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY
from safetensors.torch import load_file

from imix2mix.seva import (
    EulerEDMSampler,
    GuidanceCameras,
    MultiviewCFG,
    NoCFG,
    SevaConditioning,
    SevaSchedule,
    VanillaCFG,
    euler_edm_step,
    sigma_hat,
)

SIGMA_TOL = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "seva_schedule.safetensors"))


@pytest.fixture(scope="module")
def forward_fx() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "seva_forward.safetensors"))


def test_denoiser_table_and_alphas(fx: dict[str, torch.Tensor]) -> None:
    schedule = SevaSchedule()
    torch.testing.assert_close(schedule.sigmas, fx["denoiser_sigmas"], **SIGMA_TOL)
    torch.testing.assert_close(torch.from_numpy(schedule.alphas_cumprod), fx["alphas_cumprod_f64"])
    assert schedule.sigmas[0].item() == pytest.approx(0.024649, abs=1e-6)
    assert schedule.sigmas[-1].item() == pytest.approx(84.916328, abs=1e-4)


@pytest.mark.parametrize("num_steps", [1000, 50, 4])
def test_sampling_sigmas(fx: dict[str, torch.Tensor], num_steps: int) -> None:
    sigmas = SevaSchedule().sampling_sigmas(num_steps)
    torch.testing.assert_close(sigmas, fx[f"discretization_{num_steps}"], **SIGMA_TOL)
    assert sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())


def test_sigma_quantisation_probes(fx: dict[str, torch.Tensor]) -> None:
    sigma_q, index = SevaSchedule().quantize(fx["probe.sigma"])
    assert torch.equal(index, fx["probe.idx"])
    torch.testing.assert_close(sigma_q, fx["probe.sigma_quantized"], **SIGMA_TOL)


def test_fifty_step_sigma_hat_noise_factor_and_indices(fx: dict[str, torch.Tensor]) -> None:
    sampler = EulerEDMSampler(num_steps=50)
    sigmas = sampler.sigmas()[:-1]
    raised = sigma_hat(sigmas)
    torch.testing.assert_close(raised, fx["steps50.sigma_hat"], **SIGMA_TOL)
    torch.testing.assert_close((raised**2 - sigmas**2) ** 0.5, fx["steps50.noise_factor"], **SIGMA_TOL)
    assert torch.equal(sampler.schedule.sigma_to_index(raised), fx["steps50.c_noise"])
    scale = sampler.initial_latent(torch.ones(1))
    torch.testing.assert_close(scale, fx["steps50.init_scale"], **SIGMA_TOL)


def test_euler_step_arithmetic(fx: dict[str, torch.Tensor]) -> None:
    noise_factor = ((fx["step.sigma_hat"] ** 2 - fx["step.sigma"] ** 2) ** 0.5)
    torch.testing.assert_close(sigma_hat(fx["step.sigma"]), fx["step.sigma_hat"], **SIGMA_TOL)
    torch.testing.assert_close(noise_factor, fx["step.noise_factor"], **SIGMA_TOL)
    x_hat = fx["step.x"] + fx["step.eps"] * noise_factor[:, None, None, None]
    torch.testing.assert_close(x_hat, fx["step.x_hat"], rtol=1e-5, atol=5e-4)
    for variant in ("step", "step_nonoise"):
        start = fx["step.x_hat"] if variant == "step" else fx["step.x"]
        out = euler_edm_step(start, fx[f"{variant}.denoised"], fx["step.sigma_hat"], fx["step.sigma_next"])
        torch.testing.assert_close(out, fx[f"{variant}.out"], rtol=1e-5, atol=5e-4)


def test_loop_arithmetic_with_recorded_denoiser_outputs(fx: dict[str, torch.Tensor]) -> None:
    """The 4-step loop driven by the recorded guided D: checks the sampler bookkeeping without a network."""
    sampler = EulerEDMSampler(num_steps=4)
    recorded = iter(fx["loop4.denoised"])

    class Replay(NoCFG):
        def __call__(self, denoised: torch.Tensor, cameras: GuidanceCameras | None = None) -> torch.Tensor:
            return next(recorded)

    states: list[torch.Tensor] = []
    cond = SevaConditioning(torch.zeros(5, 1, 1), torch.zeros(5, 5, 1, 1), torch.zeros(5, 7, 1, 1), torch.zeros(5, 6, 1, 1))
    final = sampler(
        lambda x, sigma, c, num_frames: x,  # the Replay guider discards it
        fx["loop4.randn_init"], cond, None, Replay(), num_frames=5,
        noise=lambda step, x: fx["loop4.eps"][step],
        on_step=lambda step, record: states.append(record.x),
    )
    for step, state in enumerate(states):
        torch.testing.assert_close(state, fx["loop4.x_before_step"][step], rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(final, fx["loop4.final"], rtol=1e-4, atol=1e-2)


def test_multiview_cfg_scales_from_the_official_rule(forward_fx: dict[str, torch.Tensor]) -> None:
    fx = forward_fx
    cameras = GuidanceCameras(fx["den.c2w"], fx["den.K"], fx["den.input_frame_mask"])
    scale = MultiviewCFG(2.0, 1.2).scale_per_frame(5, cameras, torch.device("cpu"))
    torch.testing.assert_close(scale, fx["den.cfg.scale_per_frame"])


def test_close_frame_rule_needs_rotation_translation_and_K() -> None:
    c2w = torch.eye(4).repeat(5, 1, 1)
    K = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]]).repeat(5, 1, 1)
    angle = torch.deg2rad(torch.tensor([0.0, 5.0, 15.0, 0.0, 0.0]))
    c2w[:, 0, 0], c2w[:, 0, 2], c2w[:, 2, 0], c2w[:, 2, 2] = angle.cos(), angle.sin(), -angle.sin(), angle.cos()
    c2w[3, 0, 3] = 1e-3  # moved
    K[4, 0, 0] = 1.01  # other intrinsics
    mask = torch.tensor([True, False, False, False, False])
    close = MultiviewCFG().close_to_input(GuidanceCameras(c2w, K, mask))
    assert close.tolist() == [True, True, False, False, False]


def test_guiders_combine_denoised_predictions() -> None:
    uncond, cond = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    torch.testing.assert_close(VanillaCFG(2.0)(torch.cat([uncond, cond])), 2 * cond)
    assert NoCFG()(cond) is cond
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[1:, 0, 3] = torch.tensor([1.0, 2.0])
    cameras = GuidanceCameras(c2w, torch.eye(3).repeat(3, 1, 1), torch.tensor([True, False, False]))
    guided = MultiviewCFG(3.0, 1.5)(torch.cat([uncond, cond]), cameras)
    assert guided[:, 0, 0, 0].tolist() == [1.5, 3.0, 3.0]


def test_cfg_batch_is_uncond_then_cond() -> None:
    crossattn = torch.ones(2, 1, 8)
    replace = torch.ones(2, 5, 4, 4)
    concat = torch.ones(2, 7, 4, 4)
    cond = SevaConditioning(crossattn, replace, concat, concat[:, 1:])
    x, sigma, batch = VanillaCFG(2.0).prepare_inputs(torch.randn(2, 4, 4, 4), torch.tensor(3.0), cond, None)
    assert x.shape[0] == sigma.shape[0] == 4
    assert batch.crossattn[:2].abs().sum() == 0 and batch.replace[:2].abs().sum() == 0
    assert batch.concat[:2, 0].abs().sum() == 0 and torch.equal(batch.concat[:2, 1:], concat[:, 1:])
    assert torch.equal(batch.dense_vector[:2], batch.dense_vector[2:])
    assert torch.equal(batch.crossattn[2:], crossattn)
