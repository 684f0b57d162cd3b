"""Scene loading: transforms.json and COLMAP loaders against ground truth, validation, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SCENES
from PIL import Image
from scipy.spatial.transform import Rotation
from synthetic_scenes import (
    GL_FROM_CV,
    GroundTruthView,
    render_views,
    transforms_frame,
    write_colmap_text_model,
    write_images,
    write_transforms,
)

from imix2mix.errors import ConfigError, RegistrationError, SceneError
from imix2mix.poses import pycolmap
from imix2mix.scene import Scene, View, load_scene, transforms_dict, write_transforms_json


@pytest.fixture(scope="module")
def truth() -> list[GroundTruthView]:
    return render_views(4)


def assert_same_cameras(scene: Scene, truth: list[GroundTruthView], atol: float = 1e-6) -> None:
    assert [view.name for view in scene] == [view.name for view in truth]
    for view, true_view in zip(scene, truth):
        np.testing.assert_allclose(view.K, true_view.K, atol=atol, rtol=0)
        np.testing.assert_allclose(view.c2w, true_view.c2w, atol=atol, rtol=0)
        np.testing.assert_array_equal(view.image, true_view.image)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content))


# ------------------------------------------------------------------------------------------------
# transforms.json


def test_transforms_json_gives_opencv_cameras_in_file_order(tmp_path: Path, truth) -> None:
    order = [2, 0, 3, 1]
    write_transforms(tmp_path, [truth[i] for i in order])
    scene = load_scene(tmp_path)
    assert scene.pose_source == "transforms" and scene.registration is None
    assert scene.name == tmp_path.name and len(scene) == 4
    assert_same_cameras(scene, [truth[i] for i in order], atol=1e-12)
    assert scene[0].path == tmp_path / "images" / truth[2].name


def test_transforms_json_global_intrinsics_and_camera_angle(tmp_path: Path, truth) -> None:
    write_images(tmp_path, truth)
    width, height, focal = 320, 240, truth[0].K[0, 0]
    frames = [{"file_path": f"./images/{v.name}", "transform_matrix": (v.c2w @ GL_FROM_CV).tolist()} for v in truth]
    # camera_angle_x only: fx = fy = w / (2 tan(angle/2)), principal point at the centre.
    write_json(tmp_path / "transforms.json", {"camera_angle_x": 2 * math.atan(width / (2 * focal)), "frames": frames})
    assert_same_cameras(load_scene(tmp_path), truth, atol=1e-9)
    # camera_angle_y gives fy separately.
    angle_y = 2 * math.atan(height / (2 * 300.0))
    write_json(tmp_path / "transforms.json",
               {"camera_angle_x": 2 * math.atan(width / (2 * focal)), "camera_angle_y": angle_y, "frames": frames})
    assert load_scene(tmp_path)[0].K[1, 1] == pytest.approx(300.0)
    # Global nerfstudio keys, overridden per frame where a frame gives them.
    frames[1] = {**frames[1], "fl_x": 111.0}
    write_json(tmp_path / "transforms.json",
               {"fl_x": focal, "fl_y": focal, "cx": 160.0, "cy": 120.0, "w": 320, "h": 240, "frames": frames})
    scene = load_scene(tmp_path)
    assert scene[0].K[0, 0] == focal and scene[1].K[0, 0] == 111.0 and scene[1].K[1, 1] == focal


def test_transforms_json_applied_transform_is_undone(tmp_path: Path, truth) -> None:
    applied = np.eye(4)
    applied[:3, :3] = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    applied[:3, 3] = [0.3, -1.2, 2.0]
    write_images(tmp_path, truth)
    frames = [transforms_frame(v, f"images/{v.name}") for v in truth]
    for frame in frames:
        frame["transform_matrix"] = (applied @ np.array(frame["transform_matrix"])).tolist()
    write_json(tmp_path / "transforms.json", {"applied_transform": applied[:3].tolist(), "frames": frames})
    assert_same_cameras(load_scene(tmp_path), truth, atol=1e-9)


def test_downscaled_images_get_scaled_intrinsics(tmp_path: Path) -> None:
    full = render_views(3, width=640, height=480)
    small = render_views(3)  # 320×240, the same cameras
    write_images(tmp_path, small)
    frames = [transforms_frame(v, f"images/{v.name}") for v in full]  # K, w, h for 640×480
    write_json(tmp_path / "transforms.json", {"frames": frames})
    assert_same_cameras(load_scene(tmp_path), small, atol=1e-9)


def test_views_of_different_sizes_keep_their_own_intrinsics(tmp_path: Path, truth) -> None:
    larger = render_views(4, width=400, height=300)
    mixed = [truth[0], larger[1], truth[2], larger[3]]
    write_transforms(tmp_path, mixed)
    scene = load_scene(tmp_path)
    assert [view.image.shape for view in scene] == [(240, 320, 3), (300, 400, 3), (240, 320, 3), (300, 400, 3)]
    assert_same_cameras(scene, mixed, atol=1e-12)


def test_loading_a_transforms_file_path_directly(tmp_path: Path, truth) -> None:
    json_path = write_transforms(tmp_path, truth)
    assert_same_cameras(load_scene(json_path), truth, atol=1e-12)
    with pytest.raises(ConfigError, match="transforms"):
        load_scene(json_path, loader="colmap")


def test_nerf_synthetic_paths_without_extension(tmp_path: Path, truth) -> None:
    write_images(tmp_path, truth)
    frames = [transforms_frame(v, f"./images/{Path(v.name).stem}") for v in truth]
    write_json(tmp_path / "transforms.json", {"frames": frames})
    assert [view.name for view in load_scene(tmp_path)] == [v.name for v in truth]


# ------------------------------------------------------------------------------------------------
# COLMAP models, and agreement between loaders


def test_colmap_text_model_written_by_hand_matches_transforms(tmp_path: Path, truth) -> None:
    from_json = tmp_path / "json"
    write_transforms(from_json, truth)
    from_colmap = tmp_path / "colmap"
    write_images(from_colmap, truth)
    write_colmap_text_model(from_colmap / "sparse" / "0", truth)

    json_scene, colmap_scene = load_scene(from_json), load_scene(from_colmap)
    assert colmap_scene.pose_source == "colmap"
    assert_same_cameras(colmap_scene, truth, atol=1e-6)
    for a, b in zip(json_scene, colmap_scene):
        np.testing.assert_allclose(a.K, b.K, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(a.image, b.image)
    report = colmap_scene.registration
    assert report is not None and report.source == "colmap" and not report.unregistered


def test_colmap_binary_model_built_with_pycolmap(tmp_path: Path, truth) -> None:
    write_images(tmp_path, truth)
    reconstruction = pycolmap.Reconstruction()
    for index, view in enumerate(truth, start=1):
        height, width = view.image.shape[:2]
        camera = pycolmap.Camera.create_from_model_name(index, "PINHOLE", float(view.K[0, 0]), width, height)
        camera.params = [view.K[0, 0], view.K[1, 1], view.K[0, 2], view.K[1, 2]]
        reconstruction.add_camera_with_trivial_rig(camera)
        w2c = np.linalg.inv(view.c2w)
        image = pycolmap.Image(name=view.name, camera_id=index, image_id=index)
        reconstruction.add_image_with_trivial_frame(image, pycolmap.Rigid3d(w2c[:3, :4]))
    (tmp_path / "sparse").mkdir()
    reconstruction.write(tmp_path / "sparse")  # sparse/ without 0/ is found too
    scene = load_scene(tmp_path, loader="colmap")
    assert_same_cameras(scene, truth, atol=1e-9)
    assert load_scene(tmp_path).pose_source == "colmap"  # auto: no transforms.json, a model present


def test_transforms_json_wins_over_colmap_model_in_auto_mode(tmp_path: Path, truth) -> None:
    write_transforms(tmp_path, truth)
    write_colmap_text_model(tmp_path / "sparse" / "0", truth)
    assert load_scene(tmp_path).pose_source == "transforms"
    assert load_scene(tmp_path, loader="colmap").pose_source == "colmap"


def test_colmap_model_missing_a_pose_or_a_photo_is_a_registration_error(tmp_path: Path, truth) -> None:
    write_images(tmp_path, truth)
    write_colmap_text_model(tmp_path / "sparse" / "0", truth[:3])  # view_03 is not in the model
    with pytest.raises(RegistrationError) as caught:
        load_scene(tmp_path)
    assert caught.value.unregistered == ["view_03.png"] and "missing from the model" in str(caught.value)
    assert str(tmp_path / "sparse" / "0") in str(caught.value)


def test_damaged_colmap_model_names_the_folder(tmp_path: Path, truth) -> None:
    write_images(tmp_path, truth)
    model = tmp_path / "sparse" / "0"
    write_colmap_text_model(model, truth)
    (model / "cameras.txt").write_text("1 PINHOLE not-a-number\n")
    with pytest.raises(SceneError) as caught:
        load_scene(tmp_path)
    assert str(model) in str(caught.value) and "cannot read the COLMAP model" in str(caught.value)


# ------------------------------------------------------------------------------------------------
# Scene / View values


def test_scene_is_immutable_with_read_only_arrays(tmp_path: Path, truth) -> None:
    write_transforms(tmp_path, truth)
    scene = load_scene(tmp_path)
    view = scene[0]
    for array in (view.image, view.K, view.c2w):
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0, 0] = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        scene.pose_source = "sfm"  # type: ignore[misc]
    assert isinstance(scene.views, tuple) and (view.width, view.height) == (320, 240)
    assert list(iter(scene)) == list(scene.views)


def test_view_copies_caller_arrays(truth) -> None:
    image = np.array(truth[0].image)
    view = View(name="a.png", image=image, K=truth[0].K, c2w=truth[0].c2w)
    image[:] = 0
    assert view.image.max() > 0


def test_content_hash_covers_pixels_poses_intrinsics_and_names(tmp_path: Path, truth) -> None:
    write_transforms(tmp_path, truth)
    scene = load_scene(tmp_path)
    again = load_scene(tmp_path)
    assert scene.content_hash == again.content_hash and len(scene.content_hash) == 64

    def variant(index: int, **changes) -> Scene:
        views = list(scene.views)
        views[index] = dataclasses.replace(views[index], **changes)
        return Scene(views=tuple(views), root=scene.root)

    pixels = np.array(scene[1].image)
    pixels[5, 7, 0] ^= 1
    moved = np.array(scene[2].c2w)
    moved[0, 3] += 1e-9
    focal = np.array(scene[0].K)
    focal[0, 0] += 1e-9
    hashes = {
        variant(1, image=pixels).content_hash,
        variant(2, c2w=moved).content_hash,
        variant(0, K=focal).content_hash,
        variant(3, name="renamed.png").content_hash,
        Scene(views=tuple(reversed(scene.views)), root=scene.root).content_hash,
    }
    assert len(hashes) == 5 and scene.content_hash not in hashes


def test_scene_view_count_limits(truth) -> None:
    view = View(name="a.png", image=truth[0].image, K=truth[0].K, c2w=truth[0].c2w)
    with pytest.raises(SceneError, match="2 to 32 views, got 1"):
        Scene(views=(view,))
    many = tuple(dataclasses.replace(view, name=f"{i}.png") for i in range(33))
    with pytest.raises(SceneError, match="2 to 32 views, got 33"):
        Scene(views=many)
    with pytest.raises(SceneError, match="unique"):
        Scene(views=(view, view))


def test_transforms_json_written_for_a_scene_reads_back_to_the_same_cameras(tmp_path: Path, truth) -> None:
    write_images(tmp_path, truth)
    source = Scene(
        views=tuple(View(v.name, v.image, v.K, v.c2w, tmp_path / "images" / v.name) for v in truth),
        root=tmp_path, pose_source="sfm",
    )
    out = write_transforms_json(source, tmp_path / "transforms.json")
    content = read_json(out)
    assert [frame["file_path"] for frame in content["frames"]] == [f"images/{v.name}" for v in truth]
    assert_same_cameras(load_scene(tmp_path), truth, atol=1e-12)
    with pytest.raises(SceneError, match="already exists"):
        write_transforms_json(source, out)
    assert transforms_dict(source)["frames"][0]["w"] == 320


# ------------------------------------------------------------------------------------------------
# Bad input: the error names the file and the reason


def make_scene(tmp_path: Path, truth) -> Path:
    write_transforms(tmp_path, truth)
    return tmp_path / "transforms.json"


def edit_json(json_path: Path, change) -> None:
    content = read_json(json_path)
    change(content)
    write_json(json_path, content)


def expect_scene_error(path: Path, *fragments: str, error=SceneError) -> SceneError:
    with pytest.raises(error) as caught:
        load_scene(path)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


def test_missing_scene_folder(tmp_path: Path) -> None:
    expect_scene_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "does not exist")


def test_folder_without_photos(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    expect_scene_error(tmp_path, str(tmp_path), "no photos found")


def test_folder_with_one_photo(tmp_path: Path, truth) -> None:
    write_images(tmp_path, truth[:1])
    expect_scene_error(tmp_path, str(tmp_path / "images"), "only one photo", "view_00.png")


def test_invalid_json(tmp_path: Path, truth) -> None:
    json_path = make_scene(tmp_path, truth)
    json_path.write_text('{"frames": [ {"file_path": "images/view_00.png",, } ] }')
    expect_scene_error(tmp_path, str(json_path), "invalid JSON", "line 1")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda c: c.pop("frames"), ["'frames'"]),
        (lambda c: c["frames"][1].pop("transform_matrix"), ["frame 1", "missing 'transform_matrix'"]),
        (lambda c: c["frames"][2].pop("file_path"), ["frame 2", "missing 'file_path'"]),
        (lambda c: [f.pop("fl_x") for f in c["frames"]], ["frame 0", "no focal length"]),
        (lambda c: c["frames"][0].update(fl_x="wide"), ["frame 0", "'fl_x' must be a finite number"]),
        (lambda c: c["frames"][1].update(transform_matrix=[[1, 0], [0, 1]]), ["frame 1", "4×4"]),
        (lambda c: c.update(frames=c["frames"][:1]), ["2 to 32 frames, got 1"]),
        (lambda c: c.update(applied_transform=np.zeros((3, 4)).tolist()), ["applied_transform", "singular"]),
    ],
    ids=["no-frames", "no-matrix", "no-path", "no-focal", "focal-not-number", "matrix-shape", "one-frame", "singular-applied"],
)
def test_missing_or_wrong_fields(tmp_path: Path, truth, change, fragments) -> None:
    json_path = make_scene(tmp_path, truth)
    edit_json(json_path, change)
    expect_scene_error(tmp_path, str(json_path), *fragments)


def test_frame_path_escaping_the_scene_folder(tmp_path: Path, truth) -> None:
    scene_dir = tmp_path / "scene"
    json_path = make_scene(scene_dir, truth)
    Image.fromarray(truth[0].image).save(tmp_path / "outside.png")
    edit_json(json_path, lambda c: c["frames"][0].update(file_path="../outside.png"))
    expect_scene_error(scene_dir, str(json_path), "frame 0", "outside the scene folder")
    edit_json(json_path, lambda c: c["frames"][0].update(file_path=str(tmp_path / "outside.png")))
    expect_scene_error(scene_dir, "outside the scene folder")


def test_frame_image_missing(tmp_path: Path, truth) -> None:
    make_scene(tmp_path, truth)
    (tmp_path / "images" / "view_02.png").unlink()
    expect_scene_error(tmp_path, str(tmp_path / "images" / "view_02.png"), "not found", "frame 2")


def test_nan_in_pose(tmp_path: Path, truth) -> None:
    json_path = make_scene(tmp_path, truth)
    content = json_path.read_text().replace(str(read_json(json_path)["frames"][1]["transform_matrix"][0][3]), "NaN", 1)
    json_path.write_text(content)
    expect_scene_error(tmp_path, str(json_path), "frame 1", "NaN")


def test_pose_that_is_not_a_rotation(tmp_path: Path, truth) -> None:
    json_path = make_scene(tmp_path, truth)

    def scale_rotation(content):
        matrix = np.array(content["frames"][3]["transform_matrix"])
        matrix[:3, :3] *= 1.5
        content["frames"][3]["transform_matrix"] = matrix.tolist()

    edit_json(json_path, scale_rotation)
    expect_scene_error(tmp_path, str(json_path), "frame 3", "not orthonormal")

    def reflect(content):
        matrix = np.array(content["frames"][3]["transform_matrix"])
        matrix[:3, 0] *= -1
        content["frames"][3]["transform_matrix"] = matrix.tolist()

    make_scene(tmp_path, truth)
    edit_json(json_path, reflect)
    expect_scene_error(tmp_path, str(json_path), "frame 3", "determinant")


def test_duplicate_photo_files_are_named(tmp_path: Path, truth) -> None:
    json_path = make_scene(tmp_path, truth)
    shutil.copy(tmp_path / "images" / "view_00.png", tmp_path / "images" / "copy.png")
    edit_json(json_path, lambda c: c["frames"][2].update(file_path="images/copy.png"))
    error = expect_scene_error(tmp_path, "view_00.png", "copy.png", "identical bytes")
    assert error.path == tmp_path


def test_same_file_listed_twice(tmp_path: Path, truth) -> None:
    json_path = make_scene(tmp_path, truth)
    edit_json(json_path, lambda c: c["frames"][3].update(file_path="./images/view_01.png"))
    expect_scene_error(tmp_path, str(json_path), "frame 3", "listed twice", "frame 1")


def test_duplicate_photos_without_poses(tmp_path: Path, truth) -> None:
    write_images(tmp_path, truth[:3])
    shutil.copy(tmp_path / "images" / "view_01.png", tmp_path / "images" / "view_01_copy.png")
    expect_scene_error(tmp_path, "view_01.png", "view_01_copy.png", "same photo")


def test_image_with_a_different_aspect_than_its_intrinsics(tmp_path: Path, truth) -> None:
    json_path = make_scene(tmp_path, truth)
    edit_json(json_path, lambda c: c["frames"][1].update(w=240, h=320))
    expect_scene_error(tmp_path, str(tmp_path / "images" / "view_01.png"), "different aspect ratio")


def test_corrupt_frame_image(tmp_path: Path, truth) -> None:
    make_scene(tmp_path, truth)
    target = tmp_path / "images" / "view_01.png"
    target.write_bytes(target.read_bytes()[:300])
    expect_scene_error(tmp_path, str(target), "truncated or corrupt")


def test_unknown_loader() -> None:
    with pytest.raises(ConfigError, match="unknown scene loader 'nerf'"):
        load_scene(SCENES / "face", loader="nerf")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# EXIF orientation in posed scenes


def _write_rotated_jpeg_scene(tmp_path: Path, truth, recorded_wh: tuple[int, int]) -> Path:
    """Frame 0 stored as a 320×240 photo tagged orientation 6 (displayed 240×320)."""
    scene_dir = tmp_path / "scene"
    write_transforms(scene_dir, truth)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(truth[0].image).save(scene_dir / "images" / "rotated.png", exif=exif)
    frame = transforms_frame(truth[0], "images/rotated.png", w=recorded_wh[0], h=recorded_wh[1])
    edit_json(scene_dir / "transforms.json", lambda c: c["frames"].__setitem__(0, frame))
    (scene_dir / "images" / "view_00.png").unlink()
    return scene_dir


def test_posed_photo_with_exif_rotation_uses_the_stored_pixels_its_pose_refers_to(tmp_path: Path, truth) -> None:
    scene = load_scene(_write_rotated_jpeg_scene(tmp_path, truth, (320, 240)))
    np.testing.assert_array_equal(scene[0].image, truth[0].image)


def test_posed_photo_whose_size_matches_the_rotated_view_is_rotated(tmp_path: Path, truth) -> None:
    # w/h recorded as 240×320: the poses were made on the displayed (rotated) photo.
    scene_dir = _write_rotated_jpeg_scene(tmp_path, truth, (240, 320))
    edit_json(scene_dir / "transforms.json", lambda c: c["frames"][0].update(cx=120.0, cy=160.0))
    scene = load_scene(scene_dir)
    # Orientation 6: the stored image is displayed turned 90° clockwise.
    np.testing.assert_array_equal(scene[0].image, np.rot90(truth[0].image, k=-1))


def test_example_scenes_load_with_their_shipped_poses() -> None:
    for name in ("face", "person-small"):
        scene = load_scene(SCENES / name)
        assert len(scene) == 4 and scene.pose_source == "transforms"
        assert all(np.allclose(view.c2w[:3, :3].T @ view.c2w[:3, :3], np.eye(3), atol=1e-5) for view in scene)
