"""Hyper-parameters of the SEVA denoising network (official `SevaParams` defaults)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from imix2mix.errors import ConfigError


@dataclass(frozen=True)
class SevaConfig:
    """Shape of the SEVA network. The defaults build the official 1.26 B-parameter model.

    ``attention_resolutions`` holds UNet down-sampling factors (1, 2, 4, 8) at which a
    multi-view transformer follows each ResBlock; ``unflatten_names`` names the transformers
    whose spatial self-attention runs jointly over all frames of a scene (3-D attention).
    """

    in_channels: int = 11
    model_channels: int = 320
    out_channels: int = 4
    num_frames: int = 21
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_head_channels: int = 64
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    context_dim: int = 1024
    dense_in_channels: int = 6
    dropout: float = 0.0
    unflatten_names: tuple[str, ...] = ("middle_ds8", "output_ds4", "output_ds2")
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ConfigError(
                f"SevaConfig: transformer_depth has {len(self.transformer_depth)} entries but channel_mult has"
                f" {len(self.channel_mult)}; give one depth per UNet level."
            )
        for mult in self.channel_mult:
            width = mult * self.model_channels
            if width % self.num_head_channels or width % self.norm_num_groups:
                raise ConfigError(
                    f"SevaConfig: level width {width} must be divisible by num_head_channels"
                    f" ({self.num_head_channels}) and norm_num_groups ({self.norm_num_groups})."
                )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @classmethod
    def tiny(cls, **overrides: object) -> SevaConfig:
        """Same architecture (4 levels, 3-D blocks, time-mix, Plücker modulation) at toy widths for CPU tests."""
        small = replace(cls(), model_channels=32, num_head_channels=16, context_dim=32)
        return replace(small, **overrides) if overrides else small
