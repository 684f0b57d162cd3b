"""Camera conditioning of SEVA: pose normalisation, Plücker ray maps, and the student's
conditioning for the I-Mix2Mix layout ``[reference, view_1 … view_N]``.

Poses are camera-to-world in OpenCV axes (x right, y down, z forward); intrinsics are normalised
(row 0 divided by the image width, row 1 by the height). Arithmetic is float32 like the official code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imix2mix.seva.schedule import GuidanceCameras, SevaConditioning

CAMERA_SCALE = 2.0
# Cameras farther from the median position than this many 97th-percentile distances are outliers.
OUTLIER_QUANTILE_FACTOR = 10.0

ArrayLike = torch.Tensor | np.ndarray | Sequence[np.ndarray]


def as_float32_tensor(value: ArrayLike) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.float()
    return torch.as_tensor(np.asarray(value), dtype=torch.float32)


def to_homogeneous(c2w: torch.Tensor) -> torch.Tensor:
    """[T,3,4] or [T,4,4] → [T,4,4]."""
    if c2w.shape[-2] == 4:
        return c2w
    bottom = torch.zeros_like(c2w[:, :1])
    bottom[:, 0, 3] = 1
    return torch.cat([c2w, bottom], dim=1)


def normalize_cameras(
    c2w: ArrayLike, all_c2ws: ArrayLike | None = None, camera_scale: float = CAMERA_SCALE
) -> torch.Tensor:
    """Centre and scale a window of cameras as the official ``get_value_dict`` does.

    Centre = mean position of ``all_c2ws`` (default: ``c2w`` itself) after dropping cameras farther
    than 10×q97 from the per-axis median; then all translations are scaled so camera 0 sits at
    ``camera_scale`` from the centre. Rotations are unchanged. Returns float32 [T,4,4].
    """
    c2w = to_homogeneous(as_float32_tensor(c2w)).clone()
    positions = to_homogeneous(as_float32_tensor(all_c2ws if all_c2ws is not None else c2w))[:, :3, 3]
    distances = (positions - positions.median(dim=0).values).norm(dim=-1)
    limit = min(OUTLIER_QUANTILE_FACTOR * torch.quantile(distances, 0.97).item(), 1e6)
    centre = positions[distances <= limit].mean(dim=0)
    c2w[:, :3, 3] -= centre
    first_distance = c2w[0, :3, 3].norm()
    factor = camera_scale if torch.isclose(first_distance, first_distance.new_zeros(()), atol=1e-5) else camera_scale / first_distance
    c2w[:, :3, 3] *= factor
    return c2w


def plucker_coordinates(c2w: ArrayLike, K_normalized: ArrayLike, height: int, width: int) -> torch.Tensor:
    """Plücker ray maps [T,6,h,w] = (direction, origin × direction), relative to camera 0.

    Pixel centres (x+0.5, y+0.5) at the latent resolution; rows are y.
    """
    c2w = to_homogeneous(as_float32_tensor(c2w))
    K = as_float32_tensor(K_normalized).clone()
    K[:, 0] *= width
    K[:, 1] *= height
    # Pose of each camera in camera-0 coordinates: w2c_0 · c2w_i.
    relative = torch.linalg.inv(c2w[0]) @ c2w
    rotation, origin = relative[:, :3, :3], relative[:, :3, 3]

    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32) + 0.5, torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij"
    )
    pixels = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)  # [h·w, 3]
    directions = torch.einsum("tij,tjk,pk->tpi", rotation, torch.linalg.inv(K), pixels)
    directions = F.normalize(directions, dim=-1)
    moments = torch.cross(origin[:, None].expand_as(directions), directions, dim=-1)
    plucker = torch.cat([directions, moments], dim=-1)  # [T, h·w, 6]
    return plucker.transpose(1, 2).reshape(len(c2w), 6, height, width)


def reference_layout(num_views: int, reference_index: int) -> list[int]:
    """Source view of each slot of the student sequence: the reference first, then every view
    (the reference viewpoint is regenerated as a target too)."""
    if not 0 <= reference_index < num_views:
        raise ValueError(f"reference_index {reference_index} is outside 0..{num_views - 1}")
    return [reference_index, *range(num_views)]


@dataclass
class StudentConditioning:
    """Everything the student needs for one scene in the layout ``[reference, view_1 … view_N]``."""

    cond: SevaConditioning
    c2w_normalized: torch.Tensor  # [T,4,4]
    K_normalized: torch.Tensor  # [T,3,3]
    input_frame_mask: torch.Tensor  # [T] bool, True at slot 0
    layout: list[int]  # source view index of each slot

    @property
    def num_frames(self) -> int:
        return len(self.layout)

    @property
    def plucker(self) -> torch.Tensor:
        return self.cond.dense_vector

    @property
    def guidance_cameras(self) -> GuidanceCameras:
        return GuidanceCameras(self.c2w_normalized, self.K_normalized, self.input_frame_mask)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StudentConditioning:
        return StudentConditioning(
            cond=self.cond.to(device=device, dtype=dtype),
            c2w_normalized=self.c2w_normalized.to(device),
            K_normalized=self.K_normalized.to(device),
            input_frame_mask=self.input_frame_mask.to(device),
            layout=list(self.layout),
        )


def build_conditioning(
    c2w: ArrayLike,
    K_normalized: ArrayLike,
    input_frame_mask: torch.Tensor,
    input_latents: torch.Tensor,
    clip_embedding: torch.Tensor,
    camera_scale: float = CAMERA_SCALE,
    all_c2ws: ArrayLike | None = None,
) -> tuple[SevaConditioning, torch.Tensor]:
    """Conditioning of one T-frame window (any layout): returns (cond, normalised c2w).

    ``input_latents`` [M,4,h,w] are the clean latents of the M input frames (``input_frame_mask``
    order); ``clip_embedding`` [ctx] or [M,ctx] is averaged over input frames and shared by all frames.
    """
    input_frame_mask = input_frame_mask.bool()
    num_frames = len(input_frame_mask)
    device, dtype = input_latents.device, input_latents.dtype
    height, width = input_latents.shape[-2:]
    c2w_normalized = normalize_cameras(c2w, all_c2ws if all_c2ws is not None else c2w, camera_scale)
    plucker = plucker_coordinates(c2w_normalized, K_normalized, height, width).to(device, dtype)

    mask = input_frame_mask.to(device)
    replace = input_latents.new_zeros(num_frames, input_latents.shape[1] + 1, height, width)
    replace[mask, :-1] = input_latents
    replace[mask, -1] = 1
    embedding = clip_embedding.reshape(-1, clip_embedding.shape[-1]).mean(dim=0).to(device, dtype)
    cond = SevaConditioning(
        crossattn=embedding.expand(num_frames, 1, -1).clone(),
        replace=replace,
        concat=torch.cat([replace[:, -1:], plucker], dim=1),
        dense_vector=plucker,
    )
    return cond, c2w_normalized


def build_student_conditioning(
    c2ws: ArrayLike,
    K_normalized: ArrayLike,
    reference_index: int,
    reference_latent: torch.Tensor,
    reference_embedding: torch.Tensor,
    camera_scale: float = CAMERA_SCALE,
) -> StudentConditioning:
    """Conditioning for the I-Mix2Mix layout of N views: T = N + 1, slot 0 = the (edited) reference.

    ``c2ws`` [N,4,4] OpenCV camera-to-world and ``K_normalized`` [N,3,3] of the N views in scene order;
    ``reference_latent`` [1,4,h,w] (z_ref, VAE latent × 0.18215) and ``reference_embedding`` [ctx]
    (CLIP-H image embedding) of the edited reference. The centring uses the T layout cameras,
    the duplicated reference included, as the official pipeline does.
    """
    c2ws = as_float32_tensor(c2ws)
    K_all = as_float32_tensor(K_normalized)
    layout = reference_layout(len(c2ws), reference_index)
    c2w_layout, K_layout = to_homogeneous(c2ws)[layout], K_all[layout]
    input_frame_mask = torch.zeros(len(layout), dtype=torch.bool)
    input_frame_mask[0] = True
    cond, c2w_normalized = build_conditioning(
        c2w_layout, K_layout, input_frame_mask, reference_latent.reshape(1, *reference_latent.shape[-3:]),
        reference_embedding, camera_scale,
    )
    return StudentConditioning(cond, c2w_normalized, K_layout, input_frame_mask, layout)
