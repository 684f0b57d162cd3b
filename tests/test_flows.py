"""The flows end to end: real Prefect API (test harness), real local Ray, the real tiny Editor.

One harness, one Ray cluster and one pool of actors serve the module; each test that edits works on
its own copy of the outputs of the first batch, so the tests do not depend on their order.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray
from conftest import EXAMPLES
from memory_storage import upload_scene
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.edit_collection import edit_collection
from flows.edit_scene import edit_scene
from imix2mix.cli import main
from imix2mix.errors import SceneError
from imix2mix.manifests import RUNS, RUNS_SCHEMA, SCENES, SCENES_SCHEMA, VIEWS, VIEWS_SCHEMA, ManifestStore
from tasks.workers import RaySettings, connect_ray

# End to end with real services: deselect with -m 'not slow'; the timeout only guards against hangs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The tiny preset with its shortest schedule: 2 iterations at τ=999, one teacher step.
SHORT = {"distill_dt": 999, "k_initial": 2, "k": 1, "warmup_steps": 1, "teacher_steps": 1}
SHARED_EDITS = {"edits": [{"instruction": "make it snowy", "target_caption": "a photo in the snow"}]}


@pytest.fixture(scope="module", autouse=True)
def services(tmp_root: Path) -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=None):  # None: the setting conftest raises
        started = connect_ray(RaySettings(temp_dir=tmp_root / "ray-flows", num_cpus=2))
        yield
        if started:
            ray.shutdown()


def copy_examples(destination: Path) -> Path:
    shutil.copytree(EXAMPLES, destination, ignore=shutil.ignore_patterns("README*"))
    return destination


@dataclass
class Batch:
    root: Path
    output_root: Path
    cache_dir: Path
    summary: dict[str, Any]
    flow_run_id: Any

    def run(self, **changes: Any) -> tuple[dict[str, Any], Any]:
        return run_collection(self.root, self.output_root, self.cache_dir, **changes)


def run_collection(root: Path, output_root: Path, cache_dir: Path, *, failed: bool = False,
                   **changes: Any) -> tuple[dict[str, Any], Any]:
    parameters = {"root": str(root), "edits": SHARED_EDITS, "output_root": str(output_root), "preset": "tiny",
                  "config_overrides": SHORT, "cache_dir": str(cache_dir), **changes}
    state = edit_collection(**parameters, return_state=True)
    assert state.is_failed() if failed else state.is_completed(), state.message
    return state.result(raise_on_failure=False), state.state_details.flow_run_id


def flow_run_records(flow_run_id: Any) -> tuple[Any, list, list]:
    """The flow run, its task runs and its artifacts, as the API (and the UI) has them."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return flow_run, task_runs, artifacts


@pytest.fixture(scope="module")
def first_batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    base = tmp_path_factory.mktemp("first")
    root = copy_examples(base / "photos")
    summary, flow_run_id = run_collection(root, base / "out", base / "cache")
    return Batch(root, base / "out", base / "cache", summary, flow_run_id)


def clone(batch: Batch, destination: Path) -> Batch:
    """A copy of the batch's inputs and outputs (manifests record output paths relative to the root)."""
    root = Path(shutil.copytree(batch.root, destination / "photos"))
    output_root = Path(shutil.copytree(batch.output_root, destination / "out"))
    return Batch(root, output_root, batch.cache_dir, batch.summary, batch.flow_run_id)


def statuses(summary: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(row["scene"], row["edit"]): row["status"] for row in summary["runs"]}


def test_two_scenes_two_edits_write_manifests_and_images(first_batch: Batch) -> None:
    assert statuses(first_batch.summary) == {
        ("face", "Give him a Venetian mask"): "succeeded", ("face", "make it snowy"): "succeeded",
        ("person-small", "Turn him into a knight"): "succeeded", ("person-small", "make it snowy"): "succeeded",
    }
    store = ManifestStore(first_batch.output_root)
    for spec, schema in ((SCENES, SCENES_SCHEMA), (RUNS, RUNS_SCHEMA), (VIEWS, VIEWS_SCHEMA)):
        assert pq.read_schema(store.path(spec)).equals(schema, check_metadata=False)
    scenes = {row["scene_id"]: row for row in store.read_rows(SCENES)}
    assert sorted(scenes) == ["face", "person-small"]
    assert scenes["face"]["n_views"] == 4 and scenes["face"]["pose_source"] == "transforms"
    assert (scenes["face"]["width"], scenes["face"]["height"]) == (994, 738)
    runs = store.read_rows(RUNS)
    assert len(runs) == 4 and {run["status"] for run in runs} == {"succeeded"}
    for run in runs:
        assert run["iterations"] == 2 and run["preset"] == "tiny" and run["device_name"]
        assert run["clip_cons"] is not None and run["wall_seconds"] > 0
        assert run["flow_run_id"] == str(first_batch.flow_run_id)
        folder = first_batch.output_root / run["output_dir"]
        assert (folder / "contact_sheet.png").is_file() and (folder / "run.json").is_file()
    snowy_face = next(r for r in runs if r["scene_id"] == "face" and r["instruction"] == "make it snowy")
    assert snowy_face["source_caption"] == "A man with curly hair in a grey jacket"  # the scene's caption
    assert snowy_face["target_caption"] == "a photo in the snow" and snowy_face["clip_dir"] is not None
    views = store.read_rows(VIEWS)
    assert len(views) == 16
    for view in views:
        assert (first_batch.output_root / view["output_path"]).is_file()
        assert Path(view["input_path"]).is_file() and Path(view["input_path"]).is_relative_to(first_batch.root)


def test_prefect_shows_named_task_runs_and_artifacts(first_batch: Batch) -> None:
    flow_run, task_runs, artifacts = flow_run_records(first_batch.flow_run_id)
    assert flow_run.name == "edit-collection · photos · tiny"
    names = {run.name for run in task_runs}
    assert {"face · Give him a Venetian mask", "person-small · make it snowy", "prepare · face"} <= names
    assert all(run.state.is_completed() for run in task_runs)
    by_type: dict[str, list] = {}
    for artifact in artifacts:
        by_type.setdefault(artifact.type, []).append(artifact)
    assert len(by_type["progress"]) == 4 and all(a.data == 100.0 for a in by_type["progress"])
    markdown = [a for a in by_type["markdown"] if a.key and a.key.startswith("contact-sheet-")]
    assert len(markdown) == 4 and all("data:image/jpeg;base64," in a.data for a in markdown)
    tables = {a.key for a in by_type["table"]}
    suffix = str(first_batch.flow_run_id)[:8]
    assert f"summary-edit-collection-{suffix}" in tables and sum(key.startswith("metrics-") for key in tables) == 4
    assert all(artifact.key.endswith(suffix) for artifact in artifacts if artifact.key)  # one key per flow run


def test_an_edit_is_running_only_while_a_worker_has_it(first_batch: Batch) -> None:
    """One worker (CPU), four edits: their Running periods follow each other instead of overlapping."""
    _, task_runs, _ = flow_run_records(first_batch.flow_run_id)
    edits = sorted((run for run in task_runs if run.task_key.startswith("edit_run")), key=lambda run: run.start_time)
    assert len(edits) == 4
    for earlier, later in zip(edits, edits[1:]):
        assert later.start_time >= earlier.end_time, f"{later.name} ran while {earlier.name} still ran"


def test_a_rerun_does_no_work_and_says_so(first_batch: Batch, tmp_path: Path) -> None:
    batch = clone(first_batch, tmp_path)
    sheet = next(batch.output_root.glob("face/*/contact_sheet.png"))
    before = sheet.stat().st_mtime_ns
    summary, flow_run_id = batch.run()
    assert set(statuses(summary).values()) == {"skipped"} and summary["skipped"] == 4
    assert all(row["note"] == "already done with this config" for row in summary["runs"])
    keys = [{artifact.key for artifact in flow_run_records(run_id)[2]} for run_id in (first_batch.flow_run_id, flow_run_id)]
    assert not keys[0] & keys[1]  # the Artifacts page lists both runs' summaries
    assert sheet.stat().st_mtime_ns == before
    runs = ManifestStore(batch.output_root).read_rows(RUNS)
    assert sorted(run["status"] for run in runs) == ["skipped"] * 4 + ["succeeded"] * 4


def test_a_scene_uploaded_again_with_new_photos_is_edited_again(first_batch: Batch, tmp_path: Path) -> None:
    """Same folder name, same file names, other pixels: its edits run again; then nothing is left to do."""
    from PIL import Image, ImageDraw

    batch = clone(first_batch, tmp_path)
    before = {row["run_id"]: row for row in ManifestStore(batch.output_root).read_rows(RUNS)}
    assert all(row["scene_content_hash"] for row in before.values())
    photo = batch.root / "face" / "images" / "frame_00009.jpg"
    with Image.open(photo) as image:
        changed = image.copy()
    ImageDraw.Draw(changed).rectangle((100, 100, 400, 300), fill=(255, 0, 0))
    changed.save(photo, quality=95)
    sheet = next(batch.output_root.glob("face/*/contact_sheet.png"))
    sheet_before = sheet.stat().st_mtime_ns

    summary, _ = batch.run()
    assert statuses(summary) == {
        ("face", "Give him a Venetian mask"): "succeeded", ("face", "make it snowy"): "succeeded",
        ("person-small", "Turn him into a knight"): "skipped", ("person-small", "make it snowy"): "skipped",
    }
    assert sheet.stat().st_mtime_ns != sheet_before  # the published result is the new photos' edit
    runs = [row for row in ManifestStore(batch.output_root).read_rows(RUNS) if row["run_id"] not in before]
    old_hash = {row["scene_id"]: row["scene_content_hash"] for row in before.values()}
    new_face = [row for row in runs if row["scene_id"] == "face"]
    assert len(new_face) == 2 and all(row["status"] == "succeeded" for row in new_face)
    new_hashes = {row["scene_content_hash"] for row in new_face}
    assert len(new_hashes) == 1 and None not in new_hashes and old_hash["face"] not in new_hashes
    assert all(row["scene_content_hash"] == old_hash["person-small"] for row in runs if row["scene_id"] == "person-small")

    again, _ = batch.run()
    assert set(statuses(again).values()) == {"skipped"} and again["skipped"] == 4


def test_changing_a_config_value_reruns_only_what_it_changes(first_batch: Batch, tmp_path: Path) -> None:
    batch = clone(first_batch, tmp_path)
    edits_file = batch.root / "person-small" / "edits.yaml"
    edits_file.write_text(edits_file.read_text().replace("    text_cfg: 6.0", "    text_cfg: 6.0\n    config: {lr: 2.0e-4}"))
    summary, _ = batch.run()
    assert statuses(summary) == {
        ("face", "Give him a Venetian mask"): "skipped", ("face", "make it snowy"): "skipped",
        ("person-small", "Turn him into a knight"): "succeeded", ("person-small", "make it snowy"): "skipped",
    }
    runs = [r for r in ManifestStore(batch.output_root).read_rows(RUNS) if r["instruction"] == "Turn him into a knight"]
    assert len({r["config_hash"] for r in runs if r["status"] == "succeeded"}) == 2


def test_a_corrupt_scene_fails_alone_with_its_reason(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    shutil.copytree(EXAMPLES / "face", root / "face")
    shutil.copytree(EXAMPLES / "person-small", root / "broken")
    (root / "broken" / "images" / "frame_00258.png").write_bytes(b"these bytes are not a PNG")
    (root / "unplannable").mkdir()
    shutil.copytree(EXAMPLES / "face" / "images", root / "unplannable" / "images")
    (root / "unplannable" / "edits.yaml").write_text("edits:\n  - instruction: x\n    colour: red\n")
    summary, flow_run_id = run_collection(root, tmp_path / "out", tmp_path / "cache", edits=None, failed=True)
    assert statuses(summary) == {("face", "Give him a Venetian mask"): "succeeded",
                                 ("broken", "Turn him into a knight"): "failed",
                                 ("unplannable", None): "failed"}
    notes = {row["scene"]: row["note"] for row in summary["runs"]}
    assert all(row["output_dir"] is None for row in summary["runs"] if row["status"] == "failed")
    flow_run, task_runs, artifacts = flow_run_records(flow_run_id)
    assert flow_run.state.is_failed() and flow_run.state.message.startswith("2 of 3 edits failed: broken · ")
    assert "frame_00258.png" in flow_run.state.message
    states = {run.name: run.state.name for run in task_runs}
    assert states["ingest · broken"] == "Completed" and states["poses · broken"] == "Failed"  # not "RolledBack"
    assert "RolledBack" not in states.values()
    (table,) = [a for a in artifacts if a.type == "table" and a.key.startswith("summary-")]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["status"] for row in rows] == ["failed", "failed", "succeeded"]  # failures first
    assert "frame_00258.png" in rows[0]["reason"] and rows[2]["output"].startswith("face/")
    assert all(len(str(value)) <= 140 for row in rows for value in row.values())
    assert "frame_00258.png" in notes["broken"]
    assert "unplannable/edits.yaml" in notes["unplannable"] and "colour" in notes["unplannable"]
    runs = {row["scene_id"]: row for row in ManifestStore(tmp_path / "out").read_rows(RUNS)}
    assert runs["face"]["status"] == "succeeded"
    assert runs["broken"]["status"] == "failed" and "frame_00258.png" in runs["broken"]["error"]
    assert not (tmp_path / "out" / "broken").exists()


def test_edit_scene_fetches_a_remote_scene_and_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    root = upload_scene(EXAMPLES / "face", f"/bucket-{tmp_path.name}")
    state = edit_scene(scene_uri=f"{root}/face", root=root, output_root=str(tmp_path / "out"), preset="tiny",
                       config_overrides=SHORT, cache_dir=str(tmp_path / "cache"), return_state=True)
    summary = state.result()
    assert flow_run_records(state.state_details.flow_run_id)[0].name == "edit-scene · face · tiny"
    assert statuses(summary) == {("face", "Give him a Venetian mask"): "succeeded"}
    assert list((tmp_path / "cache" / "inputs").glob("*/face/images/frame_00001.jpg"))
    views = ManifestStore(tmp_path / "out").read_rows(VIEWS)
    assert sorted(view["input_path"] for view in views) == [
        f"{root}/face/images/frame_{number}.jpg" for number in ("00001", "00009", "00020", "00023")]
    state = edit_scene(scene_uri=f"{root}/../elsewhere/face", root=root, output_root=str(tmp_path / "out"),
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(SceneError, match="outside the collection root"):
        state.result()


def test_cli_collection_runs_the_flow_and_reports(first_batch: Batch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    batch = clone(first_batch, tmp_path)
    edits_file = tmp_path / "shared.json"
    edits_file.write_text(json.dumps(SHARED_EDITS))
    settings = [item for key, value in SHORT.items() for item in ("--set", f"{key}={value}")]
    code = main(["collection", str(batch.root), "--edits", str(edits_file), "--out", str(batch.output_root),
                 "--preset", "tiny", "--cache", str(batch.cache_dir), *settings])
    out = capsys.readouterr().out
    assert code == 0
    assert "0 succeeded, 0 failed, 4 skipped" in out and "skipped    face · make it snowy" in out


def test_modes_listed_per_edit_fan_out_into_their_own_runs_and_rows(tmp_path: Path) -> None:
    """2 scenes × 1 edit × modes {distill, teacher_only, t2vz}: six runs, six folders, six manifest rows
    with their mode, teacher and metrics; the re-run skips all six."""
    root = copy_examples(tmp_path / "photos")
    for own in root.glob("*/edits.yaml"):
        own.unlink()  # only the collection-wide edit below
    edits = {"edits": [{"instruction": "make it snowy", "target_caption": "a photo in the snow",
                        "modes": ["distill", "teacher_only", "t2vz"]}]}
    summary, _ = run_collection(root, tmp_path / "out", tmp_path / "cache", edits=edits)
    assert summary["succeeded"] == 6 and summary["failed"] == 0
    assert sorted((row["scene"], row["mode"]) for row in summary["runs"]) == sorted(
        (scene, mode) for scene in ("face", "person-small") for mode in ("distill", "teacher_only", "t2vz"))
    runs = ManifestStore(tmp_path / "out").read_rows(RUNS)
    assert len(runs) == 6 and {run["status"] for run in runs} == {"succeeded"}
    assert len({(run["scene_id"], run["edit_id"], run["mode"]) for run in runs}) == 6
    assert len({run["output_dir"] for run in runs}) == 6 and {run["teacher"] for run in runs} == {"ip2p"}
    for run in runs:
        assert run["clip_sim"] is not None and run["clip_cons"] is not None and run["epipolar_source_fraction"] is not None
        assert run["iterations"] == (2 if run["mode"] == "distill" else 0)
        assert (tmp_path / "out" / run["output_dir"] / "contact_sheet.png").is_file()
    again, _ = run_collection(root, tmp_path / "out", tmp_path / "cache", edits=edits)
    assert again["skipped"] == 6 and again["succeeded"] == again["failed"] == 0
