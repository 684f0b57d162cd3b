"""SEVA (Stable Virtual Camera) student: network, schedule and denoiser, cameras, encoders, loading."""

from imix2mix.seva.camera import (
    StudentConditioning,
    build_conditioning,
    build_student_conditioning,
    normalize_cameras,
    plucker_coordinates,
)
from imix2mix.seva.autoencoder import SevaAutoencoder
from imix2mix.seva.conditioner import ClipImageConditioner
from imix2mix.seva.config import SevaConfig
from imix2mix.seva.loading import load_seva, save_seva
from imix2mix.seva.network import Seva
from imix2mix.seva.sampling import render_novel_views, sample_novel_views
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
    "ClipImageConditioner",
    "SevaAutoencoder",
    "load_seva",
    "render_novel_views",
    "sample_novel_views",
    "save_seva",
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
