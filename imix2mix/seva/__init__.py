"""SEVA (Stable Virtual Camera) student: network, schedule and denoiser, cameras, encoders, loading."""

from imix2mix.seva.config import SevaConfig
from imix2mix.seva.network import Seva

__all__ = ["Seva", "SevaConfig"]
