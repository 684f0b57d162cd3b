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

from deployments.watcher import AnnouncementError, watch
from imix2mix.errors import SceneError
from imix2mix.collection import edit_files_hash, scene_content_hash
from imix2mix.watching import AnnouncementLedger, ReadyScene, SceneWatch, WatchSettings

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


def announce(scene_watch: SceneWatch, now: float) -> list[ReadyScene]:
    """One scan whose events were all accepted."""
    ready = scene_watch.scan(now)
    for item in ready:
        scene_watch.mark_announced(item)
    return ready


def ids(ready: list[ReadyScene]) -> list[str]:
    return [item.scene.scene_id for item in ready]


def test_marker_makes_a_scene_ready_once(root: Path, tmp_path: Path) -> None:
    add_scene(root, "a", ready=True)
    add_scene(root, "b")  # still uploading: no marker, just changed
    scene_watch = open_watch(root, tmp_path / "state.json")
    first = announce(scene_watch, now=0.0)
    assert ids(first) == ["a"]
    assert first[0].resource_id == "imix2mix.scene.a"
    assert first[0].event_payload() == {"scene_uri": str(root / "a"), "root": str(root), "scene_id": "a",
                                        "content_hash": first[0].content_hash, "edits_hash": first[0].edits_hash}
    # The hash the planner logs and runs.parquet records, not one of the watcher's own.
    assert first[0].content_hash == scene_content_hash(_scene(scene_watch, "a"))
    assert announce(scene_watch, now=1.0) == []


def test_quiet_period_without_marker(root: Path, tmp_path: Path) -> None:
    folder = add_scene(root, "b")
    scene_watch = open_watch(root, tmp_path / "state.json")
    assert announce(scene_watch, now=0.0) == []
    shutil.copy(SCENES / "person-small" / "images" / "frame_00175.png", folder / "images" / "late.png")
    assert announce(scene_watch, now=QUIET - 1) == []  # changed at QUIET - 1: the quiet period restarts
    assert announce(scene_watch, now=2 * QUIET - 2) == []
    assert ids(announce(scene_watch, now=2 * QUIET)) == ["b"]
    assert announce(scene_watch, now=3 * QUIET) == []


def test_at_most_once_per_content_and_across_restarts(root: Path, tmp_path: Path) -> None:
    folder = add_scene(root, "a", ready=True)
    state = tmp_path / "state.json"
    assert ids(announce(open_watch(root, state), now=0.0)) == ["a"]
    restarted = open_watch(root, state)
    assert announce(restarted, now=0.0) == []  # remembered in the state file
    os.utime(folder / "transforms.json", (1, 1))  # listing changes, content does not
    assert announce(restarted, now=1.0) == []
    (folder / "edits.yaml").write_text("edits: [make it snowy]\n")  # new content: announced again
    assert ids(announce(restarted, now=2.0)) == ["a"]
    scene = _scene(restarted, "a")
    assert AnnouncementLedger(state).already_announced("a", f"{scene_content_hash(scene)}+{edit_files_hash(scene)}")


def _scene(scene_watch: SceneWatch, scene_id: str):  # noqa: ANN202
    from imix2mix.collection import list_scenes

    return next(scene for scene in list_scenes(scene_watch.root) if scene.scene_id == scene_id)


def test_nothing_outside_the_root_is_announced(root: Path, tmp_path: Path) -> None:
    outside = add_scene(tmp_path, "outside", ready=True)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    leaky = add_scene(root, "leaky", ready=True)
    (leaky / "images" / "stolen.jpg").symlink_to(outside / "images" / "frame_00001.jpg")
    add_scene(root, "good", ready=True)
    assert ids(announce(open_watch(root, tmp_path / "state.json"), now=0.0)) == ["good"]


def test_incomplete_folders_are_not_scenes(root: Path, tmp_path: Path) -> None:
    (root / "empty").mkdir()
    (root / "empty" / "_READY").touch()
    (root / "_cache").mkdir()
    add_scene(root, ".partial-upload", ready=True)
    assert announce(open_watch(root, tmp_path / "state.json"), now=10 * QUIET) == []


def test_unreadable_state_file_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    with pytest.raises(SceneError, match="watch state file is unreadable"):
        open_watch(root, state)


def test_remote_root_is_polled(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    base = f"/watch-{tmp_path.name}"
    scene_watch = open_watch(upload_scene(SCENES / "face", base), tmp_path / "state.json")
    assert announce(scene_watch, now=0.0) == []
    fs.pipe(f"{base}/face/_READY", b"")
    (ready,) = announce(scene_watch, now=1.0)
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


def test_a_scene_is_marked_announced_only_once_its_event_was_accepted(root: Path, tmp_path: Path) -> None:
    add_scene(root, "a", ready=True)
    state = tmp_path / "state.json"
    refused: list[str] = []

    def unreachable(ready: ReadyScene) -> None:
        refused.append(ready.scene.scene_id)
        raise AnnouncementError("the Prefect API at http://127.0.0.1:9/api did not accept the event")

    settings = WatchSettings(quiet_seconds=QUIET)
    with pytest.raises(AnnouncementError, match=r"1 scene\(s\) not announced \(a\)"):
        watch(str(root), state, settings, emit=unreachable, once=True)
    assert refused == ["a"] and not AnnouncementLedger(state).already_announced("a", "")
    emitted: list[ReadyScene] = []
    assert watch(str(root), state, settings, emit=emitted.append, once=True) == 1  # the next try announces it
    assert ids(emitted) == ["a"]
    assert watch(str(root), state, settings, emit=emitted.append, once=True) == 0


def test_a_folder_symlink_inside_a_scene_keeps_it_announceable(root: Path, tmp_path: Path) -> None:
    """A harmless alias (images-alias -> images) used to make the scene unhashable: never announced."""
    plain = add_scene(root, "plain", ready=True)
    aliased = add_scene(root, "aliased", ready=True)
    (aliased / "images-alias").symlink_to("images", target_is_directory=True)
    ready = {item.scene.scene_id: item for item in announce(open_watch(root, tmp_path / "state.json"), now=0.0)}
    assert sorted(ready) == ["aliased", "plain"]
    assert ready["aliased"].content_hash == ready["plain"].content_hash  # the alias adds no input
    assert plain.name == "plain"
