"""SEVA (Stable Virtual Camera) student: network, schedule and denoiser, cameras, encoders, loading."""

from imix2mix.seva.camera import (
    StudentConditioning,
    build_conditioning,
    build_student_conditioning,
    normalize_cameras,
    plucker_coordinates,
)
from imix2mix.seva.config import SevaConfig
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

__all__ = [
    "EulerEDMSampler",
    "GuidanceCameras",
    "MultiviewCFG",
    "NoCFG",
    "Seva",
    "SevaConditioning",
    "SevaConfig",
    "SevaDenoiser",
    "SevaSchedule",
    "StudentConditioning",
    "VanillaCFG",
    "build_conditioning",
    "build_student_conditioning",
    "euler_edm_step",
    "normalize_cameras",
    "plucker_coordinates",
    "sigma_hat",
]
