"""Manifests: explicit schemas, upserts, concurrent writers, corrupt files, three readers."""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imix2mix.manifests import (
    RUNS,
    RUNS_SCHEMA,
    SCENES,
    SCENES_SCHEMA,
    VIEWS,
    VIEWS_SCHEMA,
    ManifestError,
    ManifestStore,
    succeeded_runs,
)
from imix2mix.storage import publish_dir, staging_dir

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)


def run_row(run_id: str, status: str = "succeeded", **changes: object) -> dict:
    row = {
        "run_id": run_id, "scene_id": "face", "edit_id": "make-it-snowy-1234abcd", "instruction": "make it snowy",
        "source_caption": None, "target_caption": "a snowy face", "config_hash": "c0ffee",
        "scene_content_hash": "5ce" * 21 + "5", "preset": "tiny",
        "seed": 42, "status": status, "error": None, "started_at": NOW, "finished_at": NOW, "wall_seconds": 1.5,
        "iterations": 3, "peak_gpu_memory_bytes": None, "device_name": "cpu", "clip_sim": 0.2, "clip_dir": 0.1,
        "clip_cons": 0.9, "output_dir": "/out/face/make-it-snowy-1234abcd", "flow_run_id": None,
    }
    row.update(changes)
    return row


def test_tables_have_the_documented_schemas_and_three_readers_agree(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    store.upsert(SCENES, [{"scene_id": "face", "source_uri": "/in/face", "n_views": 4, "width": 994, "height": 738,
                           "pose_source": "transforms", "content_hash": "ab" * 32, "ingested_at": NOW}])
    store.upsert(RUNS, [run_row("r1"), run_row("r2", status="failed", error="boom", clip_sim=None)])
    store.upsert(VIEWS, [{"run_id": "r1", "scene_id": "face", "edit_id": "e", "view_index": i,
                          "input_path": f"/in/{i}.jpg", "output_path": f"/out/view_{i:02d}.png"} for i in range(4)])
    for spec, schema in ((SCENES, SCENES_SCHEMA), (RUNS, RUNS_SCHEMA), (VIEWS, VIEWS_SCHEMA)):
        assert pq.read_schema(store.path(spec)).equals(schema, check_metadata=False)
    runs = pd.read_parquet(store.path(RUNS))
    assert list(runs.columns) == RUNS_SCHEMA.names
    assert runs.set_index("run_id").loc["r2", "error"] == "boom"
    assert str(runs["started_at"].dt.tz) == "UTC"
    counts = duckdb.sql(
        f"select count(*), count(*) filter (where status = 'failed') from '{store.path(RUNS)}'").fetchall()
    assert counts == [(2, 1)]
    assert duckdb.sql(f"select max(view_index) from '{store.path(VIEWS)}'").fetchall() == [(3,)]
    assert store.read(SCENES).column("n_views").to_pylist() == [4]


def test_upsert_replaces_rows_with_the_same_key(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    store.upsert(RUNS, [run_row("r1", status="failed", error="first try")])
    store.upsert(RUNS, [run_row("r1"), run_row("r2", config_hash="other")])
    rows = {row["run_id"]: row for row in store.read_rows(RUNS)}
    assert set(rows) == {"r1", "r2"} and rows["r1"]["status"] == "succeeded" and rows["r1"]["error"] is None
    assert set(succeeded_runs(store)) == {("face", "make-it-snowy-1234abcd", "c0ffee"),
                                          ("face", "make-it-snowy-1234abcd", "other")}


def test_bad_rows_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    store.upsert(RUNS, [run_row("r1")])
    with pytest.raises(ValueError, match="status must be one of"):
        store.upsert(RUNS, [run_row("r2", status="done")])
    with pytest.raises(ValueError, match="no column"):
        store.upsert(RUNS, [{**run_row("r3"), "colour": "red"}])
    assert [row["run_id"] for row in store.read_rows(RUNS)] == ["r1"]


def _write_runs(output_root: str, worker: int, count: int) -> None:
    store = ManifestStore(output_root)
    for index in range(count):
        store.upsert_many({"runs": [run_row(f"w{worker}-{index}")],
                           "views": [{"run_id": f"w{worker}-{index}", "scene_id": "face", "edit_id": "e",
                                      "view_index": 0}]})


def test_concurrent_writers_in_several_processes_lose_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_runs, args=(str(tmp_path), worker, 6)) for worker in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [process.exitcode for process in workers] == [0, 0, 0]
    store = ManifestStore(tmp_path)
    expected = {f"w{worker}-{index}" for worker in range(3) for index in range(6)}
    assert {row["run_id"] for row in store.read_rows(RUNS)} == expected
    assert {row["run_id"] for row in store.read_rows(VIEWS)} == expected
    assert not [path for path in store.folder.iterdir() if path.name.endswith(".tmp")]


def test_corrupt_manifest_is_moved_aside_not_overwritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ManifestStore(tmp_path)
    store.folder.mkdir(parents=True)
    garbage = b"this is not parquet"
    store.path(RUNS).write_bytes(garbage)
    with pytest.raises(ManifestError, match=r"runs.parquet: cannot be read as Parquet"):
        store.read(RUNS)
    store.upsert(RUNS, [run_row("r1")])
    (aside,) = store.folder.glob("runs.corrupt-*.parquet")
    assert aside.read_bytes() == garbage
    assert "moved it aside" in caplog.text and str(aside) in caplog.text
    assert [row["run_id"] for row in store.read_rows(RUNS)] == ["r1"]


def test_older_manifest_without_a_new_nullable_column_still_reads(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    store.folder.mkdir(parents=True)
    old = pa.Table.from_pylist([run_row("r1")], schema=RUNS_SCHEMA).drop_columns(["flow_run_id"])
    pq.write_table(old, store.path(RUNS))
    assert store.read_rows(RUNS)[0]["flow_run_id"] is None
    # Written before runs recorded the scene's content hash: reads, and can still be added to.
    older = pa.Table.from_pylist([run_row("r1")], schema=RUNS_SCHEMA).drop_columns(["scene_content_hash"])
    pq.write_table(older, store.path(RUNS))
    assert store.read_rows(RUNS)[0]["scene_content_hash"] is None
    store.upsert(RUNS, [run_row("r2")])
    assert pq.read_schema(store.path(RUNS)).equals(RUNS_SCHEMA, check_metadata=False)
    assert {row["run_id"]: row["scene_content_hash"] for row in store.read_rows(RUNS)} == {
        "r1": None, "r2": "5ce" * 21 + "5"}
    assert succeeded_runs(store)[("face", "make-it-snowy-1234abcd", "c0ffee")]["scene_content_hash"] is not None
    wrong = pa.table({"scene_id": ["x"]})
    pq.write_table(wrong, store.path(SCENES))
    with pytest.raises(ManifestError, match="has no 'source_uri' column"):
        store.read(SCENES)


def test_publish_dir_keeps_the_old_outputs_until_the_new_are_complete(tmp_path: Path) -> None:
    final = tmp_path / "face" / "edit"
    first = staging_dir(final)
    (first / "view_00.png").write_bytes(b"one")
    publish_dir(first, final)
    second = staging_dir(final)
    (second / "view_00.png").write_bytes(b"two")
    assert (final / "view_00.png").read_bytes() == b"one"  # untouched while the new run writes
    publish_dir(second, final)
    assert (final / "view_00.png").read_bytes() == b"two"
    assert sorted(path.name for path in final.parent.iterdir()) == ["edit"]
