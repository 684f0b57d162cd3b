"""Synthetic posed scenes for tests: a textured room corner with a box, ray-cast with numpy.

Adapted from shared/STACK.md Appendix A (smaller images so SfM tests stay fast).  Ground truth is
known exactly, and the writers below produce the on-disk formats independently of the library:
``transforms.json`` by hand (OpenGL convention) and a COLMAP text model by hand (the documented
``cameras.txt`` / ``images.txt`` / ``points3D.txt`` format of COLMAP 3.x).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.spatial.transform import Rotation

GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class GroundTruthView:
    name: str
    image: np.ndarray  # H×W×3 uint8
    K: np.ndarray  # 3×3
    c2w: np.ndarray  # 4×4 OpenCV


def _make_texture(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    texture = np.zeros((size, size, 3), np.float32)
    for scale in (4, 8, 16, 32, 64):  # multi-scale smooth noise
        noise = rng.random((size // scale + 2, size // scale + 2, 3)).astype(np.float32)
        up = Image.fromarray((noise * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        texture += np.asarray(up, np.float32) / 255 / 5
    pil = Image.fromarray(np.clip(texture * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(350):  # blobs and shapes: SIFT-friendly, non-repeating
        x, y = rng.integers(0, size, 2)
        extent = int(rng.integers(8, 70))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + extent, y + extent], fill=colour)
        else:
            draw.rectangle([x, y, x + extent, y + int(extent * rng.uniform(0.3, 2))], fill=colour)
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(0.7)), np.float32) / 255


_PLANES = [  # origin, in-plane axes a and b, extent (m) along a and b, texture index
    (np.array([-4.0, -1.0, 0.0]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), (8.0, 7.0), 0),  # floor
    (np.array([-4.0, 6.0, 0.0]), np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), (8.0, 4.0), 1),  # back wall
    (np.array([-4.0, -1.0, 0.0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]), (7.0, 4.0), 2),  # left wall
    (np.array([0.5, 2.0, 0.0]), np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), (1.2, 1.0), 3),  # box front
    (np.array([0.5, 2.0, 0.0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]), (1.2, 1.0), 4),  # box side
    (np.array([0.5, 2.0, 1.0]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), (1.2, 1.2), 5),  # box top
]


@lru_cache(maxsize=2)
def _textures(first_seed: int = 0) -> tuple[np.ndarray, ...]:
    return tuple(_make_texture(1024, seed) for seed in range(first_seed, first_seed + 6))


def _look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world looking from centre at target, world z up."""
    forward = target - centre
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, down, forward], axis=1)
    c2w[:3, 3] = centre
    return c2w


def render(K: np.ndarray, c2w: np.ndarray, width: int, height: int, texture_seed: int = 0) -> np.ndarray:
    """Ray-cast the room; ``texture_seed`` picks another set of surface textures (the same geometry
    painted differently: a 3D-consistent change of every view)."""
    centre, rotation = c2w[:3, 3], c2w[:3, :3]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pixels = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3).T
    directions = (rotation @ (np.linalg.inv(K) @ pixels)).T
    best = np.full(len(directions), np.inf)
    out = np.zeros((len(directions), 3), np.float32) + 0.5
    textures = _textures(texture_seed)
    for origin, axis_a, axis_b, extent, texture_index in _PLANES:
        normal = np.cross(axis_a, axis_b)
        denominator = directions @ normal
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = ((origin - centre) @ normal) / denominator
        hits = centre + depth[:, None] * directions
        ua, vb = (hits - origin) @ axis_a, (hits - origin) @ axis_b
        ok = (depth > 1e-6) & (depth < best) & (ua >= 0) & (ua <= extent[0]) & (vb >= 0) & (vb <= extent[1])
        texture = textures[texture_index]
        last = texture.shape[0] - 1
        tu, tv = ua[ok] / extent[0] * last, vb[ok] / extent[1] * last
        i0, j0 = np.floor(tv).astype(int), np.floor(tu).astype(int)
        fi, fj = (tv - i0)[:, None], (tu - j0)[:, None]
        i1, j1 = np.minimum(i0 + 1, last), np.minimum(j0 + 1, last)
        out[ok] = (
            texture[i0, j0] * (1 - fi) * (1 - fj) + texture[i1, j0] * fi * (1 - fj)
            + texture[i0, j1] * (1 - fi) * fj + texture[i1, j1] * fi * fj
        )
        best[ok] = depth[ok]
    return (np.clip(out.reshape(height, width, 3), 0, 1) * 255).astype(np.uint8)


def intrinsics(width: int, height: int, focal: float) -> np.ndarray:
    return np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])


def camera_on_arc(index: int, count: int, arc_degrees: float = 70.0) -> np.ndarray:
    target = np.array([0.0, 3.0, 0.8])
    angle = math.radians(-arc_degrees / 2 + arc_degrees * index / max(count - 1, 1))
    centre = np.array([
        target[0] + 5.5 * math.sin(angle), target[1] - 5.5 * math.cos(angle), 1.6 + 0.3 * math.sin(3 * angle)
    ])
    return _look_at(centre, target)


@lru_cache(maxsize=8)
def _render_cached(count: int, width: int, height: int, arc_degrees: float) -> tuple[GroundTruthView, ...]:
    focal = 260.0 * width / 320  # the same field of view at every resolution
    K = intrinsics(width, height, focal)
    views = []
    for index in range(count):
        c2w = camera_on_arc(index, count, arc_degrees)
        image = render(K, c2w, width, height)
        image.setflags(write=False)
        views.append(GroundTruthView(f"view_{index:02d}.png", image, K, c2w))
    return tuple(views)


def render_views(count: int, width: int = 320, height: int = 240, arc_degrees: float = 70.0) -> list[GroundTruthView]:
    return list(_render_cached(count, width, height, arc_degrees))


def write_images(scene_dir: Path, views: list[GroundTruthView]) -> list[Path]:
    image_dir = scene_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for view in views:
        Image.fromarray(view.image).save(image_dir / view.name)
        paths.append(image_dir / view.name)
    return paths


def transforms_frame(view: GroundTruthView, file_path: str, **extra: object) -> dict:
    K = view.K
    height, width = view.image.shape[:2]
    frame = {
        "file_path": file_path,
        "transform_matrix": (view.c2w @ GL_FROM_CV).tolist(),  # OpenCV → OpenGL: negate camera y and z
        "fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]),
        "w": width, "h": height,
    }
    frame.update(extra)
    return frame


def write_transforms(scene_dir: Path, views: list[GroundTruthView], **top_level: object) -> Path:
    """Images plus a nerfstudio transforms.json with per-frame intrinsics."""
    write_images(scene_dir, views)
    content = {"camera_model": "OPENCV", **top_level,
               "frames": [transforms_frame(view, f"images/{view.name}") for view in views]}
    path = scene_dir / "transforms.json"
    path.write_text(json.dumps(content, indent=1))
    return path


def write_colmap_text_model(model_dir: Path, views: list[GroundTruthView], *, skip_pose_of: str | None = None) -> None:
    """A COLMAP 3.x text model (PINHOLE cameras, world-to-camera quaternions wxyz, no points)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    cameras = ["# Camera list with one line of data per camera:"]
    images = ["# Image list with two lines of data per image:"]
    for index, view in enumerate(views, start=1):
        height, width = view.image.shape[:2]
        K = view.K
        fx, fy, cx, cy = (float(value) for value in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
        cameras.append(f"{index} PINHOLE {width} {height} {fx!r} {fy!r} {cx!r} {cy!r}")
        if view.name == skip_pose_of:
            continue
        w2c = np.linalg.inv(view.c2w)
        qx, qy, qz, qw = (float(value) for value in Rotation.from_matrix(w2c[:3, :3]).as_quat())
        tx, ty, tz = (float(value) for value in w2c[:3, 3])
        images.append(f"{index} {qw!r} {qx!r} {qy!r} {qz!r} {tx!r} {ty!r} {tz!r} {index} {view.name}")
        images.append("")  # no 2D points
    (model_dir / "cameras.txt").write_text("\n".join(cameras) + "\n")
    (model_dir / "images.txt").write_text("\n".join(images) + "\n")
    (model_dir / "points3D.txt").write_text("# 3D point list\n")


def umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising ‖s·R·source + t − target‖² (Umeyama 1991)."""
    mean_s, mean_t = source.mean(0), target.mean(0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / len(source)
    U, singular, Vt = np.linalg.svd(covariance)
    sign = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        sign[2, 2] = -1
    rotation = U @ sign @ Vt
    variance = (centred_s**2).sum() / len(source)
    scale = float(np.trace(np.diag(singular) @ sign) / variance)
    return scale, rotation, mean_t - scale * rotation @ mean_s


def rotation_angle_degrees(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))


def relative_rotation_errors(estimated: list[np.ndarray], truth: list[np.ndarray]) -> list[float]:
    """For every pair (i, j): angle between estimated and true relative rotations R_iᵀR_j (degrees)."""
    errors = []
    for i in range(len(truth)):
        for j in range(i + 1, len(truth)):
            true_relative = truth[i][:3, :3].T @ truth[j][:3, :3]
            estimated_relative = estimated[i][:3, :3].T @ estimated[j][:3, :3]
            errors.append(rotation_angle_degrees(true_relative.T @ estimated_relative))
    return errors
