"""``imix2mix inspect`` and ``imix2mix poses`` through the real CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SCENES
from synthetic_scenes import relative_rotation_errors, render_views, write_images

from imix2mix.cli import main
from imix2mix.scene import load_scene


def test_inspect_shows_views_pose_source_and_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(SCENES / "face")]) == 0
    output = capsys.readouterr().out
    scene = load_scene(SCENES / "face")
    assert scene.content_hash in output
    assert "pose source:   transforms" in output and "views:         4" in output
    for view in scene:
        assert view.name in output
    assert "994x738" in output


def test_inspect_sfm_scene_shows_registration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path, render_views(3))
    assert main(["inspect", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "pose source:   sfm" in output and "registration:" in output and "mean reprojection error" in output
    assert output.count(" yes ") == 3


def test_inspect_bad_scene_prints_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(tmp_path / "missing") in error and "Traceback" not in error


def test_poses_writes_transforms_json_that_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = render_views(4)
    write_images(tmp_path, truth)
    assert main(["poses", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    written = tmp_path / "transforms.json"
    assert f"wrote {written}" in output and "mean reprojection error" in output

    content = json.loads(written.read_text())
    assert [frame["file_path"] for frame in content["frames"]] == [f"images/{view.name}" for view in truth]
    assert all({"fl_x", "fl_y", "cx", "cy", "w", "h", "transform_matrix"} <= frame.keys() for frame in content["frames"])

    read_back = load_scene(tmp_path)  # auto now picks the written transforms.json
    estimated = load_scene(tmp_path, loader="sfm")  # the SfM the command ran (seeded, single-threaded)
    assert read_back.pose_source == "transforms"
    for a, b in zip(read_back, estimated):
        np.testing.assert_allclose(a.K, b.K, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-6, rtol=0)
    assert max(relative_rotation_errors([v.c2w for v in read_back], [v.c2w for v in truth])) < 1.0


def test_poses_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path, render_views(3))
    existing = tmp_path / "transforms.json"
    existing.write_text("{}")
    assert main(["poses", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "{}"
    assert main(["poses", str(tmp_path), "--force"]) == 0
    assert len(json.loads(existing.read_text())["frames"]) == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_poses_to_another_file(tmp_path: Path) -> None:
    scene_dir = tmp_path / "scene"
    write_images(scene_dir, render_views(3))
    out = tmp_path / "cams.json"
    assert main(["poses", str(scene_dir), "--out", str(out)]) == 0
    assert not (scene_dir / "transforms.json").exists()
    frames = json.loads(out.read_text())["frames"]
    assert frames[0]["file_path"] == "scene/images/view_00.png"
    assert len(load_scene(out)) == 3


def test_poses_with_two_photos_explains_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(SCENES / "face" / "images" / "frame_00001.jpg", tmp_path / "a.jpg")
    shutil.copy(SCENES / "face" / "images" / "frame_00009.jpg", tmp_path / "b.jpg")
    assert main(["poses", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path) in error and "at least 3 photos" in error and "transforms.json" in error
    assert not (tmp_path / "transforms.json").exists()
