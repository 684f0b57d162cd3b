"""Parquet manifests of a collection's output root: ``manifests/{scenes,runs,views}.parquet``.

Schemas are explicit (see ``docs/manifests.md``).  The output root is a local folder or an fsspec URL
(:mod:`imix2mix.storage`).  Every write is a read-modify-write of the whole table under an exclusive
lock (:meth:`ManifestStore.locked`; several scenes may finish at once, in threads or processes), and
lands atomically: locally a temporary file in the same folder, fsynced, then ``os.replace``; on an
object store one PUT.  Rows are upserted by each table's key.  The file replaced by a write is kept
as ``<name>.previous.parquet``, and a reader falls back to it when the current file cannot be read.
A manifest that cannot be read is never overwritten: the next write moves it aside to
``<name>.corrupt-<UTC time>.parquet``, warns, and continues from the previous generation.
:func:`rebuild_manifests` rebuilds the rows of succeeded runs from their ``run.json`` files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imix2mix.errors import ImixError
from imix2mix.storage import OutputRoot, claim_file, open_output_root, release_claim

logger = logging.getLogger(__name__)

_TIMESTAMP = pa.timestamp("us", tz="UTC")

SCENES_SCHEMA = pa.schema(
    [
        pa.field("scene_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("n_views", pa.int32(), nullable=False),
        pa.field("width", pa.int32()),  # of the first view; views may differ in size
        pa.field("height", pa.int32()),
        pa.field("pose_source", pa.string()),  # transforms | colmap | sfm
        pa.field("registered_views", pa.int32()),
        pa.field("mean_reprojection_error_px", pa.float64()),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("ingested_at", _TIMESTAMP, nullable=False),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scene_id", pa.string(), nullable=False),
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("source_caption", pa.string()),
        pa.field("target_caption", pa.string()),
        pa.field("config_hash", pa.string(), nullable=False),
        # collection.scene_content_hash of the scene's files when planned; null in files written before it existed
        pa.field("scene_content_hash", pa.string()),
        pa.field("preset", pa.string(), nullable=False),
        # the run mode and the teacher (EditConfig.mode, .teacher.name / .model_id); null in files written before them
        pa.field("mode", pa.string()),
        pa.field("teacher", pa.string()),
        pa.field("teacher_id", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("status", pa.string(), nullable=False),  # succeeded | failed | skipped
        pa.field("error", pa.string()),
        pa.field("started_at", _TIMESTAMP),
        pa.field("finished_at", _TIMESTAMP),
        pa.field("wall_seconds", pa.float64()),
        pa.field("iterations", pa.int64()),
        pa.field("peak_gpu_memory_bytes", pa.int64()),
        pa.field("device_name", pa.string()),
        pa.field("clip_sim", pa.float64()),
        pa.field("clip_dir", pa.float64()),
        pa.field("clip_cons", pa.float64()),
        pa.field("output_dir", pa.string()),  # relative to the output root (the folder holding manifests/)
        pa.field("flow_run_id", pa.string()),
        # imix2mix.evaluation: epipolar consistency (edited / source consistent pair fractions) and the no-edit check
        pa.field("epipolar_score", pa.float64()),
        pa.field("epipolar_consistent_fraction", pa.float64()),
        pa.field("epipolar_source_fraction", pa.float64()),
        pa.field("epipolar_median_px", pa.float64()),
        pa.field("changed_fraction", pa.float64()),
        pa.field("no_edit", pa.bool_()),
    ]
)

# Columns a skipped row repeats from the success it points at.
RUN_RESULT_COLUMNS = ("clip_sim", "clip_dir", "clip_cons", "iterations", "device_name", "epipolar_score",
                      "epipolar_consistent_fraction", "epipolar_source_fraction", "epipolar_median_px",
                      "changed_fraction", "no_edit")

VIEWS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scene_id", pa.string(), nullable=False),
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("view_index", pa.int32(), nullable=False),
        pa.field("input_path", pa.string()),
        pa.field("output_path", pa.string()),  # relative to the output root
        pa.field("clip_sim", pa.float64()),
        pa.field("clip_dir", pa.float64()),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scene_id", pa.string(), nullable=False),
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("views", pa.string(), nullable=False),  # edited | source
        pa.field("view_i", pa.int32(), nullable=False),
        pa.field("view_j", pa.int32(), nullable=False),
        pa.field("matches", pa.int32()),
        pa.field("median_px", pa.float64()),
        pa.field("under_2px", pa.float64()),
        pa.field("under_4px", pa.float64()),
        pa.field("under_8px", pa.float64()),
        pa.field("status", pa.string()),  # consistent | inconsistent | insufficient
        pa.field("clip_cons", pa.float64()),  # the pair's CLIP consistency (edited rows only)
    ]
)

RUN_STATUSES = ("succeeded", "failed", "skipped")


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]

    @property
    def file_name(self) -> str:
        return f"{self.name}.parquet"


SCENES = TableSpec("scenes", SCENES_SCHEMA, ("scene_id",))
RUNS = TableSpec("runs", RUNS_SCHEMA, ("run_id",))
VIEWS = TableSpec("views", VIEWS_SCHEMA, ("run_id", "view_index"))
PAIRS = TableSpec("pairs", PAIRS_SCHEMA, ("run_id", "views", "view_i", "view_j"))
TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (SCENES, RUNS, VIEWS, PAIRS)}


class ManifestError(ImixError):
    """A manifest file exists but cannot be read as its table."""

    def __init__(self, path: Path | str, reason: str):
        self.path = path
        super().__init__(f"{path}: {reason}")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _table(spec: TableSpec | str) -> TableSpec:
    if isinstance(spec, TableSpec):
        return spec
    try:
        return TABLES[spec]
    except KeyError:
        raise ValueError(f"unknown manifest table {spec!r}; known: {sorted(TABLES)}") from None


def rows_to_table(spec: TableSpec | str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a table with exactly ``spec``'s schema; unknown keys are an error, missing ones null."""
    spec = _table(spec)
    names = set(spec.schema.names)
    for row in rows:
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"{spec.name} manifest has no column(s) {sorted(unknown)}")
    if spec is RUNS:
        bad = {row.get("status") for row in rows} - set(RUN_STATUSES)
        if bad:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {sorted(map(str, bad))}")
    columns = {name: [row.get(name) for row in rows] for name in spec.schema.names}
    return pa.Table.from_pydict(columns, schema=spec.schema)


LOCK_STALE_SECONDS = 600  # a manifest lock object older than this on an object store is taken over


class ManifestStore:
    """The manifests of one output root (``<output_root>/manifests``), a local folder or an fsspec URL.

    Each table keeps its previous good generation beside it (``<name>.previous.parquet``); reading a
    table that is unreadable (truncated, corrupt) falls back to it.
    """

    def __init__(self, output_root: str | os.PathLike[str] | OutputRoot):
        self.root = open_output_root(output_root)
        self.folder = Path(self.root.fs_path("manifests"))  # local roots; on object stores its fsspec path

    def _relative(self, spec: TableSpec | str, generation: str = "") -> str:
        spec = _table(spec)
        return f"manifests/{spec.name}{generation}.parquet"

    def path(self, spec: TableSpec | str) -> Path | str:
        """The table's file: a local path, or its URL on an object store."""
        relative = self._relative(spec)
        return self.root.local_path(relative) if self.root.is_local else self.root.uri_of(relative)

    def previous_path(self, spec: TableSpec | str) -> Path | str:
        relative = self._relative(spec, PREVIOUS)
        return self.root.local_path(relative) if self.root.is_local else self.root.uri_of(relative)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock shared by every writer of this root (threads and processes alike).

        Locally an ``fcntl.flock`` on ``manifests/.lock``.  On an object store an ``flock`` on a local
        file serialises this machine's writers, and the lock object ``manifests/.lock`` (a claim:
        created only if absent, taken over when stale) the machines sharing the root.
        """
        if self.root.is_local:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock_file = self.folder / ".lock"
        else:
            digest = hashlib.sha256(self.root.uri.encode()).hexdigest()[:24]
            lock_file = Path(tempfile.gettempdir()) / "imix2mix-locks" / f"{digest}.lock"
            lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if self.root.is_local:
                    yield
                else:
                    with self._lock_object():
                        yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _lock_object(self) -> Iterator[None]:
        relative = "manifests/.lock"
        while claim_file(self.root, relative, LOCK_STALE_SECONDS, purpose="manifests") is not None:
            time.sleep(0.2)  # another machine writes; a write holds the lock for about a second
        try:
            yield
        finally:
            release_claim(self.root, relative)

    def _read_file(self, spec: TableSpec, relative: str) -> pa.Table | None:
        """The table in ``relative``; None when the file does not exist."""
        where = self.root.uri_of(relative)
        try:
            data = self.root.read_bytes(relative)
        except FileNotFoundError:
            return None
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(where, f"cannot be read as Parquet ({exc})") from exc
        return _conform(table, spec, where)

    def _read_with_fallback(self, spec: TableSpec) -> tuple[pa.Table, bool]:
        """(table, current file good): the current file, else its previous generation with a warning."""
        try:
            table = self._read_file(spec, self._relative(spec))
            return (spec.schema.empty_table() if table is None else table), True
        except ManifestError as exc:
            try:
                previous = self._read_file(spec, self._relative(spec, PREVIOUS))
            except ManifestError:
                previous = None
            if previous is None:
                raise
            logger.warning("%s; reading its previous generation %s (%d rows)", exc, self.previous_path(spec),
                           previous.num_rows)
            return previous, False

    def read(self, spec: TableSpec | str) -> pa.Table:
        """The whole table (empty when the file does not exist yet).

        A table that cannot be read falls back to its previous generation; with none, raises
        :class:`ManifestError` naming the file.  ``views`` rows of runs the ``runs`` table does not
        hold are left out.  Reading needs no lock: writers replace the file atomically.
        """
        spec = _table(spec)
        table = self._read_with_fallback(spec)[0]
        if spec is VIEWS:
            table = _views_of_runs(table, self._read_with_fallback(RUNS)[0])
        return table

    def read_rows(self, spec: TableSpec | str) -> list[dict[str, Any]]:
        return self.read(spec).to_pylist()

    def upsert(self, spec: TableSpec | str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert ``rows``, replacing existing rows with the same key."""
        self.upsert_many({_table(spec).name: rows})

    def upsert_many(self, changes: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Upsert into several tables under one lock (e.g. a run and its views); ``runs`` is written before
        ``views``, and ``views`` keeps only rows of runs the ``runs`` table holds."""
        tables = {name: rows_to_table(_table(name), rows) for name, rows in changes.items()}  # refuse bad rows first
        with self.locked():
            runs = None
            for spec in sorted((_table(name) for name in tables), key=lambda spec: list(TABLES).index(spec.name)):
                existing = self._read_for_update(spec)
                merged = _upsert(existing, tables[spec.name], spec.key)
                if spec is RUNS:
                    runs = merged
                if spec is VIEWS:
                    merged = _views_of_runs(merged, runs if runs is not None else self._read_for_update(RUNS))
                self._write(spec, merged)

    def _read_for_update(self, spec: TableSpec) -> pa.Table:
        """The table to update: the current file, else its previous generation, else empty.  A file that
        cannot be read is never overwritten: it is moved aside first."""
        try:
            table, current_good = self._read_with_fallback(spec)
        except ManifestError as exc:
            aside = self._move_aside(spec)
            logger.warning("%s; moved it aside to %s and starting a new %s manifest", exc, aside, spec.name)
            return spec.schema.empty_table()
        if not current_good:
            aside = self._move_aside(spec)
            logger.warning("%s manifest: moved the unreadable file aside to %s; continuing from its previous "
                           "generation", spec.name, aside)
        return table

    def _move_aside(self, spec: TableSpec) -> str:
        stamp = utc_now().strftime("%Y%m%dT%H%M%S%fZ")
        aside = self._relative(spec, f".corrupt-{stamp}")
        if self.root.is_local:
            os.replace(self.root.local_path(self._relative(spec)), self.root.local_path(aside))
        else:
            self.root.copy_file(self._relative(spec), aside)
            self.root.remove(self._relative(spec))
        return self.root.uri_of(aside)

    def _write(self, spec: TableSpec, table: pa.Table) -> None:
        """Keep the current (good) file as the previous generation, then replace it atomically."""
        relative = self._relative(spec)
        if self.root.exists(relative):
            self.root.copy_file(relative, self._relative(spec, PREVIOUS))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.root.write_bytes(relative, sink.getvalue().to_pybytes())
        if self.root.is_local:
            _fsync_folder(self.folder)


PREVIOUS = ".previous"  # <name>.previous.parquet: the generation before the last write


def _views_of_runs(views: pa.Table, runs: pa.Table) -> pa.Table:
    """``views`` without rows whose run is not in ``runs``."""
    known = set(runs.column("run_id").to_pylist())
    keep = [run_id in known for run_id in views.column("run_id").to_pylist()]
    return views.filter(pa.array(keep, pa.bool_())) if not all(keep) else views


def _conform(table: pa.Table, spec: TableSpec, path: Path) -> pa.Table:
    """``table`` cast to ``spec.schema``; columns added later in the schema's life read as null."""
    columns = []
    for schema_field in spec.schema:
        if schema_field.name in table.column_names:
            column = table.column(schema_field.name)
            try:
                columns.append(column.cast(schema_field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ManifestError(path, f"column {schema_field.name!r} has type {column.type}, "
                                          f"expected {schema_field.type} ({exc})") from exc
        elif schema_field.nullable:
            columns.append(pa.nulls(table.num_rows, schema_field.type))
        else:
            raise ManifestError(path, f"has no {schema_field.name!r} column; is this a {spec.name} manifest?")
    return pa.Table.from_arrays(columns, schema=spec.schema)


def _upsert(existing: pa.Table, new: pa.Table, key: Sequence[str]) -> pa.Table:
    new_keys = set(zip(*(new.column(name).to_pylist() for name in key)))
    if existing.num_rows and new_keys:
        keep = [k not in new_keys for k in zip(*(existing.column(name).to_pylist() for name in key))]
        existing = existing.filter(pa.array(keep, pa.bool_()))
    return pa.concat_tables([existing, new]).combine_chunks()


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------------------------------
# Rows kept in run.json, and rebuilding the tables from them
# --------------------------------------------------------------------------------------------------


def rows_to_json(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Manifest rows by table as JSON data (timestamps as ISO 8601), for a run's ``run.json``."""
    return {name: [{key: value.isoformat() if isinstance(value, datetime) else value for key, value in row.items()}
                   for row in table_rows] for name, table_rows in rows.items()}


def rows_from_json(data: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The inverse of :func:`rows_to_json` (unknown tables are ignored)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, table_rows in data.items():
        if name not in TABLES:
            continue
        timestamps = {f.name for f in TABLES[name].schema if pa.types.is_timestamp(f.type)}
        rows[name] = [{key: datetime.fromisoformat(value) if key in timestamps and isinstance(value, str) else value
                       for key, value in row.items()} for row in table_rows]
    return rows


RUN_JSON_PATTERN = "*/*/run.json"  # <scene>/<run folder>/run.json under an output root


def rebuild_manifests(output_root: str | os.PathLike[str] | OutputRoot) -> dict[str, int]:
    """Rebuild the manifests from the run folders: every published folder's ``run.json`` written by a
    collection run holds its own scene, run and view rows; they are upserted into what the tables still
    hold (the current files, else their previous generation; unreadable files are moved aside).
    Returns the number of rows recovered per table, and ``skipped`` run.json files (not written by a
    collection run, or unreadable)."""
    store = ManifestStore(output_root)
    root = store.root
    recovered: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    skipped = 0
    for relative in root.glob(RUN_JSON_PATTERN):
        folder = posixpath.dirname(relative)
        if posixpath.basename(folder).startswith(".") or not root.is_published(folder):
            continue  # staging folders and half-published ones
        try:
            manifest = json.loads(root.read_bytes(relative)).get("manifest")
            rows = rows_from_json(manifest) if isinstance(manifest, Mapping) else None
        except (ValueError, UnicodeDecodeError, TypeError, AttributeError):
            rows = None
        if not rows:
            skipped += 1
            continue
        for name, table_rows in rows.items():
            recovered[name] += table_rows
    # The latest scene row per scene wins; runs and views are keyed by run.
    scenes = {row["scene_id"]: row for row in sorted(recovered[SCENES.name], key=lambda row: row["ingested_at"])}
    recovered[SCENES.name] = list(scenes.values())
    store.upsert_many({name: rows for name, rows in recovered.items()})
    return {**{name: len(rows) for name, rows in recovered.items()}, "skipped": skipped}


# --------------------------------------------------------------------------------------------------
# Queries the pipeline needs
# --------------------------------------------------------------------------------------------------


def succeeded_runs(store: ManifestStore) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The latest succeeded run per (scene_id, edit_id, config_hash)."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in store.read_rows(RUNS):
        if row["status"] != "succeeded":
            continue
        key = (row["scene_id"], row["edit_id"], row["config_hash"])
        previous = latest.get(key)
        if previous is None or (row["finished_at"] or datetime.min.replace(tzinfo=timezone.utc)) >= (
            previous["finished_at"] or datetime.min.replace(tzinfo=timezone.utc)
        ):
            latest[key] = row
    return latest


def new_run_id() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------------
# Rows from pipeline objects
# --------------------------------------------------------------------------------------------------


def scene_row(scene_id: str, source_uri: str, scene: Any, ingested_at: datetime | None = None) -> dict[str, Any]:
    """The ``scenes`` row of a loaded :class:`~imix2mix.scene.Scene`.

    Views posed by a ``transforms.json`` count as registered; SfM / COLMAP scenes report their own.
    """
    registration = scene.registration
    registered = len(scene.views) if registration is None else sum(view.registered for view in registration.views)
    return {
        "scene_id": scene_id,
        "source_uri": source_uri,
        "n_views": len(scene.views),
        "width": scene.views[0].width,
        "height": scene.views[0].height,
        "pose_source": scene.pose_source,
        "registered_views": registered,
        "mean_reprojection_error_px": None if registration is None else registration.mean_reprojection_error,
        "content_hash": scene.content_hash,
        "ingested_at": ingested_at or utc_now(),
    }


def run_row(
    run: Any,
    *,
    run_id: str,
    status: str,
    preset: str,
    started_at: datetime | None,
    finished_at: datetime | None = None,
    error: str | None = None,
    result: Any = None,
    metrics: Any = None,
    output_dir: str | os.PathLike[str] | None = None,
    flow_run_id: str | None = None,
    evaluation: Any = None,
) -> dict[str, Any]:
    """The ``runs`` row of a :class:`~imix2mix.collection.PlannedRun` (with its result once it succeeded;
    ``evaluation``: its :class:`~imix2mix.evaluation.RunEvaluation`)."""
    finished_at = finished_at or utc_now()
    return {**_evaluation_columns(evaluation),
        "run_id": run_id,
        "scene_id": run.scene.scene_id,
        "edit_id": run.edit.edit_id,
        "instruction": run.edit.instruction,
        "source_caption": run.edit.source_caption,
        "target_caption": run.edit.target_caption,
        "config_hash": run.config_hash,
        "scene_content_hash": run.scene_content_hash,
        "preset": preset,
        "mode": run.config.mode,
        "teacher": run.config.teacher.name,
        "teacher_id": run.config.teacher.model_id,
        "seed": run.config.seed,
        "status": status,
        "error": error,
        "started_at": started_at,
        "finished_at": finished_at,
        "wall_seconds": None if started_at is None else (finished_at - started_at).total_seconds(),
        "iterations": None if result is None else result.iterations,
        "peak_gpu_memory_bytes": None if result is None else result.peak_memory_bytes,
        "device_name": None if result is None else result.device,
        "clip_sim": None if metrics is None else metrics.clip_sim,
        "clip_dir": None if metrics is None else metrics.clip_dir,
        "clip_cons": None if metrics is None else metrics.clip_cons,
        "output_dir": None if output_dir is None else os.fspath(output_dir),
        "flow_run_id": flow_run_id,
    }


def _evaluation_columns(evaluation: Any) -> dict[str, Any]:
    if evaluation is None:
        return {}
    epipolar = evaluation.epipolar
    return {
        "epipolar_score": epipolar.score,
        "epipolar_consistent_fraction": epipolar.edited.consistent_fraction,
        "epipolar_source_fraction": epipolar.source.consistent_fraction,
        "epipolar_median_px": epipolar.edited.median_px,
        "changed_fraction": evaluation.change.changed_fraction,
        "no_edit": evaluation.no_edit,
    }


def pair_rows(run: Any, *, run_id: str, evaluation: Any, metrics: Any = None) -> list[dict[str, Any]]:
    """One ``pairs`` row per view pair (i < j) of the edited views and of the source views."""
    if evaluation is None:
        return []
    clip = list(metrics.pair_consistency) if metrics is not None else []
    rows = []
    for name, view_set in (("edited", evaluation.epipolar.edited), ("source", evaluation.epipolar.source)):
        for index, pair in enumerate(view_set.pairs):
            rows.append({
                "run_id": run_id, "scene_id": run.scene.scene_id, "edit_id": run.edit.edit_id, "views": name,
                "view_i": pair.i, "view_j": pair.j, "matches": pair.matches, "median_px": pair.median_px,
                "under_2px": pair.under_2px, "under_4px": pair.under_4px, "under_8px": pair.under_8px,
                "status": pair.status,
                "clip_cons": clip[index] if name == "edited" and index < len(clip) else None,
            })
    return rows


def view_rows(
    run: Any,
    *,
    run_id: str,
    input_uris: Sequence[str],
    output_paths: Sequence[str | os.PathLike[str]],
    metrics: Any = None,
) -> list[dict[str, Any]]:
    """One ``views`` row per edited view, in the scene's view order."""
    per_view = list(metrics.views) if metrics is not None else []
    return [
        {
            "run_id": run_id,
            "scene_id": run.scene.scene_id,
            "edit_id": run.edit.edit_id,
            "view_index": index,
            "input_path": input_uri,
            "output_path": os.fspath(output_path),
            "clip_sim": per_view[index].clip_sim if index < len(per_view) else None,
            "clip_dir": per_view[index].clip_dir if index < len(per_view) else None,
        }
        for index, (input_uri, output_path) in enumerate(zip(input_uris, output_paths, strict=True))
    ]
