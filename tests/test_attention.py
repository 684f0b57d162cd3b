"""RCVAttn / extended attention processors against hand-written attention."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from imix2mix.attention import (
    ExtendedAttnProcessor,
    KeyViewState,
    RandomCrossViewAttnProcessor,
    set_cross_view_attention,
)

GROUPS, VIEWS, TOKENS, DIM, HEADS = 3, 4, 10, 16, 2


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(QKᵀ/√d)V per head, written out with matmuls."""
    d = q.shape[-1] // heads
    split = lambda x: x.view(x.shape[0], heads, d).transpose(0, 1)  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ vh).transpose(0, 1).reshape(q.shape[0], heads * d)


@pytest.fixture()
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS).eval()


def _projections(attn: Attention, x: torch.Tensor):
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def test_rcv_frame_i_attends_to_the_key_frame(attn):
    hidden = torch.randn(GROUPS * VIEWS, TOKENS, DIM, generator=torch.Generator().manual_seed(1))
    state = KeyViewState(num_views=VIEWS, key_view=2)
    with torch.no_grad():
        out = RandomCrossViewAttnProcessor(state)(attn, hidden)
        q, k, v = _projections(attn, hidden)
        for group in range(GROUPS):
            key_frame = group * VIEWS + state.key_view
            for view in range(VIEWS):
                i = group * VIEWS + view
                expected = attn.to_out[0](reference_attention(q[i], k[key_frame], v[key_frame], HEADS))
                torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


def test_rcv_changes_output_only_through_the_key_frame(attn):
    hidden = torch.randn(GROUPS * VIEWS, TOKENS, DIM)
    state = KeyViewState(num_views=VIEWS, key_view=0)
    processor = RandomCrossViewAttnProcessor(state)
    with torch.no_grad():
        base = processor(attn, hidden)
        plain = AttnProcessor2_0()(attn, hidden)
        # the key frame itself computes ordinary self-attention, the others do not
        torch.testing.assert_close(base[0], plain[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base[1], plain[1], atol=1e-4)
        state.key_view = 3
        moved = processor(attn, hidden)
    assert not torch.allclose(moved[1], base[1], atol=1e-4)


def test_rcv_and_extended_equal_self_attention_when_frames_are_identical(attn):
    one_frame = torch.randn(1, TOKENS, DIM)
    hidden = one_frame.expand(GROUPS * VIEWS, TOKENS, DIM).contiguous()
    state = KeyViewState(num_views=VIEWS, key_view=1)
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden)
        rcv = RandomCrossViewAttnProcessor(state)(attn, hidden)
        extended = ExtendedAttnProcessor(state)(attn, hidden)
    torch.testing.assert_close(rcv, plain, rtol=1e-5, atol=1e-5)
    # N identical copies of every key: the softmax weights split evenly, so the result is unchanged
    torch.testing.assert_close(extended, plain, rtol=1e-5, atol=1e-5)


def test_extended_attends_to_all_frames_of_its_group(attn):
    hidden = torch.randn(GROUPS * VIEWS, TOKENS, DIM)
    state = KeyViewState(num_views=VIEWS)
    with torch.no_grad():
        out = ExtendedAttnProcessor(state)(attn, hidden)
        q, k, v = _projections(attn, hidden)
        for group in range(GROUPS):
            rows = slice(group * VIEWS, (group + 1) * VIEWS)
            keys, values = k[rows].reshape(-1, DIM), v[rows].reshape(-1, DIM)
            for i in range(group * VIEWS, (group + 1) * VIEWS):
                expected = attn.to_out[0](reference_attention(q[i], keys, values, HEADS))
                torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


def test_batch_must_be_whole_groups(attn):
    with pytest.raises(ValueError, match="groups"):
        RandomCrossViewAttnProcessor(KeyViewState(num_views=4))(attn, torch.randn(6, TOKENS, DIM))


def test_installed_on_self_attention_only():
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    state = set_cross_view_attention(unet, "rcv")
    kinds = {name: type(p) for name, p in unet.attn_processors.items()}
    self_layers = [n for n in kinds if n.endswith("attn1.processor")]
    cross_layers = [n for n in kinds if n.endswith("attn2.processor")]
    assert self_layers and len(self_layers) == len(cross_layers)
    assert all(kinds[n] is RandomCrossViewAttnProcessor for n in self_layers)
    assert all(kinds[n] is AttnProcessor2_0 for n in cross_layers)
    assert all(unet.attn_processors[n].state is state for n in self_layers)  # one κ for all layers

    sample = torch.randn(2 * 3, 8, 8, 8)
    context = torch.randn(6, 5, 32)
    state.num_views = 2
    with torch.no_grad():
        state.key_view = 0
        a = unet(sample, 10, context).sample
        state.key_view = 1
        b = unet(sample, 10, context).sample
        set_cross_view_attention(unet, "none")
        plain = unet(sample, 10, context).sample
    assert not torch.allclose(a, b)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert plain.shape == a.shape


def test_unknown_mode_is_rejected():
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    with pytest.raises(ValueError, match="unknown"):
        set_cross_view_attention(unet, "full")  # type: ignore[arg-type]
