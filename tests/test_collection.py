"""Collections: scene listing, containment (symlinks, ``..``), remote fetch into a cache, edit specs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pytest
from conftest import REPO_ROOT, SCENES
from memory_storage import upload_scene

from imix2mix.collection import (
    EditSpec,
    collection_edit_document,
    edits_for_scene,
    fetch_scene,
    find_scene,
    list_scenes,
    load_edit_document,
    open_root,
    parse_edit_document,
    plan_collection,
    scene_content_hash,
    slugify,
)
from imix2mix.errors import ConfigError, SceneError


@pytest.fixture()
def collection(tmp_path: Path) -> Path:
    """A root with two real scenes, a non-scene folder, a hidden folder and an escaping symlink."""
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("face", "person-small"):
        shutil.copytree(SCENES / name, root / name)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a scene")
    shutil.copytree(SCENES / "face", root / ".hidden-scene")
    outside = tmp_path / "outside-scene"
    shutil.copytree(SCENES / "face", outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


def test_lists_only_scene_folders_inside_the_root(collection: Path) -> None:
    scenes = list_scenes(collection)
    assert [scene.scene_id for scene in scenes] == ["face", "person-small"]
    assert scenes[0].uri == str(collection / "face")


def test_find_scene_accepts_names_and_paths_and_refuses_outside(collection: Path, tmp_path: Path) -> None:
    root = open_root(collection)
    assert find_scene(root, "face").scene_id == "face"
    assert find_scene(root, str(collection / "person-small") + "/").scene_id == "person-small"
    assert find_scene(root, f"file://{collection / 'face'}").scene_id == "face"
    for outside in (str(tmp_path / "outside-scene"), str(collection / ".." / "outside-scene"),
                    str(collection / "escape"), "/etc"):
        with pytest.raises(SceneError, match="outside the collection root"):
            find_scene(root, outside)
    with pytest.raises(SceneError, match="no scene folder"):
        find_scene(root, "notes")


def test_symlinked_file_leaving_the_root_is_refused(collection: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    shutil.copy(SCENES / "person-small" / "images" / "frame_00175.png", secret)
    (collection / "face" / "images" / "frame_99999.png").symlink_to(secret)
    with pytest.raises(SceneError, match="outside the collection root"):
        fetch_scene(find_scene(collection, "face"), tmp_path / "cache")


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an existing folder"):
        open_root(tmp_path / "nope")


def test_remote_scene_is_copied_once_into_the_cache(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    base = f"/imix2mix-test-{tmp_path.name}"
    root = open_root(upload_scene(SCENES / "face", base))
    assert not root.is_local
    (scene,) = list_scenes(root)
    assert scene.uri == f"memory://{base}/face"
    local = fetch_scene(scene, tmp_path / "cache")
    assert local.name == "face"
    assert sorted(p.name for p in (local / "images").iterdir()) == sorted(
        p.name for p in (SCENES / "face" / "images").iterdir())
    assert (local / "transforms.json").read_bytes() == (SCENES / "face" / "transforms.json").read_bytes()
    assert fetch_scene(scene, tmp_path / "cache") == local  # same listing: same cache entry
    fs.pipe(f"{base}/face/edits.yaml", b"edits: [make it snowy]\n")
    changed = fetch_scene(scene, tmp_path / "cache")
    assert changed != local and (changed / "edits.yaml").exists()
    with pytest.raises(SceneError, match="outside the collection root"):
        find_scene(root, f"memory://{base}/../elsewhere")


# ---------------------------------------------------------------------------------------------------
# Edit specs


def test_edit_document_full_form_and_shorthand() -> None:
    document = parse_edit_document(
        {
            "source_caption": "a photo of a man",
            "config": {"iterations": 3},
            "edits": [
                {"instruction": "Turn him into a knight!", "target_caption": "a knight", "text_cfg": 6,
                 "image_cfg": 1.5, "seed": 7, "config": {"lr": 1e-4}},
                "make it snowy",
            ],
        },
        "edits.yaml",
    )
    knight, snowy = document.edits
    assert knight.instruction == "Turn him into a knight!" and knight.text_cfg == 6.0 and knight.seed == 7
    assert knight.source_caption == snowy.source_caption == "a photo of a man"
    assert knight.config == {"lr": 1e-4} and document.config == {"iterations": 3}
    assert knight.edit_id.startswith("turn-him-into-a-knight-") and len(knight.edit_id.split("-")[-1]) == 8
    assert parse_edit_document(["make it snowy"]).edits[0] == snowy.__class__("make it snowy")


def test_edit_id_is_stable_and_depends_on_what_changes_pixels() -> None:
    base = EditSpec("turn him into a knight")
    assert base.edit_id == EditSpec("turn him into a knight").edit_id
    assert base.edit_id == EditSpec("turn him into a knight", target_caption="a knight").edit_id
    assert base.edit_id != EditSpec("turn him into a knight", text_cfg=6.0).edit_id
    assert base.edit_id != EditSpec("turn him into a knight", seed=1).edit_id
    assert slugify("  Ünïcode & spaces!! ") == "ünïcode-spaces"
    assert slugify("!!!") == "edit"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"edits": []}, "'edits' must be a non-empty list"),
        ({"edit": ["x"]}, "unknown top-level key"),
        ({"edits": [{"prompt": "x"}]}, r"edits\[0\] has unknown key"),
        ({"edits": [{"target_caption": "x"}]}, r"edits\[0\] needs an 'instruction'"),
        ({"edits": [{"instruction": "x", "text_cfg": "high"}]}, r"edits\[0\].text_cfg must be a positive finite number"),
        ({"edits": [{"instruction": "x", "seed": -1}]}, r"edits\[0\].seed must be a non-negative integer"),
        ({"edits": [{"instruction": "x", "seed": True}]}, r"edits\[0\].seed"),
        ({"edits": ["x", "x"]}, r"edits\[1\] repeats edits\[0\]"),
        ({"edits": ["x"], "config": [1]}, "config must be a mapping"),
        ("just text", "must be a mapping"),
    ],
)
def test_invalid_edit_documents_name_the_file_and_the_problem(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_edit_document(data, "/data/face/edits.yaml")
    assert str(info.value).startswith("/data/face/edits.yaml: ")


def test_edit_files_yaml_json_and_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"edits": [{"instruction": "make it snowy"}]}))
    assert load_edit_document(tmp_path / "a.json").edits[0].instruction == "make it snowy"
    (tmp_path / "bad.yaml").write_text("edits: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: is not valid YAML"):
        load_edit_document(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="edit file not found"):
        load_edit_document(tmp_path / "missing.yaml")


def test_scene_and_collection_edits_merge(collection: Path) -> None:
    (collection / "face" / "edits.yaml").write_text(
        "source_caption: a photo of a man\nconfig: {iterations: 5}\n"
        "edits:\n  - instruction: turn him into a knight\n    config: {lr: 0.5}\n"
    )
    shared = collection_edit_document({"config": {"iterations": 2, "seed": 1},
                                       "edits": ["make it snowy", "turn him into a knight"]})
    face = find_scene(collection, "face")
    planned = {item.edit.instruction: item for item in edits_for_scene(face, shared, {"teacher": "x", "seed": 0})}
    assert sorted(planned) == ["make it snowy", "turn him into a knight"]
    snowy, knight = planned["make it snowy"], planned["turn him into a knight"]
    assert snowy.edit.source_caption == "a photo of a man"  # the scene's caption reaches shared edits
    assert snowy.config_overrides == {"teacher": "x", "seed": 1, "iterations": 5}
    assert knight.config_overrides == {"teacher": "x", "seed": 1, "iterations": 5, "lr": 0.5}
    person = find_scene(collection, "person-small")
    assert [item.edit.instruction for item in edits_for_scene(person, None)] == []
    (collection / "person-small" / "edits.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"person-small/edits.json: is not valid JSON"):
        edits_for_scene(person, shared)


def test_a_success_is_skipped_only_while_its_result_is_in_the_output_folder(collection: Path, tmp_path: Path) -> None:
    from imix2mix.config import EditConfig

    (collection / "face" / "edits.yaml").write_text("edits: [make it snowy]\n")
    scenes = [find_scene(collection, "face")]
    output_root = tmp_path / "out"

    def plan(succeeded: dict, preset: str = "tiny"):  # noqa: ANN202
        (run,) = plan_collection(scenes, None, EditConfig(), preset=preset, output_root=output_root,
                                 succeeded=succeeded).runs
        return run

    first = plan({})
    assert not first.skip
    folder = first.output_subdir.as_posix()

    def success(run_id: str, config_hash: str, hour: int) -> dict:
        return {"run_id": run_id, "scene_id": "face", "edit_id": first.edit.edit_id, "config_hash": config_hash,
                "scene_content_hash": first.scene_content_hash, "preset": "tiny", "output_dir": folder,
                "finished_at": datetime(2026, 11, 24, hour, tzinfo=timezone.utc)}

    done = {("face", first.edit.edit_id, first.config_hash): success("r1", first.config_hash, 12)}
    assert not plan(done).skip  # its output folder is gone
    (output_root / folder).mkdir(parents=True)
    assert plan(done).skip and plan(done).previous_run["run_id"] == "r1"
    assert not plan(done, preset="full").skip
    # The same edit run later with other settings (--set k=10) published into the same folder.
    replaced = {**done, ("face", first.edit.edit_id, "other"): success("r2", "other", 13)}
    assert not plan(replaced).skip


def test_a_success_is_skipped_only_for_the_same_photos_and_poses(collection: Path, tmp_path: Path) -> None:
    """A scene uploaded again under the same name with other photos is edited again (regression)."""
    from imix2mix.config import EditConfig

    face = collection / "face"
    (face / "edits.yaml").write_text("edits: [make it snowy]\n")
    scenes = [find_scene(collection, "face")]
    output_root = tmp_path / "out"
    cache = tmp_path / "content"

    def plan(succeeded: dict):  # noqa: ANN202
        (run,) = plan_collection(scenes, None, EditConfig(), preset="tiny", output_root=output_root,
                                 succeeded=succeeded, content_cache_dir=cache).runs
        return run

    first = plan({})
    assert first.scene_content_hash == scene_content_hash(scenes[0])  # cached or not, the same hash
    (output_root / first.output_subdir).mkdir(parents=True)
    row = {"run_id": "r1", "scene_id": "face", "edit_id": first.edit.edit_id, "config_hash": first.config_hash,
           "scene_content_hash": first.scene_content_hash, "preset": "tiny",
           "output_dir": first.output_subdir.as_posix(), "finished_at": datetime(2026, 11, 24, tzinfo=timezone.utc)}
    done = {("face", first.edit.edit_id, first.config_hash): row}
    assert plan(done).skip
    # Edit files and the watcher's marker are not the scene's inputs: still the same content.
    (face / "edits.yaml").write_text("source_caption: a man\nedits: [make it snowy]\n")
    (face / "_READY").touch()
    assert plan(done).skip and plan(done).scene_content_hash == first.scene_content_hash
    # A row written before the manifests recorded scene contents cannot say which photos it edited.
    assert not plan({key: {**value, "scene_content_hash": None} for key, value in done.items()}).skip
    # Same folder name, same file names, one photo re-uploaded with other pixels.
    photo = face / "images" / "frame_00009.jpg"
    photo.write_bytes((SCENES / "face" / "images" / "frame_00020.jpg").read_bytes())
    changed = plan(done)
    assert not changed.skip and changed.scene_content_hash != first.scene_content_hash
    # New poses alone count too.
    photo.write_bytes((SCENES / "face" / "images" / "frame_00009.jpg").read_bytes())
    assert plan(done).skip
    transforms = face / "transforms.json"
    transforms.write_text(transforms.read_text().replace('"fl_x": 773.9306369872324', '"fl_x": 775.0', 1))
    assert not plan(done).skip


def test_scene_content_hash_of_a_remote_scene_is_cached_by_listing(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fs = fsspec.filesystem("memory")
    base = f"/imix2mix-content-{tmp_path.name}"
    (scene,) = list_scenes(upload_scene(SCENES / "face", base))
    cache = tmp_path / "content"
    first = scene_content_hash(scene, cache)
    assert first == scene_content_hash(scene) and len(list(cache.iterdir())) == 1
    with monkeypatch.context() as patched:
        patched.setattr(scene.root.fs, "open", lambda *args, **kwargs: pytest.fail(f"read {args}"))
        assert scene_content_hash(scene, cache) == first  # listed, not read
    fs.pipe(f"{base}/face/edits.yaml", b"edits: [make it snowy]\n")
    assert scene_content_hash(scene, cache) == first
    fs.pipe(f"{base}/face/images/frame_00001.jpg", (SCENES / "face" / "images" / "frame_00009.jpg").read_bytes())
    assert scene_content_hash(scene, cache) != first


def test_pipeline_helpers_import_neither_prefect_ray_nor_torch() -> None:
    """The watcher and listings stay light; the library never depends on the orchestration layer."""
    code = ("import sys, imix2mix.collection, imix2mix.manifests, imix2mix.watching; "
            "print(sorted({'prefect', 'ray', 'torch', 'pycolmap'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_sfm_poses_are_cached_by_photo_content(tmp_path: Path) -> None:
    from synthetic_scenes import render_views, write_images

    from imix2mix.collection import load_scene_cached

    scene_dir = tmp_path / "room"
    write_images(scene_dir, render_views(4))
    cache = tmp_path / "poses"
    first = load_scene_cached(scene_dir, cache)
    assert first.pose_source == "sfm" and not first.registration.unregistered
    (cached,) = cache.glob("*.json")
    # Shift every camera in the cache file: a second load must come from it, not from a new SfM run.
    content = json.loads(cached.read_text())
    for frame in content["frames"]:
        frame["transform_matrix"][0][3] += 1.0
    cached.write_text(json.dumps(content))
    copy = Path(shutil.copytree(scene_dir, tmp_path / "same-photos-elsewhere"))
    second = load_scene_cached(copy, cache)
    assert second.pose_source == "sfm" and second.registration == first.registration
    for before, after in zip(first.views, second.views):
        assert after.c2w[0, 3] == pytest.approx(before.c2w[0, 3] + 1.0)
        assert (after.K == before.K).all()


def test_a_scene_with_non_finite_or_out_of_range_overrides_fails_alone_naming_file_and_key(collection: Path,
                                                                                             tmp_path: Path) -> None:
    """``lr: .nan`` in one scene's edits.yaml used to abort the whole plan with a JSON error."""
    from imix2mix.config import EditConfig

    (collection / "face" / "edits.yaml").write_text("edits:\n  - instruction: make it snowy\n    config: {lr: .nan}\n")
    (collection / "person-small" / "edits.yaml").write_text("config: {seed: -1}\nedits: [make it snowy]\n")
    (collection / "notes" / "images").mkdir()
    shutil.copy(SCENES / "face" / "images" / "frame_00001.jpg", collection / "notes" / "images")
    (collection / "notes" / "edits.yaml").write_text("edits: [make it snowy]\n")
    plan = plan_collection(list_scenes(collection), None, EditConfig(), preset="full", output_root=tmp_path / "out",
                           succeeded={})
    assert [run.scene.scene_id for run in plan.runs] == ["notes"]
    problems = {problem.scene.scene_id: problem.error for problem in plan.problems}
    assert sorted(problems) == ["face", "person-small"]
    assert problems["face"].startswith(f"scene face, edit 'make it snowy': {collection / 'face' / 'edits.yaml'}, edit ")
    assert "setting 'lr' expects a finite number, got nan" in problems["face"]
    assert f"{collection / 'person-small' / 'edits.yaml'}, config: " in problems["person-small"]
    assert "seed must be ≥ 0" in problems["person-small"]
    # The caller's own overrides are named as such.
    plan = plan_collection([find_scene(collection, "notes")], None, EditConfig(), preset="full",
                           output_root=tmp_path / "out", succeeded={}, base_overrides={"text_cfg": "inf"})
    (problem,) = plan.problems
    assert "config_overrides (--set): EditConfig: setting 'text_cfg' expects a finite number" in problem.error


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_an_edit_document_refuses_non_finite_guidance(value: str) -> None:
    with pytest.raises(ConfigError, match=r"edits\[0\].text_cfg must be a positive finite number"):
        parse_edit_document(yaml_load(f"edits: [{{instruction: x, text_cfg: {value}}}]"), "/data/face/edits.yaml")


def yaml_load(text: str) -> object:
    import yaml

    return yaml.safe_load(text)


def test_an_edit_lists_modes_and_teachers_and_the_plan_fans_out(collection: Path, tmp_path: Path) -> None:
    from imix2mix.config import EditConfig

    (collection / "face" / "edits.yaml").write_text(
        "edits:\n  - instruction: make it snowy\n    target_caption: a snowy photo\n"
        "    teacher: controlnet_canny\n    teacher_id: my/controlnet\n    modes: [distill, teacher_only, t2vz]\n"
    )
    (spec,) = load_edit_document(collection / "face" / "edits.yaml").edits
    assert spec.modes == ("distill", "teacher_only", "t2vz")
    assert spec.config == {"teacher": "controlnet_canny", "teacher_id": "my/controlnet"}
    assert spec.edit_id == EditSpec("make it snowy").edit_id  # modes and teachers are in the config hash instead
    plan = plan_collection([find_scene(collection, "face")], None, EditConfig(), preset="tiny", output_root=tmp_path / "out",
                           succeeded={})
    assert [run.config.mode for run in plan.runs] == ["distill", "teacher_only", "t2vz"]
    assert {run.config.teacher.name for run in plan.runs} == {"controlnet_canny"}
    assert {run.config.teacher.model_id for run in plan.runs} == {"my/controlnet"}
    assert len({run.config_hash for run in plan.runs}) == len({run.output_dir for run in plan.runs}) == 3
    assert [run.label for run in plan.runs] == ["face · make it snowy", "face · make it snowy · teacher_only",
                                                "face · make it snowy · t2vz"]
    assert parse_edit_document({"edits": [{"instruction": "x", "methods": "sdedit"}]}).edits[0].modes == ("sdedit",)
    for bad, message in (({"modes": ["dreamfusion"]}, "unknown mode"), ({"modes": []}, "non-empty list"),
                         ({"modes": ["t2vz", "t2vz"]}, "twice"), ({"modes": ["t2vz"], "methods": ["sdedit"]}, "keep one")):
        with pytest.raises(ConfigError, match=message):
            parse_edit_document({"edits": [{"instruction": "x", **bad}]}, "/data/face/edits.yaml")
