"""METHOD §1.0 pre-processing, exactly as the official SEVA ``transform_img_and_K`` (mode "crop").

Short side → ``size`` with area interpolation (up or down), centre crop to size×size, K scaled by
the per-axis resize factors (they differ slightly because of the ceil), shifted by the crop and
normalised by the crop size.  :func:`paste_back` inverts the framing so that an edited square lands
in the original photo.  Only :func:`prepare_view` needs torch (imported there): the geometry
(:func:`crop_box`, :func:`crop_intrinsics`, :func:`paste_back`) serves the torch-free evaluation too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imix2mix.errors import ImixError
from imix2mix.scene import Scene, View

if TYPE_CHECKING:
    import torch

DEFAULT_SIZE = 576


@dataclass(frozen=True)
class CropBox:
    """Where the size×size crop lies: in the resized image (top, left) and what sizes were involved."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    top: int
    left: int
    size: int

    def original_region(self) -> tuple[float, float, float, float]:
        """The crop in original pixel coordinates as (x0, y0, x1, y1), edges (not centres), floats."""
        height, width = self.original_hw
        resized_h, resized_w = self.resized_hw
        scale_x, scale_y = width / resized_w, height / resized_h
        return (
            self.left * scale_x,
            self.top * scale_y,
            (self.left + self.size) * scale_x,
            (self.top + self.size) * scale_y,
        )


@dataclass(frozen=True, eq=False)
class PreparedView:
    image: torch.Tensor  # [3, S, S] float32 in [-1, 1]
    K_normalized: np.ndarray  # 3×3: pixel K of the crop divided by S (row 0 and row 1)
    box: CropBox


def crop_box(height: int, width: int, size: int = DEFAULT_SIZE) -> CropBox:
    """The official resize-then-centre-crop geometry for a height×width image."""
    if size < 1:
        raise ImixError(f"crop size must be positive, got {size}")
    scale = size / min(height, width)
    resized_h, resized_w = math.ceil(scale * height), math.ceil(scale * width)
    return CropBox(
        original_hw=(height, width),
        resized_hw=(resized_h, resized_w),
        top=int(resized_h / 2) - size // 2,
        left=int(resized_w / 2) - size // 2,
        size=size,
    )


def crop_intrinsics(K: np.ndarray, box: CropBox) -> np.ndarray:
    """Normalised K of the crop: rows scaled by the resize factors, minus the crop offset, over size."""
    height, width = box.original_hw
    resized_h, resized_w = box.resized_hw
    K_crop = np.array(K, dtype=np.float64, copy=True)
    K_crop[0] *= resized_w / width
    K_crop[1] *= resized_h / height
    K_crop[0, 2] -= box.left
    K_crop[1, 2] -= box.top
    K_crop[0] /= box.size
    K_crop[1] /= box.size
    K_crop[2] = [0.0, 0.0, 1.0]
    return K_crop


def prepare_view(view: View, size: int = DEFAULT_SIZE) -> PreparedView:
    import torch  # here, not at the top: the crop geometry is used torch-free (evaluation in the flow process)
    import torch.nn.functional as F

    box = crop_box(view.height, view.width, size)
    pixels = torch.from_numpy(np.array(view.image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    resized = F.interpolate(pixels[None], size=box.resized_hw, mode="area")[0]
    crop = resized[:, box.top : box.top + size, box.left : box.left + size]
    return PreparedView(image=(crop * 2.0 - 1.0).contiguous(), K_normalized=crop_intrinsics(view.K, box), box=box)


def prepare_views(scene: Scene, size: int = DEFAULT_SIZE) -> list[PreparedView]:
    return [prepare_view(view, size) for view in scene.views]


def paste_back(edited: np.ndarray, view: View, box: CropBox) -> np.ndarray:
    """Place an edited square (any resolution, H×W×3 uint8) into the original photo's framing.

    The square covers the crop, so it is resized to the crop's extent in original pixels; pixels
    fully inside that extent take the edit, everything else keeps the original photo.
    """
    edited = np.asarray(edited)
    if edited.dtype != np.uint8 or edited.ndim != 3 or edited.shape[2] != 3:
        raise ImixError(f"paste_back expects an H×W×3 uint8 image, got {edited.shape} {edited.dtype}")
    if (view.height, view.width) != box.original_hw:
        raise ImixError(f"view {view.name} is {view.height}×{view.width} but the crop box is for {box.original_hw}")
    x0, y0, x1, y1 = box.original_region()
    # Whole pixels inside the crop, so the source box below stays within the edited square.
    left, top = math.ceil(x0 - 1e-9), math.ceil(y0 - 1e-9)
    right, bottom = min(math.floor(x1 + 1e-9), view.width), min(math.floor(y1 + 1e-9), view.height)
    edited_h, edited_w = edited.shape[:2]
    per_pixel_x, per_pixel_y = edited_w / (x1 - x0), edited_h / (y1 - y0)
    source_box = (
        (left - x0) * per_pixel_x,
        (top - y0) * per_pixel_y,
        min((right - x0) * per_pixel_x, edited_w),
        min((bottom - y0) * per_pixel_y, edited_h),
    )
    patch = Image.fromarray(edited).resize((right - left, bottom - top), Image.Resampling.LANCZOS, box=source_box)
    result = np.array(view.image, copy=True)
    result[top:bottom, left:right] = np.asarray(patch)
    return result
