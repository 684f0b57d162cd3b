"""The SEVA network at the tiny preset: shapes, gradients, checkpointing, autocast, multi-view wiring."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PARITY

from imix2mix.errors import ConfigError
from imix2mix.seva import Seva, SevaConditioning, SevaConfig, SevaDenoiser
from imix2mix.seva.attention import Attention, MultiviewTransformer, SdpaAttnProcessor

T, H, W = 5, 16, 16


@pytest.fixture(scope="module")
def tiny_network() -> Seva:
    torch.manual_seed(0)
    return Seva(SevaConfig.tiny())


def random_inputs(config: SevaConfig, frames: int = T, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, config.in_channels, H, W, generator=g)
    t = torch.randint(0, 1000, (frames,), generator=g)
    y = torch.randn(frames, 1, config.context_dim, generator=g)
    dense = torch.randn(frames, config.dense_in_channels, H, W, generator=g)
    return x, t, y, dense


def test_default_config_matches_official_state_dict_names_and_shapes() -> None:
    with torch.device("meta"):
        network = Seva(SevaConfig())
    ours = {name: list(t.shape) for name, t in network.state_dict().items()}
    official = json.loads((PARITY / "seva_state_dict.json").read_text())
    assert list(ours) == list(official)
    assert ours == official
    assert sum(t.numel() for t in network.parameters()) == 1_263_968_004


def test_tiny_is_the_same_architecture_at_small_width() -> None:
    tiny, full = SevaConfig.tiny(), SevaConfig()
    assert type(tiny) is type(full)
    assert tiny.channel_mult == full.channel_mult and tiny.unflatten_names == full.unflatten_names
    with torch.device("meta"):
        network = Seva(tiny)
    transformers = {m.name: m.is_3d for m in network.modules() if isinstance(m, MultiviewTransformer)}
    assert transformers == {
        "input_ds1": False, "input_ds2": False, "input_ds4": False, "middle_ds8": True,
        "output_ds4": True, "output_ds2": True, "output_ds1": False,
    }
    # Same key grammar as the official checkpoint: only widths differ.
    with torch.device("meta"):
        full_keys = list(Seva(full).state_dict())
    assert list(network.state_dict()) == full_keys


def test_invalid_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_head_channels"):
        SevaConfig.tiny(num_head_channels=24)
    with pytest.raises(ConfigError, match="transformer_depth"):
        SevaConfig(transformer_depth=(1, 1))


def test_forward_shape_and_batch_must_be_whole_scenes(tiny_network: Seva) -> None:
    x, t, y, dense = random_inputs(tiny_network.config)
    with torch.no_grad():
        out = tiny_network(x, t, y, dense, num_frames=T)
    assert out.shape == (T, 4, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="whole number"):
        tiny_network(x, t, y, dense, num_frames=3)


# q, k and the LayerNorm before them in the cross-attentions to a one-token context
CANNOT_MATTER = ("attn2.to_q.weight", "attn2.to_k.weight", "norm2.weight", "norm2.bias")


def test_backward_reaches_every_parameter_that_can_change_the_output(tiny_network: Seva) -> None:
    tiny_network.zero_grad(set_to_none=True)
    x, t, y, dense = random_inputs(tiny_network.config)
    tiny_network(x, t, y, dense, num_frames=T).square().mean().backward()
    # The cross-attentions see a one-token context: softmax over one key is 1, so their queries,
    # keys and the LayerNorm before them cannot change the output and get no gradient.
    without_grad = [n for n, p in tiny_network.named_parameters() if p.grad is None]
    assert without_grad and all(n.endswith(CANNOT_MATTER) for n in without_grad)
    assert len(without_grad) == 4 * 2 * 16  # every spatial and time-mix block of the 16 transformers
    dead = [n for n, p in tiny_network.named_parameters() if p.grad is not None and not p.grad.abs().gt(0).any()]
    assert dead == []
    tiny_network.zero_grad(set_to_none=True)


@pytest.mark.parametrize("context_rows", [6, 2])
def test_single_token_cross_attention_equals_full_attention(context_rows: int) -> None:
    """The shortcut against scaled-dot-product attention computed in full, gradients included."""
    torch.manual_seed(0)
    attn = Attention(32, heads=2, head_dim=16, context_dim=24)
    x = torch.randn(6, 10, 32, requires_grad=True)
    context = torch.randn(context_rows, 1, 24, requires_grad=True)

    def full_attention() -> torch.Tensor:
        repeated = context.repeat_interleave(6 // context_rows, dim=0)
        q = attn.to_q(x).view(6, 10, 2, 16).transpose(1, 2)
        k = attn.to_k(repeated).view(6, 1, 2, 16).transpose(1, 2)
        v = attn.to_v(repeated).view(6, 1, 2, 16).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attn.to_out(out.transpose(1, 2).reshape(6, 10, 32))

    weights = torch.randn(6, 10, 32)
    reference = full_attention()
    (reference * weights).sum().backward()
    reference_grads = [t.grad.clone() for t in (x, context, attn.to_v.weight, attn.to_out[0].weight)]
    for t in (x, context, *attn.parameters()):
        t.grad = None
    fast = attn(x, context)
    (fast * weights).sum().backward()
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    assert x.grad is None or not x.grad.abs().gt(0).any()
    assert reference_grads[0].abs().max() < 1e-6  # q cannot matter in the full computation either
    for got, expected in zip((context.grad, attn.to_v.weight.grad, attn.to_out[0].weight.grad), reference_grads[1:]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # summation order only
    with pytest.raises(ValueError, match="cannot serve"):
        attn(torch.randn(5, 10, 32), torch.randn(2, 3, 24))


def test_gradient_checkpointing_gives_the_same_output_and_gradients() -> None:
    torch.manual_seed(0)
    network = Seva(SevaConfig.tiny())
    x, t, y, dense = random_inputs(network.config)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        network.zero_grad(set_to_none=True)
        out = network(x, t, y, dense, num_frames=T)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}

    plain_out, plain_grads = run()
    network.enable_gradient_checkpointing()
    assert network.gradient_checkpointing
    ckpt_out, ckpt_grads = run()
    torch.testing.assert_close(ckpt_out, plain_out)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=lambda m: f"{name}: {m}")


def test_bf16_autocast_runs_with_fp32_weights_and_stays_close(tiny_network: Seva) -> None:
    x, t, y, dense = random_inputs(tiny_network.config)
    with torch.no_grad():
        reference = tiny_network(x, t, y, dense, num_frames=T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_network(x, t, y, dense, num_frames=T)
    assert all(p.dtype == torch.float32 for p in tiny_network.parameters())
    assert low.dtype == torch.bfloat16
    relative = (low.float() - reference).norm() / reference.norm()
    assert relative < 0.05


def test_frames_of_a_scene_interact_and_scenes_do_not(tiny_network: Seva) -> None:
    config = tiny_network.config
    x, t, y, dense = random_inputs(config, frames=2 * T)
    with torch.no_grad():
        base = tiny_network(x, t, y, dense, num_frames=T)
        x_changed = x.clone()
        x_changed[0] += 1.0  # frame 0 of scene 0 only
        changed = tiny_network(x_changed, t, y, dense, num_frames=T)
    assert (changed[1] - base[1]).abs().max() > 1e-4  # other frames of scene 0 see it
    torch.testing.assert_close(changed[T:], base[T:])  # scene 1 does not


def test_context_of_frame_zero_drives_3d_and_time_mix_blocks(tiny_network: Seva) -> None:
    x, t, y, dense = random_inputs(tiny_network.config)
    with torch.no_grad():
        base = tiny_network(x, t, y, dense, num_frames=T)
        y_other = y.clone()
        y_other[2] += 1.0  # a non-first frame's context reaches only its own spatial blocks
        other = tiny_network(x, t, y_other, dense, num_frames=T)
        y_first = y.clone()
        y_first[0] += 1.0
        first = tiny_network(x, t, y_first, dense, num_frames=T)
    assert (other[2] - base[2]).abs().max() > 1e-4
    assert (first[3] - base[3]).abs().max() > 1e-4


class CountingProcessor(SdpaAttnProcessor):
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        return super().__call__(attn, x, context)


def test_attention_processor_is_swappable() -> None:
    torch.manual_seed(0)
    network = Seva(SevaConfig.tiny())
    x, t, y, dense = random_inputs(network.config)
    with torch.no_grad():
        before = network(x, t, y, dense, num_frames=T)
        processor = CountingProcessor()
        network.set_attn_processor(processor)
        after = network(x, t, y, dense, num_frames=T)
    attention_layers = sum(isinstance(m, Attention) for m in network.modules())
    # 16 multi-view transformers (6 down, 1 middle, 9 up), each 2 spatial + 2 time-mix attentions.
    assert processor.calls == attention_layers == 16 * 4
    torch.testing.assert_close(after, before)


def test_denoiser_keeps_gradients_and_replaces_the_input_frame(tiny_network: Seva) -> None:
    config = tiny_network.config
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(1, 4, H, W, generator=g)
    replace = torch.zeros(T, 5, H, W)
    replace[0, :4], replace[0, 4] = clean[0], 1.0
    plucker = torch.randn(T, 6, H, W, generator=g)
    cond = SevaConditioning(
        crossattn=torch.randn(1, 1, config.context_dim, generator=g).expand(T, 1, -1),
        replace=replace,
        concat=torch.cat([replace[:, 4:], plucker], dim=1),
        dense_vector=plucker,
    )
    denoiser = SevaDenoiser(tiny_network)
    x = 10.0 * torch.randn(T, 4, H, W, generator=g)
    seen: list[torch.Tensor] = []
    handle = tiny_network.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    tiny_network.zero_grad(set_to_none=True)
    try:
        x0 = denoiser(x, 10.0, cond, num_frames=T)
    finally:
        handle.remove()
    sigma_q, _ = denoiser.schedule.quantize(torch.tensor([10.0]))
    c_in = 1 / (sigma_q**2 + 1).sqrt()
    torch.testing.assert_close(seen[0][0, :4], clean[0] * c_in)  # frame 0 carries the clean latent
    torch.testing.assert_close(seen[0][1:, :4], x[1:] * c_in)
    x0[1:].square().mean().backward()
    assert all(p.grad is not None for n, p in tiny_network.named_parameters() if not n.endswith(CANNOT_MATTER))
    tiny_network.zero_grad(set_to_none=True)


def test_benchmark_command_runs_on_the_tiny_preset(tmp_path) -> None:  # noqa: ANN001
    import importlib.util
    import json

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_seva", REPO_ROOT / "benchmarks" / "bench_seva.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "seva.json"
    args = ["--preset", "tiny", "--device", "cpu", "--latent", "8", "--iterations", "1", "--warmup", "0", "--out", str(out)]
    result = bench.main(args)
    assert json.loads(out.read_text()) == result
    assert result["parameters"] == sum(p.numel() for p in Seva(SevaConfig.tiny()).parameters())
    assert result["precision"] == "bf16_autocast" and result["frames"] == 5
    assert len(result["seconds"]) == 1 and result["median_seconds"] > 0
