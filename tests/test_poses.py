"""Structure from motion with pycolmap: synthetic scenes with known cameras, the real sample scenes,
failure reports, and the zlib-before-pycolmap import order."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, SCENES
from PIL import Image
from synthetic_scenes import (
    GL_FROM_CV,
    relative_rotation_errors,
    render_views,
    umeyama,
    write_images,
)

from imix2mix.errors import RegistrationError, SceneError
from imix2mix.poses import SfmOptions, SfmPhoto, estimate_poses, find_colmap_model, read_colmap_model
from imix2mix.scene import load_scene

SCENE_EXTENT_M = 5.5  # cameras are 5.5 m from the target


def centre_errors_after_similarity(estimated: list[np.ndarray], truth: list[np.ndarray]) -> np.ndarray:
    source = np.array([c2w[:3, 3] for c2w in estimated])
    target = np.array([c2w[:3, 3] for c2w in truth])
    scale, rotation, translation = umeyama(source, target)
    aligned = (scale * (rotation @ source.T)).T + translation
    return np.linalg.norm(aligned - target, axis=1)


@pytest.mark.parametrize("count", [3, 4, 6])
def test_sfm_recovers_synthetic_cameras(tmp_path: Path, count: int) -> None:
    truth = render_views(count)
    write_images(tmp_path, truth)
    scene = load_scene(tmp_path)  # no transforms.json, no sparse model: auto picks SfM

    assert scene.pose_source == "sfm"
    assert [view.name for view in scene] == [view.name for view in truth]
    report = scene.registration
    assert report is not None and not report.unregistered
    assert all(entry.mean_reprojection_error is not None and entry.mean_reprojection_error < 1.0 for entry in report.views)
    assert report.mean_reprojection_error < 1.0 and report.num_points3D > 50

    rotation_errors = relative_rotation_errors([view.c2w for view in scene], [view.c2w for view in truth])
    assert max(rotation_errors) < 1.0
    assert centre_errors_after_similarity([view.c2w for view in scene], [view.c2w for view in truth]).max() < 0.01 * SCENE_EXTENT_M
    for view, true_view in zip(scene, truth):
        assert view.K[0, 0] == pytest.approx(true_view.K[0, 0], rel=0.03)
        assert view.image.shape == true_view.image.shape


def test_sfm_photos_of_different_sizes_get_their_own_cameras(tmp_path: Path) -> None:
    truth = render_views(4)
    larger = render_views(4, width=400, height=300)  # same field of view, focal 325
    mixed = truth[:3] + [larger[3]]
    write_images(tmp_path, mixed)
    scene = load_scene(tmp_path, loader="sfm")
    assert [view.image.shape[:2] for view in scene] == [(240, 320)] * 3 + [(300, 400)]
    assert scene[3].K[0, 0] == pytest.approx(325.0, rel=0.03)
    assert scene[0].K[0, 0] == pytest.approx(260.0, rel=0.03)
    assert max(relative_rotation_errors([v.c2w for v in scene], [v.c2w for v in mixed])) < 1.0


def test_sfm_uses_exif_focal_length_as_prior(tmp_path: Path) -> None:
    truth = render_views(4)
    (tmp_path / "images").mkdir()
    # 35 mm-equivalent focal for f = 260 px at 320×240: f35 = 260 · 43.27 / 400.
    exif = Image.Exif()
    exif[0x0110] = "Synthetic"
    exif.get_ifd(0x8769)[0xA405] = round(260 * float(np.hypot(36, 24)) / 400)
    for view in truth:
        Image.fromarray(view.image).save(tmp_path / "images" / view.name, exif=exif)
    scene = load_scene(tmp_path)
    assert not scene.registration.unregistered
    assert scene[0].K[0, 0] == pytest.approx(260.0, rel=0.03)
    assert max(relative_rotation_errors([v.c2w for v in scene], [v.c2w for v in truth])) < 1.0


def test_unregistered_photo_raises_registration_error_naming_it(tmp_path: Path) -> None:
    write_images(tmp_path, render_views(3))
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "images" / "zz_noise.png")
    with pytest.raises(RegistrationError) as caught:
        load_scene(tmp_path)
    error = caught.value
    assert error.unregistered == ["zz_noise.png"]
    assert "zz_noise.png" in str(error) and str(tmp_path) in str(error)
    assert "transforms.json" in str(error) and "overlap" in str(error)
    assert error.report.view("view_00.png").registered  # type: ignore[attr-defined]


def test_two_photos_without_poses_ask_for_poses(tmp_path: Path) -> None:
    write_images(tmp_path, render_views(2))
    with pytest.raises(SceneError) as caught:
        load_scene(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and "at least 3 photos" in message and "transforms.json" in message


def test_estimate_poses_rejects_repeated_names() -> None:
    view = render_views(3)[0]
    photos = [SfmPhoto("a.png", view.image), SfmPhoto("a.png", view.image), SfmPhoto("b.png", view.image)]
    with pytest.raises(SceneError, match="unique"):
        estimate_poses(photos)


def test_unknown_sfm_option_is_a_config_error(tmp_path: Path) -> None:
    from imix2mix.errors import ConfigError

    write_images(tmp_path, render_views(3))
    with pytest.raises(ConfigError, match="max_imagesize"):
        load_scene(tmp_path, max_imagesize=800)
    with pytest.raises(ConfigError, match="OPENCV_FISHEYE"):
        load_scene(tmp_path, camera_model="OPENCV_FISHEYE")


def _photos_only_copy(scene: str, destination: Path) -> Path:
    shutil.copytree(SCENES / scene / "images", destination / scene / "images")
    return destination / scene


def _shipped_cameras(scene: str) -> dict[str, np.ndarray]:
    content = json.loads((SCENES / scene / "transforms.json").read_text())
    return {Path(frame["file_path"]).name: np.array(frame["transform_matrix"]) @ GL_FROM_CV for frame in content["frames"]}


def test_sfm_on_face_photos_matches_shipped_poses(tmp_path: Path) -> None:
    started = time.perf_counter()
    scene = load_scene(_photos_only_copy("face", tmp_path))
    seconds = time.perf_counter() - started
    shipped = _shipped_cameras("face")
    errors = relative_rotation_errors([view.c2w for view in scene], [shipped[view.name] for view in scene])
    print(f"face SfM: max relative rotation error {max(errors):.2f} deg, {seconds:.1f} s,"
          f" reprojection {scene.registration.mean_reprojection_error:.3f} px")
    assert len(scene) == 4 and not scene.registration.unregistered
    assert max(errors) <= 3.0


def test_sfm_on_person_small_photos_reports_the_unregistered_photo(tmp_path: Path) -> None:
    # The subject moves between these small (320×512) photos in front of a blank wall: one photo gets
    # only about ten inlier matches per pair.  Settings that force all four in give wrong poses (51° and
    # 133° off), so a clear RegistrationError is the right outcome.  Which photo drops depends on the
    # settings (frame_00175 with the defaults), so the test does not name it.
    with pytest.raises(RegistrationError) as caught:
        load_scene(_photos_only_copy("person-small", tmp_path))
    error = caught.value
    assert len(error.unregistered) == 1
    (left_out,) = error.unregistered
    assert left_out in {"frame_00175.png", "frame_00258.png", "frame_00277.png", "frame_00295.png"}
    assert "1 of 4 photos" in str(error) and left_out in str(error) and str(tmp_path / "person-small") in str(error)
    assert "supply poses" in str(error)
    registered = [entry for entry in error.report.views if entry.registered]  # type: ignore[attr-defined]
    assert len(registered) == 3 and all(entry.mean_reprojection_error < 2.0 for entry in registered)


def test_read_colmap_model_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(SceneError, match="does not exist"):
        read_colmap_model(tmp_path / "sparse" / "0")
    (tmp_path / "sparse" / "0").mkdir(parents=True)
    (tmp_path / "sparse" / "0" / "cameras.txt").write_text("")
    with pytest.raises(SceneError) as caught:
        read_colmap_model(tmp_path / "sparse" / "0")
    assert "images.bin/.txt" in str(caught.value) and str(tmp_path / "sparse" / "0") in str(caught.value)
    assert find_colmap_model(tmp_path) is None


def test_sfm_in_a_fresh_process_then_png_save_does_not_corrupt_memory(tmp_path: Path) -> None:
    """pycolmap loaded before zlib corrupts the heap (STACK §4.5); imix2mix.poses must prevent it.

    The child imports imix2mix.poses first, runs SfM, then writes a PNG and compresses with zlib.
    A corrupted heap often hangs in glog's handler, which ignores SIGTERM: subprocess.run kills the
    child with SIGKILL on timeout.
    """
    write_images(tmp_path, render_views(3))
    script = textwrap.dedent(
        f"""
        import imix2mix.poses as poses   # first import of the process: pycolmap comes in here
        import os, sys
        import numpy as np
        from PIL import Image
        from imix2mix.images import list_images, read_image
        photos = [poses.SfmPhoto(p.name, read_image(p)) for p in list_images({str(tmp_path / "images")!r})]
        cameras, report = poses.estimate_poses(photos, options=poses.SfmOptions())
        assert len(cameras) == 3, report
        Image.fromarray(np.asarray(photos[0].image)).save({str(tmp_path / "after.png")!r})
        import zlib
        zlib.compress(os.urandom(1 << 22))
        print("ok", len(cameras))
        """
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("SfM subprocess hung (heap corruption after pycolmap import?) and was killed")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok 3")
    with Image.open(tmp_path / "after.png") as written:
        assert written.size == (320, 240)


def test_sfm_options_defaults_are_relaxed_for_few_photos() -> None:
    options = SfmOptions()
    # COLMAP's defaults (100 inliers, 16 degrees, 10 images) reject small captures.
    assert options.init_min_num_inliers < 100 and options.init_min_tri_angle < 16 and options.min_model_size <= 3
