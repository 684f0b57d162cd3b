"""Cross-view self-attention for the InstructPix2Pix teacher, as swappable diffusers processors.

The teacher's batch during distillation is ``groups × views`` (3 CFG branches × N views, frames of one
branch contiguous).  Only self-attention (``attn1``) is replaced; text cross-attention (``attn2``)
keeps diffusers' :class:`AttnProcessor2_0`.

* :class:`RandomCrossViewAttnProcessor` (RCVAttn, METHOD §1.8): within each branch every view's
  queries attend to the keys/values of one key view κ, which *replace* the view's own.  Same cost as
  plain self-attention.  κ lives on a shared :class:`KeyViewState` set once per iteration, so every
  layer of one forward uses the same κ.
* :class:`ExtendedAttnProcessor`: the keys/values of all N views of the branch are concatenated.  The
  costly alternative (attention over N·L tokens).
* ``"none"``: plain diffusers attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from imix2mix.config import CrossViewAttention


class KeyViewState:
    """Per-forward settings shared by all cross-view processors of one UNet: N and κ.

    κ reaches the processors as a one-element tensor (``key_view_index``) refreshed in place, so a
    compiled UNet reads it as data instead of recompiling for every κ.  The processors of each mode
    are built once per UNet and reinstalled (``processors``), so a compiled UNet's guards keep
    holding when the mode switches between scenes.
    """

    def __init__(self, num_views: int = 1, key_view: int = 0):
        self.num_views = num_views
        self.key_view_index = torch.zeros(1, dtype=torch.long)
        self.key_view = key_view
        self.processors: dict[str, dict[str, object]] = {}

    @property
    def key_view(self) -> int:
        return self._key_view

    @key_view.setter
    def key_view(self, value: int) -> None:
        self._key_view = int(value)
        self.key_view_index.fill_(self._key_view)  # a device kernel, no host synchronisation

    def select(self, num_views: int, key_view: int, device: torch.device | str) -> None:
        """Set N and κ for the next forward (call outside any compiled region)."""
        if not 0 <= key_view < num_views:
            raise ValueError(f"key view {key_view} outside 0..{num_views - 1}")
        if self.key_view_index.device != torch.device(device):
            self.key_view_index = self.key_view_index.to(device)
        self.num_views, self.key_view = num_views, key_view


class _SelfAttentionProcessor:
    """Shared plumbing: project q/k/v like :class:`AttnProcessor2_0`, let the subclass mix views."""

    def __init__(self, state: KeyViewState):
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{type(self).__name__} is for unmasked self-attention (attn1) only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        batch, length, _ = hidden_states.shape
        views = self.state.num_views
        if batch % views:
            raise ValueError(f"batch {batch} is not a whole number of groups of {views} views")
        groups = batch // views

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        if attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("q/k normalisation is not used by the InstructPix2Pix UNet")

        out = self.mix(query, key, value, groups=groups, views=views, heads=heads, head_dim=head_dim)
        out = out.to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def mix(self, query, key, value, *, groups: int, views: int, heads: int, head_dim: int) -> torch.Tensor:
        raise NotImplementedError


def _heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[B, L, H·D] → [B, H, L, D]."""
    return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] → [B, L, H·D]."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class RandomCrossViewAttnProcessor(_SelfAttentionProcessor):
    """RCVAttn(Q, K, V, i) = softmax(Q_i K_κᵀ/√d) V_κ within each CFG branch."""

    def mix(self, query, key, value, *, groups, views, heads, head_dim):
        kappa = self.state.key_view_index.to(key.device)
        length, width = key.shape[1], key.shape[2]

        def key_view_of_each_group(x: torch.Tensor) -> torch.Tensor:
            picked = x.view(groups, views, length, width).index_select(1, kappa)
            return picked.expand(groups, views, length, width).reshape(groups * views, length, width)

        out = F.scaled_dot_product_attention(
            _heads(query, heads, head_dim),
            _heads(key_view_of_each_group(key), heads, head_dim),
            _heads(key_view_of_each_group(value), heads, head_dim),
        )
        return _merge_heads(out)


class ExtendedAttnProcessor(_SelfAttentionProcessor):
    """Every view attends to the keys/values of all views of its branch (sequence N·L)."""

    def mix(self, query, key, value, *, groups, views, heads, head_dim):
        length, width = query.shape[1], query.shape[2]

        def one_sequence_per_group(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(groups, views * length, width)

        out = F.scaled_dot_product_attention(
            _heads(one_sequence_per_group(query), heads, head_dim),
            _heads(one_sequence_per_group(key), heads, head_dim),
            _heads(one_sequence_per_group(value), heads, head_dim),
        )
        return _merge_heads(out).reshape(groups * views, length, width)


def set_cross_view_attention(unet: torch.nn.Module, mode: CrossViewAttention, state: KeyViewState | None = None) -> KeyViewState:
    """Install ``mode`` on every self-attention layer (``attn1``) of a diffusers UNet.

    Returns the state object the processors read (a new one when ``state`` is None); set its
    ``num_views`` and ``key_view`` before each forward.
    """
    state = state if state is not None else KeyViewState()
    processor_types = {"rcv": RandomCrossViewAttnProcessor, "extended": ExtendedAttnProcessor}
    if mode not in (*processor_types, "none"):
        raise ValueError(f"unknown cross-view attention {mode!r}; expected rcv, extended or none")
    if mode not in state.processors:
        state.processors[mode] = {
            name: processor_types[mode](state) if mode != "none" and name.endswith("attn1.processor") else AttnProcessor2_0()
            for name in unet.attn_processors
        }
    unet.set_attn_processor(dict(state.processors[mode]))  # diffusers consumes the dict it is given
    return state
