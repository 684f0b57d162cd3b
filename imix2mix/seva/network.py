"""The SEVA denoising network: SD-2.1's UNet with multi-view transformers and Plücker modulation.

State-dict names and shapes are those of the official checkpoint (``modelv1.1.safetensors``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from imix2mix.seva.attention import AttentionProcessor, Attention, MultiviewTransformer
from imix2mix.seva.config import SevaConfig
from imix2mix.seva.layers import Downsample, GroupNorm32, ResBlock, Upsample, timestep_embedding


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: routes the time embedding and Plücker map to ResBlocks, the context to transformers."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        dense: torch.Tensor,
        num_frames: int,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, dense)
            elif isinstance(layer, MultiviewTransformer):
                x = layer(x, context, num_frames)
            else:
                x = layer(x)
        return x


class Seva(nn.Module):
    """Multi-view ε-prediction network.

    ``forward(x[B·T, 11, h, w], t[B·T], y[B·T, 1, ctx], dense_y[B·T, 6, h, w], num_frames=T)``: frames of
    one scene are contiguous on the batch axis; ``t`` are integer DDPM indices (one per frame).
    """

    def __init__(self, config: SevaConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SevaConfig()
        self.gradient_checkpointing = False
        mc = config.model_channels
        emb_dim = config.time_embed_dim

        def res_block(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, emb_dim, out_ch, config.dense_in_channels, config.norm_num_groups, config.dropout)

        def transformer(ch: int, name: str, depth: int) -> MultiviewTransformer:
            return MultiviewTransformer(
                ch,
                heads=ch // config.num_head_channels,
                head_dim=config.num_head_channels,
                context_dim=config.context_dim,
                depth=depth,
                name=name,
                is_3d=name in config.unflatten_names,
                norm_num_groups=config.norm_num_groups,
                dropout=config.dropout,
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))]
        )
        skip_channels = [mc]
        ch, ds = mc, 1
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(transformer(ch, f"input_ds{ds}", config.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            transformer(ch, f"middle_ds{ds}", config.transformer_depth[-1]),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(transformer(ch, f"output_ds{ds}", config.transformer_depth[level]))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(config.norm_num_groups, ch),
            nn.SiLU(),
            nn.Conv2d(mc, config.out_channels, 3, padding=1),
        )

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each UNet block's activations in the backward pass (non-reentrant checkpoints)."""
        self.gradient_checkpointing = enabled

    def set_attn_processor(self, processor: AttentionProcessor) -> None:
        """Use ``processor`` in every attention layer (self, cross, 3-D and time-mix)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_processor(processor)

    def _run_block(
        self,
        block: TimestepEmbedSequential,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        dense: torch.Tensor,
        num_frames: int,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, dense, num_frames, use_reentrant=False)
        return block(h, emb, context, dense, num_frames)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        dense_y: torch.Tensor,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        num_frames = self.config.num_frames if num_frames is None else int(num_frames)
        if x.shape[0] % num_frames:
            raise ValueError(f"batch of {x.shape[0]} frames is not a whole number of {num_frames}-frame scenes")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))

        h = x
        skips = []
        for block in self.input_blocks:
            h = self._run_block(block, h, emb, y, dense_y, num_frames)
            skips.append(h)
        h = self._run_block(self.middle_block, h, emb, y, dense_y, num_frames)
        for block in self.output_blocks:
            h = self._run_block(block, torch.cat([h, skips.pop()], dim=1), emb, y, dense_y, num_frames)
        norm, _silu, conv_out = self.out
        return conv_out(norm(h.type(x.dtype), silu=True))
