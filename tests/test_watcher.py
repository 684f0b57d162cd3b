"""The storage watcher: readiness (marker or quiet period), at most one event per content, containment.

The clock is passed in, so quiet periods are tested without sleeping.  Emission to a real Prefect
server is covered by ``test_deployment_events.py``.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import fsspec
import pytest
from conftest import SCENES
from memory_storage import upload_scene

from deployments.watcher import watch
from imix2mix.errors import SceneError
from imix2mix.watching import AnnouncementLedger, ReadyScene, SceneWatch, WatchSettings, folder_content_hash

QUIET = 30.0


def add_scene(root: Path, name: str, source: str = "face", ready: bool = False) -> Path:
    folder = root / name
    shutil.copytree(SCENES / source, folder)
    if ready:
        (folder / "_READY").touch()
    return folder


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def open_watch(root: Path | str, state: Path) -> SceneWatch:
    return SceneWatch.open(root, state, WatchSettings(quiet_seconds=QUIET))


def ids(ready: list[ReadyScene]) -> list[str]:
    return [item.scene.scene_id for item in ready]


def test_marker_makes_a_scene_ready_once(root: Path, tmp_path: Path) -> None:
    add_scene(root, "a", ready=True)
    add_scene(root, "b")  # still uploading: no marker, just changed
    scene_watch = open_watch(root, tmp_path / "state.json")
    first = scene_watch.scan(now=0.0)
    assert ids(first) == ["a"]
    assert first[0].resource_id == "imix2mix.scene.a"
    assert first[0].event_payload() == {"scene_uri": str(root / "a"), "root": str(root), "scene_id": "a",
                                        "content_hash": first[0].content_hash}
    assert scene_watch.scan(now=1.0) == []


def test_quiet_period_without_marker(root: Path, tmp_path: Path) -> None:
    folder = add_scene(root, "b")
    scene_watch = open_watch(root, tmp_path / "state.json")
    assert scene_watch.scan(now=0.0) == []
    shutil.copy(SCENES / "person-small" / "images" / "frame_00175.png", folder / "images" / "late.png")
    assert scene_watch.scan(now=QUIET - 1) == []  # changed at QUIET - 1: the quiet period restarts
    assert scene_watch.scan(now=2 * QUIET - 2) == []
    assert ids(scene_watch.scan(now=2 * QUIET)) == ["b"]
    assert scene_watch.scan(now=3 * QUIET) == []


def test_at_most_once_per_content_and_across_restarts(root: Path, tmp_path: Path) -> None:
    folder = add_scene(root, "a", ready=True)
    state = tmp_path / "state.json"
    assert ids(open_watch(root, state).scan(now=0.0)) == ["a"]
    restarted = open_watch(root, state)
    assert restarted.scan(now=0.0) == []  # remembered in the state file
    os.utime(folder / "transforms.json", (1, 1))  # listing changes, content does not
    assert restarted.scan(now=1.0) == []
    (folder / "edits.yaml").write_text("edits: [make it snowy]\n")  # new content: announced again
    assert ids(restarted.scan(now=2.0)) == ["a"]
    assert AnnouncementLedger(state).already_announced("a", folder_content_hash(_scene(restarted, "a")))


def _scene(scene_watch: SceneWatch, scene_id: str):  # noqa: ANN202
    from imix2mix.collection import list_scenes

    return next(scene for scene in list_scenes(scene_watch.root) if scene.scene_id == scene_id)


def test_nothing_outside_the_root_is_announced(root: Path, tmp_path: Path) -> None:
    outside = add_scene(tmp_path, "outside", ready=True)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    leaky = add_scene(root, "leaky", ready=True)
    (leaky / "images" / "stolen.jpg").symlink_to(outside / "images" / "frame_00001.jpg")
    add_scene(root, "good", ready=True)
    assert ids(open_watch(root, tmp_path / "state.json").scan(now=0.0)) == ["good"]


def test_incomplete_folders_are_not_scenes(root: Path, tmp_path: Path) -> None:
    (root / "empty").mkdir()
    (root / "empty" / "_READY").touch()
    (root / "_cache").mkdir()
    add_scene(root, ".partial-upload", ready=True)
    assert open_watch(root, tmp_path / "state.json").scan(now=10 * QUIET) == []


def test_unreadable_state_file_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    with pytest.raises(SceneError, match="watch state file is unreadable"):
        open_watch(root, state)


def test_remote_root_is_polled(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    base = f"/watch-{tmp_path.name}"
    scene_watch = open_watch(upload_scene(SCENES / "face", base), tmp_path / "state.json")
    assert scene_watch.scan(now=0.0) == []
    fs.pipe(f"{base}/face/_READY", b"")
    (ready,) = scene_watch.scan(now=1.0)
    assert ready.scene.uri == f"memory://{base}/face"
    assert ready.event_payload()["root"] == f"memory://{base}"


def test_watch_loop_emits_each_completed_scene_exactly_once(root: Path, tmp_path: Path) -> None:
    add_scene(root, "a", ready=True)
    add_scene(root, "b")
    emitted: list[ReadyScene] = []
    times = iter([0.0, 1.0, 2.0, QUIET + 5, QUIET + 6])
    stop = threading.Event()

    def emit(ready: ReadyScene) -> None:
        emitted.append(ready)

    def clock() -> float:
        value = next(times)
        if value >= QUIET + 6:
            stop.set()
        return value

    settings = WatchSettings(quiet_seconds=QUIET, poll_seconds=0.01)
    count = watch(str(root), tmp_path / "state.json", settings, emit=emit, stop=stop, clock=clock)
    assert ids(emitted) == ["a", "b"] and count == 2
