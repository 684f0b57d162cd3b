"""Convolutional building blocks of the SEVA UNet: normalisation, ResBlock with dense Plücker
modulation, up/down-sampling and the sinusoidal timestep embedding."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from imix2mix.kernels.dispatch import UsesKernels


class GroupNorm32(UsesKernels, nn.GroupNorm):
    """GroupNorm with fp32 statistics and affine, rounded to the input's dtype (bf16/fp16 autocast
    keeps fp32 statistics), optionally followed by SiLU, and optionally of ``x + shift[:, :, None, None]``
    (``shift``: ``[N, C]`` of ``x.dtype``, added in that dtype first).

    The op ``group_norm`` of the layer's kernel set (:class:`~imix2mix.kernels.dispatch.UsesKernels`):
    its Triton backend (:mod:`imix2mix.kernels.group_norm`) takes channels-last inputs in one fused
    kernel per pass (torch's GroupNorm has no NHWC kernel, so without it every convolution around a
    norm would transpose its input and output).
    """

    def forward(self, x: torch.Tensor, silu: bool = False, shift: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernels.run("group_norm", x, self.weight, self.bias, self.num_groups, self.eps, silu=silu, shift=shift)


class LayerNorm32(UsesKernels, nn.LayerNorm):
    """LayerNorm as autocast runs it (fp32 statistics and affine), whose output under CUDA autocast is
    already rounded to the autocast dtype: in SEVA every consumer of a LayerNorm is a Linear, which
    would round it to that dtype anyway.  The op ``layer_norm`` of the layer's kernel set: its Triton
    backend (:mod:`imix2mix.kernels.layer_norm`) takes contiguous inputs under autocast in one fused
    kernel per pass instead of casts around torch's fp32 kernel; the torch backend is ``nn.LayerNorm``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.run("layer_norm", x, self.normalized_shape, self.weight, self.bias, self.eps)


class Linear(UsesKernels, nn.Linear):
    """``nn.Linear`` (same parameters and function) as the op ``linear`` of the layer's kernel set:
    its Triton backend (:mod:`imix2mix.kernels.linear`) sums the bias gradient with a column-sum
    kernel, casting as autocast would; the torch backend is ``nn.Linear``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.run("linear", x, self.weight, self.bias)


def replace_modules(module: nn.Module, source_type: type[nn.Module], build: Callable[[nn.Module], nn.Module]) -> int:
    """Swap every submodule of exactly ``source_type`` inside ``module`` for ``build(submodule)``
    (built to share the submodule's parameters).  Returns how many were swapped."""
    swapped = 0
    for name, child in list(module.named_modules()):
        if type(child) is source_type:
            module.set_submodule(name, build(child))
            swapped += 1
    return swapped


def use_group_norm32(module: nn.Module) -> int:
    """Swap every plain ``nn.GroupNorm`` inside ``module`` for a :class:`GroupNorm32` sharing its
    parameters (the teacher's UNet: the same function where inputs already match the weights'
    dtype, and the fused NHWC kernel on channels-last CUDA inputs).  Returns how many were swapped."""

    def build(child: nn.Module) -> GroupNorm32:
        replacement = GroupNorm32(child.num_groups, child.num_channels, child.eps, child.affine, device="meta")
        replacement.weight, replacement.bias = child.weight, child.bias
        replacement.train(child.training)
        return replacement

    return replace_modules(module, nn.GroupNorm, build)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t·f), sin(t·f)]`` (cos first), float32, of integer DDPM indices."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def resize_dense(dense: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=True) resize of the Plücker map to a UNet level's size."""
    if tuple(dense.shape[-2:]) == tuple(size):
        return dense  # align_corners=True at equal size is the identity
    return F.interpolate(dense, size=size, mode="bilinear", align_corners=True)


class ResBlock(nn.Module):
    """ResBlock whose normalised input is modulated by the Plücker map: ``a·(1 + scale) + shift``."""

    def __init__(
        self,
        in_channels: int,
        emb_channels: int,
        out_channels: int,
        dense_in_channels: int,
        norm_num_groups: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_num_groups, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.dense_emb_layers = nn.Sequential(nn.Conv2d(dense_in_channels, 2 * in_channels, 1))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_num_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        norm, _silu, conv_in = self.in_layers  # the SiLU runs inside the norm (one fused kernel on CUDA)
        a = norm(x, silu=True)
        modulation = self.dense_emb_layers(resize_dense(dense, a.shape[-2:])).type(a.dtype)
        scale, shift = modulation.split(self.in_channels, dim=1)
        h = conv_in(a * (1 + scale) + shift)
        # The timestep embedding is added inside the norm (h has no other use): on the fused kernel
        # that saves a pass over h (torch's channels-last broadcast add is slow) and, in the backward,
        # a separate reduction of h's gradient over H, W.  Same values as ``h + emb[:, :, None, None]``.
        emb_out = self.emb_layers(emb).type(h.dtype)
        norm, _silu, dropout, conv_out = self.out_layers
        return self.skip_connection(x) + conv_out(dropout(norm(h, silu=True, shift=emb_out)))
