"""SEVA (Stable Virtual Camera) student: network, schedule and denoiser, cameras, encoders, loading.

The encoders (diffusers / transformers) and the sampling helpers that use them are imported on
first use, so importing the network or schedule stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from imix2mix.seva.camera import (
    StudentConditioning,
    build_conditioning,
    build_student_conditioning,
    normalize_cameras,
    plucker_coordinates,
)
from imix2mix.seva.config import SevaConfig
from imix2mix.seva.loading import load_seva, save_seva
from imix2mix.seva.network import Seva
from imix2mix.seva.schedule import (
    EulerEDMSampler,
    GuidanceCameras,
    MultiviewCFG,
    NoCFG,
    SevaConditioning,
    SevaDenoiser,
    SevaSchedule,
    VanillaCFG,
    euler_edm_step,
    sigma_hat,
)

_LAZY = {
    "SevaAutoencoder": "imix2mix.seva.autoencoder",
    "ClipImageConditioner": "imix2mix.seva.conditioner",
    "sample_novel_views": "imix2mix.seva.sampling",
    "render_novel_views": "imix2mix.seva.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imix2mix.seva' has no attribute {name!r}")


__all__ = [
    "ClipImageConditioner",
    "EulerEDMSampler",
    "GuidanceCameras",
    "MultiviewCFG",
    "NoCFG",
    "Seva",
    "SevaAutoencoder",
    "SevaConditioning",
    "SevaConfig",
    "SevaDenoiser",
    "SevaSchedule",
    "StudentConditioning",
    "VanillaCFG",
    "build_conditioning",
    "build_student_conditioning",
    "euler_edm_step",
    "load_seva",
    "normalize_cameras",
    "plucker_coordinates",
    "render_novel_views",
    "sample_novel_views",
    "save_seva",
    "sigma_hat",
]
