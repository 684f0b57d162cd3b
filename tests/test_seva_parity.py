"""Full-size SEVA parity with the official code (fixtures in shared/parity, README tolerances).

Every test here needs the 1.26 B-parameter network with the deterministic fixture weights
(~20 s and 5.5 GB to make, once per module). Deselect locally with ``-m "not fullsize"``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY
from safetensors.torch import load_file

from imix2mix.seva import (
    EulerEDMSampler,
    GuidanceCameras,
    MultiviewCFG,
    Seva,
    SevaConditioning,
    SevaConfig,
    SevaDenoiser,
)

pytestmark = pytest.mark.fullsize


@pytest.fixture(scope="module")
def network() -> Seva:
    from make_weights import load_shapes, seva_weights

    with torch.device("meta"):
        network = Seva(SevaConfig())
    network.load_state_dict(seva_weights(load_shapes()), strict=True, assign=True)
    return network.eval()


@pytest.fixture(scope="module")
def forward_fx() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "seva_forward.safetensors"))


@pytest.fixture(scope="module")
def schedule_fx() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "seva_schedule.safetensors"))


def conditioning(fx: dict[str, torch.Tensor], prefix: str) -> SevaConditioning:
    return SevaConditioning(
        crossattn=fx[f"{prefix}.crossattn"],
        replace=fx[f"{prefix}.replace"],
        concat=fx[f"{prefix}.concat"],
        dense_vector=fx[f"{prefix}.dense_vector"],
    )


def guidance_cameras(fx: dict[str, torch.Tensor]) -> GuidanceCameras:
    return GuidanceCameras(fx["den.c2w"], fx["den.K"], fx["den.input_frame_mask"])


class NetworkCalls:
    """Records what the raw network receives and returns inside a denoiser call."""

    def __init__(self, network: Seva) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handle = network.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output) -> None:  # noqa: ANN001
        x, t = args[0], args[1]
        self.calls.append((x[:, :4].detach(), t.detach(), output.detach()))

    def __enter__(self) -> NetworkCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@torch.no_grad()
def test_raw_forward_t3_with_intermediates(network: Seva, forward_fx: dict[str, torch.Tensor]) -> None:
    captured: dict[str, torch.Tensor] = {}
    blocks = {"time_embed": network.time_embed, "middle_block": network.middle_block}
    blocks |= {f"input_blocks.{i}": b for i, b in enumerate(network.input_blocks)}
    blocks |= {f"output_blocks.{i}": b for i, b in enumerate(network.output_blocks)}
    handles = [
        block.register_forward_hook(lambda m, a, o, name=name: captured.__setitem__(name, o))
        for name, block in blocks.items()
    ]
    try:
        fx = forward_fx
        out = network(fx["t3.x"], fx["t3.t"], fx["t3.y"], fx["t3.dense_y"], num_frames=int(fx["t3.num_frames"]))
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(out, fx["t3.out"], rtol=1e-4, atol=1e-4)
    assert len(captured) == 26
    for name, value in captured.items():
        torch.testing.assert_close(value, fx[f"t3.inter.{name}"], rtol=1e-4, atol=1e-3, msg=lambda m: f"{name}: {m}")


@torch.no_grad()
def test_raw_forward_t5(network: Seva, forward_fx: dict[str, torch.Tensor]) -> None:
    fx = forward_fx
    out = network(fx["t5.x"], fx["t5.t"], fx["t5.y"], fx["t5.dense_y"], num_frames=int(fx["t5.num_frames"]))
    torch.testing.assert_close(out, fx["t5.out"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_denoiser_conditional_call(network: Seva, forward_fx: dict[str, torch.Tensor]) -> None:
    fx = forward_fx
    denoiser = SevaDenoiser(network)
    sigma_q, index = denoiser.schedule.quantize(fx["den.sigma"])
    torch.testing.assert_close(sigma_q, fx["den.sigma_quantized"], rtol=1e-6, atol=1e-7)
    assert torch.equal(index, fx["den.c_noise"])

    with NetworkCalls(network) as calls:
        out = denoiser(fx["den.x_noisy"], fx["den.sigma"], conditioning(fx, "den.c"), int(fx["den.num_frames"]))
    (net_in, net_t, net_out), = calls.calls
    assert torch.equal(net_t, fx["den.cond.net_t"])
    torch.testing.assert_close(net_in, fx["den.cond.net_in_x4"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(net_out, fx["den.cond.net_out"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, fx["den.cond.out"], rtol=1e-4, atol=1e-3)


@torch.no_grad()
def test_denoiser_cfg_batch_and_multiview_guidance(network: Seva, forward_fx: dict[str, torch.Tensor]) -> None:
    fx = forward_fx
    denoiser = SevaDenoiser(network)
    guider = MultiviewCFG(scale=float(fx["den.cfg.scale"]), cfg_min=float(fx["den.cfg.cfg_min"]))
    x, sigma, cond = guider.prepare_inputs(
        fx["den.x_noisy"], fx["den.sigma"], conditioning(fx, "den.c"), conditioning(fx, "den.uc")
    )
    with NetworkCalls(network) as calls:
        out = denoiser(x, sigma, cond, int(fx["den.num_frames"]))
    (net_in, net_t, net_out), = calls.calls
    assert torch.equal(net_t, fx["den.cfg.net_t"])
    torch.testing.assert_close(net_in, fx["den.cfg.net_in_x4"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(net_out, fx["den.cfg.net_out"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, fx["den.cfg.out"], rtol=1e-4, atol=1e-3)

    cameras = guidance_cameras(fx)
    scale = guider.scale_per_frame(5, cameras, out.device)
    torch.testing.assert_close(scale, fx["den.cfg.scale_per_frame"])
    torch.testing.assert_close(guider(out, cameras), fx["den.cfg.guided"], rtol=1e-4, atol=2e-3)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["step", "step_nonoise"])
def test_one_euler_edm_step(
    network: Seva, forward_fx: dict[str, torch.Tensor], schedule_fx: dict[str, torch.Tensor], variant: str
) -> None:
    fx, sx = forward_fx, schedule_fx
    sampler = EulerEDMSampler(num_steps=50, s_noise=1.0 if variant == "step" else 0.0)
    sigmas = sampler.sigmas()
    index = int(sx["step.index"])
    torch.testing.assert_close(sigmas[index].expand(5), sx["step.sigma"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sigmas[index + 1].expand(5), sx["step.sigma_next"], rtol=1e-6, atol=1e-7)

    record = sampler.step(
        SevaDenoiser(network),
        sx["step.x"],
        sx["step.sigma"],
        sx["step.sigma_next"],
        conditioning(fx, "den.c"),
        conditioning(fx, "den.uc"),
        MultiviewCFG(2.0, 1.2),
        num_frames=5,
        eps=sx["step.eps"],
        cameras=guidance_cameras(fx),
    )
    if variant == "step":
        torch.testing.assert_close(record.x_hat, sx["step.x_hat"], rtol=1e-5, atol=5e-4)
    else:
        assert torch.equal(record.x_hat, sx["step.x"])
    torch.testing.assert_close(record.denoised, sx[f"{variant}.denoised"], rtol=1e-5, atol=2e-3)
    torch.testing.assert_close(record.out, sx[f"{variant}.out"], rtol=1e-5, atol=5e-4)


@torch.no_grad()
def test_four_step_sampling_loop_with_recorded_noise(
    network: Seva, forward_fx: dict[str, torch.Tensor], schedule_fx: dict[str, torch.Tensor]
) -> None:
    fx, sx = forward_fx, schedule_fx
    sampler = EulerEDMSampler(num_steps=4)
    torch.testing.assert_close(sampler.sigmas(), sx["loop4.sigmas"], rtol=1e-6, atol=1e-7)
    records = []
    final = sampler(
        SevaDenoiser(network),
        sx["loop4.randn_init"],
        conditioning(fx, "den.c"),
        conditioning(fx, "den.uc"),
        MultiviewCFG(float(sx["loop4.scale"]), float(sx["loop4.cfg_min"])),
        num_frames=5,
        cameras=guidance_cameras(fx),
        noise=lambda step, x: sx["loop4.eps"][step],
        on_step=lambda step, record: records.append(record),
    )
    assert len(records) == 4
    for step, record in enumerate(records):
        torch.testing.assert_close(record.x, sx["loop4.x_before_step"][step], rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(record.denoised, sx["loop4.denoised"][step], rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(final, sx["loop4.final"], rtol=1e-4, atol=1e-2)
