"""Manifest writes of the pipeline (thin wrappers: rows are built in :mod:`imix2mix.manifests`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imix2mix.collection import PlannedRun, release_run
from imix2mix.manifests import (PAIRS, RUN_RESULT_COLUMNS, RUNS, SCENES, VIEWS, ManifestStore, new_run_id, pair_rows, run_row, scene_row,
                                utc_now, view_rows)
from imix2mix.storage import OutputRoot


def success_rows(run: PlannedRun, *, run_id: str, preset: str, started_at: Any, finished_at: Any, scene: Any,
                 scene_folder: Path, outcome: Any, view_files: list[str],
                 flow_run_id: str | None, evaluation: Any = None) -> dict[str, list[dict[str, Any]]]:
    """The scene, run, view and view-pair rows of a succeeded run, by table (also kept in its run.json).

    Output paths are recorded relative to the output root, so an output folder can be moved.
    """
    started_at = outcome.started_at or started_at  # from when an actor took it, not from queueing
    row = run_row(run, run_id=run_id, status="succeeded", preset=preset, started_at=started_at,
                  finished_at=finished_at, result=outcome.result, metrics=outcome.metrics,
                  output_dir=run.output_subdir, flow_run_id=flow_run_id, evaluation=evaluation)
    inputs = [run.scene.uri_of(Path(os.path.relpath(view.path, scene_folder)).as_posix()) for view in scene.views]
    outputs = [run.output_subdir / name for name in view_files]
    views = view_rows(run, run_id=run_id, input_uris=inputs, output_paths=outputs, metrics=outcome.metrics)
    pairs = pair_rows(run, run_id=run_id, evaluation=evaluation, metrics=outcome.metrics)
    return {SCENES.name: [scene_row(run.scene.scene_id, run.scene.uri, scene)], RUNS.name: [row], VIEWS.name: views,
            PAIRS.name: pairs}


def record_success(output_root: OutputRoot, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Write a succeeded run's rows (:func:`success_rows`) in one locked update; returns the run row."""
    ManifestStore(output_root).upsert_many({table: rows[table] for table in (RUNS.name, VIEWS.name, PAIRS.name)})
    return rows[RUNS.name][0]


def record_failure(output_root: OutputRoot, run: PlannedRun, *, run_id: str, preset: str, started_at: Any,
                   error: BaseException | str, flow_run_id: str | None) -> dict[str, Any]:
    """Write a failed run row with the reason (the exception's message, naming the file where known)."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    row = run_row(run, run_id=run_id, status="failed", preset=preset, started_at=started_at, error=message,
                  flow_run_id=flow_run_id)
    ManifestStore(output_root).upsert(RUNS, [row])
    return row


def record_failures(output_root: OutputRoot, runs: list[PlannedRun], *, error: str, preset: str,
                    flow_run_id: str | None) -> list[dict[str, Any]]:
    """Failed rows for runs that never reached a worker (their scene could not be loaded); their claims go."""
    now = utc_now()
    rows = [run_row(run, run_id=new_run_id(), status="failed", preset=preset, started_at=now, finished_at=now,
                    error=error, flow_run_id=flow_run_id) for run in runs]
    ManifestStore(output_root).upsert(RUNS, rows)
    for run in runs:
        release_run(run)
    return rows


def record_skipped(output_root: OutputRoot, runs: list[PlannedRun], *, preset: str,
                   flow_run_id: str | None) -> list[dict[str, Any]]:
    """One skipped row per run that an earlier run with the same config already produced, or that another
    batch has claimed (then without an output folder: it is not written yet)."""
    now = utc_now()
    rows = []
    for run in runs:
        previous = run.previous_run or {}
        row = run_row(run, run_id=new_run_id(), status="skipped", preset=preset, started_at=now, finished_at=now,
                      output_dir=previous.get("output_dir"), flow_run_id=flow_run_id)
        for metric in RUN_RESULT_COLUMNS:
            row[metric] = previous.get(metric)
        rows.append(row)
    if rows:
        ManifestStore(output_root).upsert(RUNS, rows)
    return rows
