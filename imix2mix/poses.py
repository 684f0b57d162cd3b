"""Camera poses from COLMAP: structure from motion on a few photos, and reading COLMAP sparse models.

This module is the only importer of pycolmap in the project.  zlib must be loaded before pycolmap:
the pycolmap 4.2.1 wheel statically contains and exports its own zlib, and when it loads first the
system libz binds to that copy; the next PNG save or ``zlib.compress`` then corrupts the heap and
usually hangs in glog's signal handler (shared/STACK.md §4.5).  Anything else that needs pycolmap
imports it from here (``from imix2mix.poses import pycolmap``).
"""

from __future__ import annotations

import zlib  # noqa: F401, I001  (must precede pycolmap; see the module docstring)

import importlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imix2mix.errors import ConfigError, RegistrationError, SceneError
from imix2mix.images import PhotoMetadata



class _ImportedOnFirstUse:
    """A stand-in for the pycolmap module that imports it at the first attribute access.

    The rest of the library (scenes from transforms.json, the engine, the GPU benchmark) must import
    on machines without pycolmap; zlib is already loaded above by then, so the order stays safe.
    """

    def __getattr__(self, name: str):
        return getattr(importlib.import_module("pycolmap"), name)


pycolmap = _ImportedOnFirstUse()

MIN_SFM_PHOTOS = 3
# Camera models SfM may use, with the extra (distortion) parameters that follow f, cx, cy when a
# focal-length prior is given.
SFM_CAMERA_MODELS = {"SIMPLE_PINHOLE": "", "PINHOLE": "", "SIMPLE_RADIAL": ",0", "RADIAL": ",0,0"}
COLMAP_MODEL_FILES = ("cameras", "images", "points3D")


@dataclass(frozen=True)
class SfmOptions:
    """Structure-from-motion settings, tuned for 3–12 photos of one subject.

    COLMAP's defaults (100 initial-pair inliers, 16° triangulation angle, models of at least 10 images)
    are meant for large collections and reject most sparse captures.  The ratio test is relaxed to 0.9
    because few photos give few matches: on the face sample it is what registers the fourth photo.
    """

    camera_model: str = "SIMPLE_RADIAL"
    max_image_size: int = 1600
    max_num_features: int = 8192
    match_max_ratio: float = 0.9
    min_num_inliers: int = 15  # per verified image pair
    init_min_num_inliers: int = 30
    init_min_tri_angle: float = 4.0  # degrees
    abs_pose_min_num_inliers: int = 12
    abs_pose_min_inlier_ratio: float = 0.1
    min_model_size: int = MIN_SFM_PHOTOS
    num_threads: int = 1
    seed: int = 0
    verbose: bool = False


@dataclass(frozen=True)
class ViewRegistration:
    name: str
    registered: bool
    mean_reprojection_error: float | None  # pixels, over this photo's observations of 3D points
    num_observations: int = 0


@dataclass(frozen=True)
class PoseReport:
    """How well the photos of a scene are posed (SfM or a COLMAP model)."""

    source: str  # "sfm" | "colmap"
    views: tuple[ViewRegistration, ...]
    mean_reprojection_error: float | None
    num_points3D: int
    seconds: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def unregistered(self) -> list[str]:
        return [view.name for view in self.views if not view.registered]

    def view(self, name: str) -> ViewRegistration | None:
        return next((view for view in self.views if view.name == name), None)


@dataclass(frozen=True)
class EstimatedCamera:
    name: str
    K: np.ndarray  # 3×3 pixel intrinsics for the image as given
    c2w: np.ndarray  # 4×4 camera-to-world, OpenCV
    width: int
    height: int
    distortion: tuple[float, ...] = ()  # radial terms of the estimated camera (ignored downstream, as officially)


@dataclass(frozen=True)
class SfmPhoto:
    """One photo handed to structure from motion: the decoded pixels plus what EXIF said."""

    name: str
    image: np.ndarray  # H×W×3 uint8, as the scene will use it (orientation applied)
    metadata: PhotoMetadata | None = None


def _set_log_level(verbose: bool) -> None:
    pycolmap.logging.minloglevel = 0 if verbose else 2


def _c2w_from_cam_from_world(cam_from_world: pycolmap.Rigid3d) -> np.ndarray:
    w2c = np.eye(4)
    w2c[:3, :4] = cam_from_world.matrix()
    return np.linalg.inv(w2c)


def _per_image_reprojection(rec: pycolmap.Reconstruction, image: pycolmap.Image) -> tuple[float | None, int]:
    errors = []
    for point2D in image.points2D:
        if not point2D.has_point3D():
            continue
        projected = image.project_point(rec.points3D[point2D.point3D_id].xyz)
        if projected is not None:
            errors.append(float(np.linalg.norm(np.asarray(projected).ravel() - np.asarray(point2D.xy).ravel())))
    return (float(np.mean(errors)) if errors else None), len(errors)


def _report(
    rec: pycolmap.Reconstruction | None,
    names: Sequence[str],
    name_in_model: dict[str, str],
    source: str,
    seconds: float | None,
    notes: tuple[str, ...] = (),
) -> PoseReport:
    by_name = {} if rec is None else {image.name: image for image in rec.images.values()}
    views = []
    for name in names:
        image = by_name.get(name_in_model[name])
        if image is None or not image.has_pose:
            views.append(ViewRegistration(name, False, None, 0))
            continue
        error, count = _per_image_reprojection(rec, image)
        views.append(ViewRegistration(name, True, error, count))
    overall = None
    if rec is not None and rec.num_points3D() > 0:
        overall = float(rec.compute_mean_reprojection_error())
    return PoseReport(
        source=source,
        views=tuple(views),
        mean_reprojection_error=overall,
        num_points3D=0 if rec is None else int(rec.num_points3D()),
        seconds=seconds,
        notes=notes,
    )


def _camera_from_model(rec: pycolmap.Reconstruction, image: pycolmap.Image, name: str) -> EstimatedCamera:
    camera = rec.cameras[image.camera_id]
    return EstimatedCamera(
        name=name,
        K=np.asarray(camera.calibration_matrix(), dtype=np.float64),
        c2w=_c2w_from_cam_from_world(image.cam_from_world()),
        width=int(camera.width),
        height=int(camera.height),
        distortion=tuple(float(camera.params[i]) for i in camera.extra_params_idxs()),
    )


# ---------------------------------------------------------------------------------------------------
# COLMAP sparse models


def find_colmap_model(scene_dir: str | Path) -> Path | None:
    """``sparse/0`` or ``sparse`` holding cameras/images/points3D (.bin or .txt), else None."""
    scene_dir = Path(scene_dir)
    for candidate in (scene_dir / "sparse" / "0", scene_dir / "sparse"):
        for suffix in (".bin", ".txt"):
            if all((candidate / f"{stem}{suffix}").is_file() for stem in COLMAP_MODEL_FILES):
                return candidate
    return None


def read_colmap_model(model_dir: str | Path) -> tuple[dict[str, EstimatedCamera], PoseReport]:
    """Cameras of every posed image of a COLMAP sparse model, keyed by image name, and its report."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SceneError(model_dir, "COLMAP model folder does not exist")
    missing = [stem for stem in COLMAP_MODEL_FILES if not any((model_dir / f"{stem}{s}").is_file() for s in (".bin", ".txt"))]
    if missing:
        raise SceneError(model_dir, f"not a COLMAP sparse model: missing {', '.join(m + '.bin/.txt' for m in missing)}")
    _set_log_level(False)
    try:
        rec = pycolmap.Reconstruction(model_dir)
    except Exception as exc:  # pycolmap raises RuntimeError/ValueError with C++ messages for damaged files
        raise SceneError(model_dir, f"cannot read the COLMAP model ({type(exc).__name__}: {str(exc).strip()[:300]})") from None
    cameras = {}
    for image in rec.images.values():
        if image.has_pose:
            cameras[image.name] = _camera_from_model(rec, image, image.name)
    names = sorted(image.name for image in rec.images.values())
    report = _report(rec, names, {name: name for name in names}, "colmap", None)
    return cameras, report


# ---------------------------------------------------------------------------------------------------
# Structure from motion


def _shared_camera(photos: Sequence[SfmPhoto]) -> bool:
    """One camera for all photos when they have the same size and (where EXIF says) the same camera."""
    sizes = {photo.image.shape[:2] for photo in photos}
    cameras = {photo.metadata.camera if photo.metadata else None for photo in photos}
    focals = {photo.metadata.focal_length_35mm if photo.metadata else None for photo in photos}
    return len(sizes) == 1 and len(cameras) == 1 and len(focals) == 1


def _reader_options(photo: SfmPhoto, model: str) -> pycolmap.ImageReaderOptions:
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = model
    height, width = photo.image.shape[:2]
    focal = photo.metadata.focal_length_pixels(width, height) if photo.metadata else None
    if focal is not None:
        # Given parameters mark the focal length as a prior (has_prior_focal_length) for the mapper.
        focals = f"{focal},{focal}" if model == "PINHOLE" else f"{focal}"
        reader.camera_params = f"{focals},{width / 2},{height / 2}{SFM_CAMERA_MODELS[model]}"
    return reader


def estimate_poses(
    photos: Sequence[SfmPhoto],
    *,
    scene_path: str | Path | None = None,
    options: SfmOptions | None = None,
    work_dir: str | Path | None = None,
) -> tuple[dict[str, EstimatedCamera], PoseReport]:
    """Pose ``photos`` with incremental SfM (SIFT, exhaustive matching, incremental mapping).

    Returns the camera of every photo (from the largest model) and the registration report.  Raises
    :class:`SceneError` for fewer than 3 photos and :class:`RegistrationError` when any photo is left out.
    """
    options = options or SfmOptions()
    names = [photo.name for photo in photos]
    if len(photos) < MIN_SFM_PHOTOS:
        raise SceneError(
            scene_path,
            f"{len(photos)} photo(s) without poses: structure from motion needs at least {MIN_SFM_PHOTOS} photos"
            " (two views never reconstruct reliably). Supply poses with a transforms.json or a COLMAP model"
            " (sparse/0), or add photos.",
        )
    if len(set(names)) != len(names):
        raise SceneError(scene_path, "photo names must be unique")
    if options.camera_model not in SFM_CAMERA_MODELS:
        raise ConfigError(f"camera model {options.camera_model!r} is not supported for SfM (use one of {sorted(SFM_CAMERA_MODELS)})")
    _set_log_level(options.verbose)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imix2mix-sfm-", dir=work_dir) as tmp:
        work = Path(tmp)
        image_dir, model_dir, database = work / "images", work / "sparse", work / "database.db"
        image_dir.mkdir()
        model_dir.mkdir()
        # COLMAP gets the pixels the scene will use (orientation applied, modes converted), losslessly.
        name_in_model = {}
        for index, photo in enumerate(photos):
            name_in_model[photo.name] = f"{index:03d}.png"
            Image.fromarray(photo.image).save(image_dir / name_in_model[photo.name], compress_level=1)

        extraction = pycolmap.FeatureExtractionOptions()
        extraction.num_threads = options.num_threads
        extraction.max_image_size = options.max_image_size
        extraction.sift.max_num_features = options.max_num_features
        try:
            if _shared_camera(photos):
                pycolmap.extract_features(
                    database, image_dir, image_names=[name_in_model[n] for n in names],
                    camera_mode=pycolmap.CameraMode.SINGLE,
                    reader_options=_reader_options(photos[0], options.camera_model),
                    extraction_options=extraction, device=pycolmap.Device.cpu,
                )
            else:
                for photo in photos:
                    pycolmap.extract_features(
                        database, image_dir, image_names=[name_in_model[photo.name]],
                        camera_mode=pycolmap.CameraMode.PER_IMAGE,
                        reader_options=_reader_options(photo, options.camera_model),
                        extraction_options=extraction, device=pycolmap.Device.cpu,
                    )
            matching = pycolmap.FeatureMatchingOptions()
            matching.num_threads = options.num_threads
            matching.sift.max_ratio = options.match_max_ratio
            verification = pycolmap.TwoViewGeometryOptions()
            verification.min_num_inliers = options.min_num_inliers
            verification.ransac.random_seed = options.seed
            pycolmap.match_exhaustive(
                database, matching_options=matching, verification_options=verification, device=pycolmap.Device.cpu
            )
            mapping = pycolmap.IncrementalPipelineOptions()
            mapping.min_model_size = min(options.min_model_size, len(photos))
            mapping.num_threads = options.num_threads
            mapping.random_seed = options.seed
            mapping.mapper.init_min_num_inliers = options.init_min_num_inliers
            mapping.mapper.init_min_tri_angle = options.init_min_tri_angle
            mapping.mapper.abs_pose_min_num_inliers = options.abs_pose_min_num_inliers
            mapping.mapper.abs_pose_min_inlier_ratio = options.abs_pose_min_inlier_ratio
            models = pycolmap.incremental_mapping(database, image_dir, model_dir, options=mapping)
        except Exception as exc:  # C++ errors surface as RuntimeError/ValueError with COLMAP's text
            raise SceneError(scene_path, f"structure from motion failed ({type(exc).__name__}: {str(exc).strip()[:300]})") from None
        rec = max(models.values(), key=lambda r: r.num_reg_images()) if models else None
        seconds = time.perf_counter() - started
        report = _report(rec, names, name_in_model, "sfm", seconds)
        cameras = {}
        if rec is not None:
            model_images = {image.name: image for image in rec.images.values() if image.has_pose}
            for name in names:
                image = model_images.get(name_in_model[name])
                if image is not None:
                    cameras[name] = _camera_from_model(rec, image, name)

    if report.unregistered:
        missing = report.unregistered
        how_many = "none of the photos" if len(missing) == len(names) else f"{len(missing)} of {len(names)} photos"
        error = RegistrationError(
            scene_path,
            f"structure from motion could not pose {how_many}: {', '.join(missing)}. Add photos with more overlap"
            " (neighbouring photos should share most of the view, with textured background), or supply poses"
            " with a transforms.json or a COLMAP model (sparse/0).",
            missing,
        )
        error.report = report  # lets callers show per-photo details
        raise error
    return cameras, report
