"""A scene: 2–32 posed photos of one subject, validated and immutable.

``load_scene`` reads a scene folder in one of three ways (``loader="auto"`` picks the first that applies):

1. ``transforms.json`` (NeRF / nerfstudio): OpenGL camera-to-world matrices, converted to OpenCV.
2. a COLMAP sparse model in ``sparse/0`` (or ``sparse``), read with pycolmap.
3. photos only: structure from motion with pycolmap (:func:`imix2mix.poses.estimate_poses`).

EXIF orientation: poses in a ``transforms.json`` or COLMAP model were estimated on some orientation of
the pixels, and COLMAP, nerfstudio and the official SEVA parser all use the *stored* pixels.  So for
posed scenes a photo is used as stored, unless the frame says ``"exif_orientation_applied": true``
(``imix2mix poses`` writes this) or the recorded w/h match only the EXIF-rotated size.  Photos posed
here by SfM always have the orientation applied (SfM runs on the rotated pixels).

If the image on disk has another size than the w/h recorded with its intrinsics (e.g. a downscaled
copy), K is scaled to the image's actual size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imix2mix.errors import ConfigError, RegistrationError, SceneError
from imix2mix.files import atomic_write_text
from imix2mix.images import check_no_duplicates, list_images, read_image, read_metadata
from imix2mix.poses import (
    PoseReport,
    SfmOptions,
    SfmPhoto,
    estimate_poses,
    find_colmap_model,
    read_colmap_model,
)

MIN_VIEWS = 2
MAX_VIEWS = 32
TRANSFORMS_FILE = "transforms.json"
IMAGES_DIR = "images"
ROTATION_TOLERANCE = 1e-3
# Downscaled copies round their sizes; a larger aspect change means a different (e.g. rotated) image.
ASPECT_TOLERANCE = 0.02
# OpenGL (x right, y up, z backward) <-> OpenCV (x right, y down, z forward): negate camera y and z.
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])

PoseSource = Literal["transforms", "colmap", "sfm"]
LoaderName = Literal["auto", "transforms", "colmap", "sfm"]
LOADERS: tuple[str, ...] = ("auto", "transforms", "colmap", "sfm")


def _frozen_array(array: Any, dtype: type, shape: tuple[int, ...] | None, what: str, where: str | Path) -> np.ndarray:
    try:
        result = np.array(array, dtype=dtype, copy=True)
    except (TypeError, ValueError):
        raise SceneError(where, f"{what} is not numeric") from None
    if shape is not None and result.shape != shape:
        raise SceneError(where, f"{what} must have shape {shape}, got {result.shape}")
    result.setflags(write=False)
    return result


def intrinsics_problem(K: np.ndarray) -> str | None:
    """Why ``K`` is not a usable pinhole intrinsics matrix, or None."""
    if not np.all(np.isfinite(K)):
        return f"intrinsics contain NaN or infinity: {K.tolist()}"
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        return f"focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}"
    if not np.allclose(K[2], [0.0, 0.0, 1.0]) or K[1, 0] != 0:
        return f"not a pinhole intrinsics matrix (last row must be [0, 0, 1]): {K.tolist()}"
    return None


def pose_problem(c2w: np.ndarray) -> str | None:
    """Why ``c2w`` is not a rigid camera-to-world matrix (finite, orthonormal rotation, det +1), or None."""
    if not np.all(np.isfinite(c2w)):
        return "camera pose contains NaN or infinity"
    if not np.allclose(c2w[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        return f"camera pose's last row must be [0, 0, 0, 1], got {c2w[3].tolist()}"
    rotation = c2w[:3, :3]
    deviation = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
    if deviation > ROTATION_TOLERANCE:
        return f"camera pose's rotation is not orthonormal (|RᵀR − I| = {deviation:.3g}; scaled or sheared?)"
    determinant = float(np.linalg.det(rotation))
    if abs(determinant - 1.0) > ROTATION_TOLERANCE:
        return f"camera pose's rotation has determinant {determinant:.4f}, not +1 (a reflection?)"
    return None


@dataclass(frozen=True, eq=False)
class View:
    """One posed photo.  Arrays are copied and made read-only."""

    name: str  # stable: file name relative to the scene's image folder
    image: np.ndarray  # H×W×3 uint8 RGB
    K: np.ndarray  # 3×3 float64 pixel intrinsics for this image's own size
    c2w: np.ndarray  # 4×4 float64 camera-to-world, OpenCV (x right, y down, z forward)
    path: Path | None = None

    def __post_init__(self) -> None:
        where = self.path if self.path is not None else self.name
        image = np.asarray(self.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise SceneError(where, f"image must be H×W×3 uint8, got {image.shape} {image.dtype}")
        if image.flags.writeable or not image.flags.c_contiguous:
            image = np.ascontiguousarray(image).copy()
            image.setflags(write=False)
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "K", _frozen_array(self.K, np.float64, (3, 3), "K", where))
        object.__setattr__(self, "c2w", _frozen_array(self.c2w, np.float64, (4, 4), "c2w", where))
        object.__setattr__(self, "path", None if self.path is None else Path(self.path))
        problem = intrinsics_problem(self.K) or pose_problem(self.c2w)
        if problem:
            raise SceneError(where, problem)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True, eq=False)
class Scene:
    """2–32 posed views of one subject, in the source's order."""

    views: tuple[View, ...]
    root: Path | None = None
    pose_source: str = "transforms"
    registration: PoseReport | None = None

    def __post_init__(self) -> None:
        views = tuple(self.views)
        object.__setattr__(self, "views", views)
        object.__setattr__(self, "root", None if self.root is None else Path(self.root))
        if not MIN_VIEWS <= len(views) <= MAX_VIEWS:
            raise SceneError(self.root, f"a scene needs {MIN_VIEWS} to {MAX_VIEWS} views, got {len(views)}")
        names = [view.name for view in views]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise SceneError(self.root, f"view names must be unique; repeated: {', '.join(repeated)}")
        if self.pose_source not in ("transforms", "colmap", "sfm"):
            raise SceneError(self.root, f"unknown pose source {self.pose_source!r}")

    @property
    def name(self) -> str:
        return self.root.name if self.root is not None else "scene"

    @cached_property
    def content_hash(self) -> str:
        """sha256 over names, pixels, K and c2w of every view, in order: identifies the scene in caches."""
        digest = hashlib.sha256(b"imix2mix-scene-v1")
        for view in self.views:
            digest.update(view.name.encode("utf-8") + b"\0")
            digest.update(np.asarray(view.image.shape, dtype="<i8").tobytes())
            digest.update(view.image.tobytes())
            digest.update(view.K.astype("<f8").tobytes())
            digest.update(view.c2w.astype("<f8").tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self) -> Iterator[View]:
        return iter(self.views)

    def __getitem__(self, index: int) -> View:
        return self.views[index]


# ---------------------------------------------------------------------------------------------------
# Shared by the posed loaders


def _view_name(path: Path, root: Path) -> str:
    """Name relative to ``root/images`` when the photo lives there, else relative to ``root``."""
    for base in (root / IMAGES_DIR, root):
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return path.name


def _read_posed_photo(
    path: Path, recorded_wh: tuple[int, int] | None, orientation_applied: bool | None
) -> np.ndarray:
    """Read a photo in the orientation its recorded poses refer to (see the module docstring)."""
    metadata = read_metadata(path)
    apply = bool(orientation_applied)
    if orientation_applied is None and metadata.orientation != 1 and recorded_wh is not None:
        apply = tuple(recorded_wh) == metadata.oriented_size and tuple(recorded_wh) != metadata.stored_size
    return read_image(path, apply_exif_orientation=apply)


def _scale_intrinsics(K: np.ndarray, recorded_wh: tuple[float, float], image: np.ndarray, where: Path) -> np.ndarray:
    """Scale K given for a recorded_w × recorded_h image to the image's actual size."""
    height, width = image.shape[:2]
    recorded_w, recorded_h = recorded_wh
    if (width, height) == (recorded_w, recorded_h):
        return K
    scale_x, scale_y = width / recorded_w, height / recorded_h
    if abs(scale_x / scale_y - 1.0) > ASPECT_TOLERANCE:
        raise SceneError(
            where,
            f"image is {width}×{height} but its intrinsics are for {recorded_w:g}×{recorded_h:g} (a different aspect"
            " ratio: wrong or rotated photo?)",
        )
    scaled = K.copy()
    scaled[0] *= scale_x
    scaled[1] *= scale_y
    scaled[2] = [0.0, 0.0, 1.0]
    return scaled


# ---------------------------------------------------------------------------------------------------
# transforms.json


def _number(value: Any, key: str, where: str, json_path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SceneError(json_path, f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _matrix(value: Any, key: str, where: str, json_path: Path) -> np.ndarray:
    try:
        matrix = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SceneError(json_path, f"{where}: '{key}' must be a 4×4 (or 3×4) matrix of numbers") from None
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    if matrix.shape != (4, 4):
        raise SceneError(json_path, f"{where}: '{key}' must be a 4×4 (or 3×4) matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise SceneError(json_path, f"{where}: '{key}' contains NaN or infinity")
    return matrix


def _resolve_frame_path(root: Path, file_path: Any, where: str, json_path: Path) -> Path:
    if not isinstance(file_path, str) or not file_path.strip():
        raise SceneError(json_path, f"{where}: 'file_path' must be a non-empty string")
    candidate = (root / file_path).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise SceneError(json_path, f"{where}: file_path '{file_path}' points outside the scene folder {root}")
    if not candidate.exists() and not candidate.suffix:
        # The original NeRF synthetic captures list paths without an extension.
        for suffix in (".png", ".jpg", ".jpeg"):
            if candidate.with_suffix(suffix).is_file():
                return candidate.with_suffix(suffix)
    if not candidate.is_file():
        raise SceneError(candidate, f"image listed in {json_path.name} ({where}) not found")
    return candidate


def _frame_intrinsics(
    settings: dict[str, Any], image: np.ndarray, where: str, json_path: Path
) -> tuple[np.ndarray, tuple[float, float]]:
    """Pixel K and the (w, h) it was given for, from nerfstudio keys or camera_angle_x/y."""
    height, width = image.shape[:2]
    recorded_w = _number(settings["w"], "w", where, json_path) if "w" in settings else float(width)
    recorded_h = _number(settings["h"], "h", where, json_path) if "h" in settings else float(height)
    if recorded_w <= 0 or recorded_h <= 0:
        raise SceneError(json_path, f"{where}: w and h must be positive, got {recorded_w:g}×{recorded_h:g}")

    def focal_from_angle(key: str, extent: float) -> float:
        angle = _number(settings[key], key, where, json_path)
        if not 0 < angle < math.pi:
            raise SceneError(json_path, f"{where}: '{key}' must be an angle in radians in (0, π), got {angle}")
        return 0.5 * extent / math.tan(0.5 * angle)

    if "fl_x" in settings:
        fx = _number(settings["fl_x"], "fl_x", where, json_path)
    elif "camera_angle_x" in settings:
        fx = focal_from_angle("camera_angle_x", recorded_w)
    else:
        raise SceneError(json_path, f"{where}: no focal length (give 'fl_x'/'fl_y' or 'camera_angle_x')")
    if "fl_y" in settings:
        fy = _number(settings["fl_y"], "fl_y", where, json_path)
    elif "camera_angle_y" in settings:
        fy = focal_from_angle("camera_angle_y", recorded_h)
    else:
        fy = fx
    cx = _number(settings["cx"], "cx", where, json_path) if "cx" in settings else recorded_w / 2
    cy = _number(settings["cy"], "cy", where, json_path) if "cy" in settings else recorded_h / 2
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    return K, (recorded_w, recorded_h)


_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y", "exif_orientation_applied")


def load_transforms_scene(root: Path, json_path: Path | None = None) -> Scene:
    """Read a NeRF / nerfstudio ``transforms.json`` scene (frame order as in the file)."""
    json_path = json_path or root / TRANSFORMS_FILE
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SceneError(json_path, "file not found") from None
    except json.JSONDecodeError as exc:
        raise SceneError(json_path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise SceneError(json_path, f"cannot read the file ({exc})") from None
    if not isinstance(data, dict):
        raise SceneError(json_path, "must hold a JSON object with a 'frames' list")
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SceneError(json_path, "missing or empty 'frames' list")
    if not MIN_VIEWS <= len(frames) <= MAX_VIEWS:
        raise SceneError(json_path, f"a scene needs {MIN_VIEWS} to {MAX_VIEWS} frames, got {len(frames)}")
    applied_inverse = np.eye(4)
    if "applied_transform" in data:
        applied = _matrix(data["applied_transform"], "applied_transform", "top level", json_path)
        if abs(np.linalg.det(applied)) < 1e-12:
            raise SceneError(json_path, "'applied_transform' is singular")
        applied_inverse = np.linalg.inv(applied)
    global_settings = {key: data[key] for key in _INTRINSIC_KEYS if key in data}

    paths: list[Path] = []
    for index, frame in enumerate(frames):
        where = f"frame {index}"
        if not isinstance(frame, dict):
            raise SceneError(json_path, f"{where} must be an object with 'file_path' and 'transform_matrix'")
        for key in ("file_path", "transform_matrix"):
            if key not in frame:
                raise SceneError(json_path, f"{where}: missing '{key}'")
        path = _resolve_frame_path(root, frame["file_path"], where, json_path)
        if path in paths:
            raise SceneError(json_path, f"{where}: '{path}' is listed twice (also frame {paths.index(path)})")
        paths.append(path)
    check_no_duplicates(paths, scene=root)

    views = []
    for index, (frame, path) in enumerate(zip(frames, paths)):
        where = f"frame {index} ({frame['file_path']})"
        settings = {**global_settings, **{key: frame[key] for key in _INTRINSIC_KEYS if key in frame}}
        recorded = None
        if "w" in settings and "h" in settings:
            recorded = (settings["w"], settings["h"])
        applied_flag = settings.get("exif_orientation_applied")
        image = _read_posed_photo(path, recorded, None if applied_flag is None else bool(applied_flag))
        K, recorded_wh = _frame_intrinsics(settings, image, where, json_path)
        K = _scale_intrinsics(K, recorded_wh, image, path)
        c2w_gl = _matrix(frame["transform_matrix"], "transform_matrix", where, json_path)
        problem = pose_problem(c2w_gl)
        if problem:
            raise SceneError(json_path, f"{where}: {problem}")
        c2w = applied_inverse @ c2w_gl @ _GL_TO_CV
        views.append(View(name=_view_name(path, root), image=image, K=K, c2w=c2w, path=path))
    return Scene(views=tuple(views), root=root, pose_source="transforms", registration=None)


# ---------------------------------------------------------------------------------------------------
# COLMAP model


def load_colmap_scene(root: Path, model_dir: Path | None = None) -> Scene:
    """Read a scene posed by a COLMAP sparse model; photos are looked up by name in ``images/``."""
    model_dir = model_dir or find_colmap_model(root)
    if model_dir is None:
        raise SceneError(root, "no COLMAP model found (expected sparse/0 or sparse with cameras, images, points3D)")
    cameras, report = read_colmap_model(model_dir)
    image_dir = root / IMAGES_DIR if (root / IMAGES_DIR).is_dir() else root
    photos = {path.relative_to(image_dir).as_posix(): path for path in list_images(image_dir)}
    unposed = [view.name for view in report.views if not view.registered]
    not_in_model = sorted(set(photos) - {view.name for view in report.views})
    if unposed or not_in_model:
        problems = []
        if unposed:
            problems.append(f"images without a pose in the model: {', '.join(unposed)}")
        if not_in_model:
            problems.append(f"photos in {image_dir} missing from the model: {', '.join(not_in_model)}")
        error = RegistrationError(
            model_dir,
            "; ".join(problems) + ". Remove those photos, or re-run COLMAP (or `imix2mix poses`) on the scene.",
            unposed + not_in_model,
        )
        error.report = report  # per-photo details for callers
        raise error
    names = sorted(cameras)
    missing_files = [name for name in names if name not in photos]
    if missing_files:
        raise SceneError(image_dir, f"photos named in the COLMAP model are missing: {', '.join(missing_files)}")
    if not MIN_VIEWS <= len(names) <= MAX_VIEWS:
        raise SceneError(model_dir, f"a scene needs {MIN_VIEWS} to {MAX_VIEWS} posed images, got {len(names)}")
    check_no_duplicates([photos[name] for name in names], scene=root)
    views = []
    for name in names:
        camera, path = cameras[name], photos[name]
        image = _read_posed_photo(path, (camera.width, camera.height), None)
        K = _scale_intrinsics(camera.K, (camera.width, camera.height), image, path)
        views.append(View(name=name, image=image, K=K, c2w=camera.c2w, path=path))
    return Scene(views=tuple(views), root=root, pose_source="colmap", registration=report)


# ---------------------------------------------------------------------------------------------------
# Photos only: structure from motion


def scene_photos(root: Path) -> list[Path]:
    """The photos of an unposed scene: ``root/images/*`` if that folder exists, else ``root/*``."""
    image_dir = root / IMAGES_DIR if (root / IMAGES_DIR).is_dir() else root
    photos = list_images(image_dir)
    if not photos:
        raise SceneError(image_dir, "no photos found (looked for .jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff)")
    if len(photos) < MIN_VIEWS:
        raise SceneError(image_dir, f"only one photo ({photos[0].name}); a scene needs {MIN_VIEWS} to {MAX_VIEWS} photos")
    if len(photos) > MAX_VIEWS:
        raise SceneError(image_dir, f"{len(photos)} photos; a scene holds at most {MAX_VIEWS}")
    return photos


def load_sfm_scene(root: Path, options: SfmOptions | None = None) -> Scene:
    """Pose the scene's photos with structure from motion (EXIF orientation applied first)."""
    paths = scene_photos(root)
    check_no_duplicates(paths, scene=root)
    photos = [SfmPhoto(_view_name(path, root), read_image(path), read_metadata(path)) for path in paths]
    cameras, report = estimate_poses(photos, scene_path=root, options=options)
    views = [
        View(name=photo.name, image=photo.image, K=cameras[photo.name].K, c2w=cameras[photo.name].c2w, path=path)
        for photo, path in zip(photos, paths)
    ]
    return Scene(views=tuple(views), root=root, pose_source="sfm", registration=report)


def _sfm_options(overrides: dict[str, Any]) -> SfmOptions:
    known = {field.name for field in fields(SfmOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown structure-from-motion option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return SfmOptions(**overrides)


def detect_loader(root: Path) -> str:
    if (root / TRANSFORMS_FILE).is_file():
        return "transforms"
    if find_colmap_model(root) is not None:
        return "colmap"
    return "sfm"


def load_scene(path: str | Path, loader: LoaderName | None = "auto", **sfm_options: Any) -> Scene:
    """Load a scene folder (or a ``transforms.json`` file) as a validated, posed :class:`Scene`.

    ``loader="auto"`` uses ``transforms.json`` if present, else a COLMAP model in ``sparse/0`` or
    ``sparse``, else runs structure from motion on the photos.  ``sfm_options`` are
    :class:`~imix2mix.poses.SfmOptions` fields.
    """
    path = Path(path).expanduser()
    loader = loader or "auto"
    if loader not in LOADERS:
        raise ConfigError(f"unknown scene loader {loader!r}; choose one of {', '.join(LOADERS)}")
    options = _sfm_options(sfm_options)
    if path.is_file() and path.suffix.lower() == ".json":
        if loader not in ("auto", "transforms"):
            raise ConfigError(f"{path} is a JSON file; only the 'transforms' loader reads it")
        return load_transforms_scene(path.parent, path)
    if not path.exists():
        raise SceneError(path, "scene folder does not exist")
    if not path.is_dir():
        raise SceneError(path, "not a scene folder (expected a folder of photos, or a transforms.json file)")
    if loader == "auto":
        loader = detect_loader(path)
    if loader == "transforms":
        return load_transforms_scene(path)
    if loader == "colmap":
        return load_colmap_scene(path)
    return load_sfm_scene(path, options)


# ---------------------------------------------------------------------------------------------------
# Writing a scene's cameras as a nerfstudio transforms.json


def transforms_dict(scene: Scene, root: Path | None = None, file_paths: Sequence[str] | None = None) -> dict[str, Any]:
    """The scene's cameras as nerfstudio ``transforms.json`` content (OpenGL c2w, per-frame intrinsics).

    Frames name the views' files relative to ``root``, or ``file_paths`` (one per view, e.g. edited
    images of the same size written beside the file) when given.
    """
    root = Path(root if root is not None else scene.root or ".")
    if file_paths is not None and len(file_paths) != len(scene.views):
        raise SceneError(None, f"{len(file_paths)} file paths for {len(scene.views)} views")
    frames = []
    for index, view in enumerate(scene.views):
        if file_paths is not None:
            file_path = file_paths[index]
        elif view.path is None:
            raise SceneError(None, f"view {view.name} has no file path to write into transforms.json")
        else:
            file_path = os.path.relpath(view.path.resolve(), root.resolve())
        frames.append(
            {
                "file_path": Path(file_path).as_posix(),
                "transform_matrix": (view.c2w @ _GL_TO_CV).tolist(),
                "fl_x": float(view.K[0, 0]),
                "fl_y": float(view.K[1, 1]),
                "cx": float(view.K[0, 2]),
                "cy": float(view.K[1, 2]),
                "w": view.width,
                "h": view.height,
                # Our photos are always as displayed (EXIF applied) when posed by SfM.
                "exif_orientation_applied": scene.pose_source == "sfm",
            }
        )
    content: dict[str, Any] = {"camera_model": "PINHOLE", "pose_source": scene.pose_source, "frames": frames}
    if scene.registration is not None and scene.registration.mean_reprojection_error is not None:
        content["mean_reprojection_error"] = scene.registration.mean_reprojection_error
    return content


def write_transforms_json(scene: Scene, out_path: str | Path, *, force: bool = False) -> Path:
    """Write ``transforms_dict(scene)`` atomically (temp file + rename); refuse to overwrite unless ``force``."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise SceneError(out_path, "already exists; pass --force to overwrite it")
    if not out_path.parent.is_dir():
        raise SceneError(out_path.parent, "output folder does not exist")
    text = json.dumps(transforms_dict(scene, out_path.parent), indent=2)
    return atomic_write_text(out_path, text + "\n")
