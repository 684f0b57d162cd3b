"""Attention and transformer blocks of the SEVA network (spatial, 3-D multi-view and time-mix)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from imix2mix.kernels.dispatch import UsesKernels
from imix2mix.kernels.short_attention import MAX_LEN as SHORT_SEQUENCE_MAX_LEN
from imix2mix.seva.layers import GroupNorm32, LayerNorm32, Linear


class AttentionProcessor(Protocol):
    """Computes ``attn``'s output from its projections; swappable per layer (diffusers style).

    ``context`` (cross-attention) may hold fewer rows than ``x``: each of its rows then serves
    ``x.shape[0] // context.shape[0]`` consecutive rows of ``x`` (the time-mix blocks pass one
    context per scene for all of the scene's spatial positions).
    """

    def __call__(self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor: ...


class SdpaAttnProcessor:
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    PyTorch picks flash / cuDNN kernels on GPU and the math kernel on CPU. The official code pins the
    flash backend, which fails on machines without it; the numbers are the same.

    Cross-attention to a single context token (SEVA's context is one CLIP image embedding) is
    computed exactly without the attention kernel: a softmax over one key is 1, so every query's
    output is ``to_out(to_v(context))`` and q, k and the attention scores cannot change it.  The
    attention kernels are at their slowest there (the flash backward pass over one key took 24 ms of
    the student's iteration on an H100), and the projections of the time-mix blocks' context, one
    copy per spatial position, are computed once.

    Self-attention over short sequences (the time-mix blocks' T views) is the op ``short_attention``
    when the attention layer's kernel set (:class:`~imix2mix.kernels.dispatch.UsesKernels`) gives it
    a backend other than torch's (the Triton kernel of :mod:`imix2mix.kernels.short_attention`: flash
    tiles of 64+ rows are mostly padding there).
    """

    def __call__(self, attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        batch, q_len, _ = x.shape
        if context is not None and context.shape[1] == 1:
            out = attn.to_out(attn.to_v(context))  # [context rows, 1, C]
            return _rows_per_query_batch(out, batch).expand(batch, q_len, out.shape[-1])
        heads, head_dim = attn.heads, attn.head_dim
        kernels = attn.kernels
        if context is None and q_len <= SHORT_SEQUENCE_MAX_LEN and kernels.short_attention != "torch":
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
            return attn.to_out(kernels.run("short_attention", q, k, v, heads))
        context = x if context is None else _rows_per_query_batch(context, batch)
        kv_len = context.shape[1]
        q = attn.to_q(x).view(batch, q_len, heads, head_dim).transpose(1, 2)
        k = attn.to_k(context).view(batch, kv_len, heads, head_dim).transpose(1, 2)
        v = attn.to_v(context).view(batch, kv_len, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, q_len, heads * head_dim)
        return attn.to_out(out)


def _rows_per_query_batch(context: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat each context row over the query rows it serves (see :class:`AttentionProcessor`)."""
    if context.shape[0] == batch:
        return context
    if batch % context.shape[0]:
        raise ValueError(f"context of {context.shape[0]} rows cannot serve a query batch of {batch}")
    return context.repeat_interleave(batch // context.shape[0], dim=0)


class Attention(UsesKernels, nn.Module):
    """Self- or cross-attention with bias-free q/k/v projections (checkpoint names ``to_q`` … ``to_out.0``)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * head_dim
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.processor: AttentionProcessor = SdpaAttnProcessor()

    def set_processor(self, processor: AttentionProcessor) -> None:
        self.processor = processor

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.processor(self, x, context)


class GEGLU(UsesKernels, nn.Module):
    """Linear to twice the width; the first half is gated by the exact (erf) GELU of the second half.

    The gate is the op ``geglu`` of the layer's kernel set (the Triton backend,
    :mod:`imix2mix.kernels.geglu`, is one fused kernel per pass, the same function as torch's ops on
    the halves).  Also stands in for diffusers' ``GEGLU`` in the teacher (same ``proj``).
    """

    def __init__(self, dim_in: int, dim_out: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.proj = Linear(dim_in, 2 * dim_out, device=device)

    @classmethod
    def sharing_projection(cls, other: nn.Module) -> GEGLU:
        """A GEGLU computing with ``other.proj`` (any module whose forward is this one's: diffusers')."""
        proj: nn.Linear = other.proj
        geglu_module = cls(proj.in_features, proj.out_features // 2, device="meta")
        geglu_module.proj = proj
        geglu_module.train(other.training)
        return geglu_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.run("geglu", self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _AttentionLayers(nn.Module):
    """The layers both transformer blocks share, under the checkpoint's names: self-attention,
    cross-attention to the CLIP context and a feed-forward, each after its own LayerNorm."""

    def _add_attention_layers(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float) -> None:
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, dropout=dropout)
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.norm3 = LayerNorm32(dim)

    def _attend(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        return self.attn2(self.norm2(x), context) + x


class TransformerBlock(_AttentionLayers):
    """Self-attention, cross-attention to the CLIP context, feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self._add_attention_layers(dim, heads, head_dim, context_dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self._attend(x, context)
        return self.ff(self.norm3(x)) + x


class TransformerBlockTimeMix(_AttentionLayers):
    """Attention across the views at each spatial position (sequence axis = frames).

    Returns the last feed-forward's output *without* its residual: the owning
    :class:`MultiviewTransformer` adds it to the spatial block's output, as the official code does.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Built before the shared layers: seeded random init (tiny preset) depends on construction order.
        self.norm_in = LayerNorm32(dim)
        self.ff_in = FeedForward(dim, dropout=dropout)
        self._add_attention_layers(dim, heads, head_dim, context_dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.ff_in(self.norm_in(x)) + x
        x = self._attend(x, context)
        return self.ff(self.norm3(x))


class MultiviewTransformer(nn.Module):
    """Spatial (or 3-D) transformer followed by a cross-view time-mix block, with a global residual.

    ``is_3d``: the spatial self-attention sees the tokens of all frames of a scene at once.
    Frames of one scene are contiguous on the batch axis (``[B·T, C, h, w]``).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int,
        name: str,
        is_3d: bool,
        norm_num_groups: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.is_3d = is_3d
        self.norm = GroupNorm32(norm_num_groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, head_dim, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = Linear(channels, channels)
        self.time_mix_blocks = nn.ModuleList(
            TransformerBlockTimeMix(channels, heads, head_dim, context_dim, dropout) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        frames_total, channels, height, width = x.shape
        scenes = frames_total // num_frames
        tokens = height * width
        residual = x
        x = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # [B·T, h·w, C]

        # Both the 3-D blocks and the time-mix blocks see the context of each scene's frame 0
        # (the time-mix blocks: one row per scene for all its h·w positions).
        first_frame_context = context[::num_frames]  # [B, 1, ctx]

        for spatial_block, time_block in zip(self.transformer_blocks, self.time_mix_blocks):
            if self.is_3d:
                x = spatial_block(x.reshape(scenes, num_frames * tokens, channels), first_frame_context)
                x = x.reshape(frames_total, tokens, channels)
            else:
                x = spatial_block(x, context)
            # [B·T, S, C] -> [B·S, T, C]: each spatial position becomes a sequence over the views.
            x_views = x.reshape(scenes, num_frames, tokens, channels).transpose(1, 2)
            x_mix = time_block(x_views.reshape(scenes * tokens, num_frames, channels), first_frame_context)
            x = x + x_mix.reshape(scenes, tokens, num_frames, channels).transpose(1, 2).reshape(x.shape)

        x = self.proj_out(x)
        return x.transpose(1, 2).reshape(frames_total, channels, height, width) + residual
