"""``edit-collection``: edit every scene of a collection with every requested edit.

Plans scenes × edits, skips what the manifest says already succeeded with the same config on the
same scene contents (a scene uploaded again with other photos is edited again), then
fans out one ``prepare`` task per scene and one ``edit`` task per (scene, edit) onto a shared pool
of Ray ``EditWorker`` actors.  A bad scene fails its own runs only.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.futures import as_completed
from prefect.settings import get_current_settings
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from imix2mix.collection import CollectionPlan, SceneProblem, claim_note, list_scenes, open_root
from imix2mix.config import WeightSources, default_config
from imix2mix.storage import check_output_root
from tasks.crashes import crash_detection
from tasks.distill import edit_run, start_workers
from tasks.manifest import record_failures, record_skipped
from tasks.metrics import artifact_key, publish_summary
from tasks.plan import EditsParameter, plan_runs
from tasks.poses import prepare_scene
from tasks.settings import PipelineSettings, default_cache_dir


def pipeline_settings(output_root: str, preset: str, config_overrides: dict[str, Any] | None,
                      ray_address: str | None, concurrency: int | None, device: str, workers: int | None,
                      cache_dir: str | None, weights_dir: str | None) -> PipelineSettings:
    """The flows' parameters as one typed settings object (paths made absolute); bad
    ``config_overrides`` (unknown keys, ``nan``) fail the flow run before anything starts."""
    default_config(preset).overridden(config_overrides)
    return PipelineSettings(
        output_root=check_output_root(output_root), preset=preset, device=device, workers=workers,
        concurrency=concurrency, ray_address=ray_address,
        cache_dir=(default_cache_dir() if cache_dir is None else Path(cache_dir)).expanduser().resolve(),
        weights=None if weights_dir is None else WeightSources.local(Path(weights_dir).expanduser().resolve()),
        config_overrides=dict(config_overrides or {}),
    )


def _summary_row(run: Any, status: str, *, seconds: float | None = None, metrics: dict[str, Any] | None = None,
                 note: str = "") -> dict[str, Any]:
    """One (scene, edit) of the batch.  ``output_dir`` names its result folder, and is None for a failure
    (nothing of this run was published; an older result may still be there)."""
    metrics = metrics or {}
    return {"scene": run.scene.scene_id, "edit": run.edit.instruction, "edit_id": run.edit.edit_id,
            "mode": run.config.mode, "teacher": run.config.teacher.name, "status": status, "seconds": None if seconds is None else round(seconds, 2),
            **{name: metrics.get(name) for name in ("clip_sim", "clip_dir", "clip_cons", "no_edit")},
            "output_dir": None if status == "failed" else str(run.output_dir),
            "output": None if status == "failed" else run.output_subdir.as_posix(), "note": note}


def _problem_row(problem: SceneProblem) -> dict[str, Any]:
    """A scene that could not be planned: it has no (scene, edit) runs, only a reason."""
    return {"scene": problem.scene.scene_id, "edit": None, "edit_id": None, "mode": None, "teacher": None, "status": "failed", "seconds": None,
            "clip_sim": None, "clip_dir": None, "clip_cons": None, "no_edit": None, "output_dir": None, "output": None,
            "note": problem.error}


def _succeeded(future: Any) -> bool:
    future.wait()  # keeps the final state in memory (``state`` would otherwise ask the API)
    return future.state.is_completed()


def _error_of(future: Any) -> str:
    error = future.result(raise_on_failure=False)
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(future.state.message)


def _skip_done_runs(plan: CollectionPlan, settings: PipelineSettings, flow_run_id: str | None) -> list[dict[str, Any]]:
    logger = get_run_logger()
    skipped = plan.skipped
    record_skipped(settings.output_root, skipped, preset=settings.preset, flow_run_id=flow_run_id)
    rows = []
    for run in skipped:
        previous = run.previous_run or {}
        if run.claimed_by is not None:
            logger.info("skipping %s: %s", run.label, claim_note(run.claimed_by))
        else:
            logger.info("skipping %s: already succeeded with config %s on these inputs (inputs hash %s, run %s)",
                        run.label, run.config_hash[:12], (run.scene_content_hash or "")[:12], previous.get("run_id"))
        note = "already done with this config" if run.claimed_by is None else claim_note(run.claimed_by)
        rows.append(_summary_row(run, "skipped", metrics=previous, note=note))
    return rows


def _run_pending(plan: CollectionPlan, settings: PipelineSettings, flow_run_id: str | None) -> list[dict[str, Any]]:
    """Prepare each scene, then hand its edits to the pool as workers become free.

    An edit task is submitted only when a worker can take it, so the UI shows Running for edits that
    run, not for edits queueing for a worker (those are not submitted yet).
    """
    logger = get_run_logger()
    pool = start_workers(settings, _prefect_api_url())
    slots = min(settings.concurrency or pool.size, pool.size)
    runs_by_scene: dict[str, list[Any]] = {}
    for run in plan.to_run:
        runs_by_scene.setdefault(run.scene.scene_id, []).append(run)
    rows: list[dict[str, Any]] = []
    waiting: deque[tuple[Any, dict[str, Any]]] = deque()
    editing: dict[Any, Any] = {}
    # One thread more than the edits in flight, so the next scene is prepared while the pool is busy.
    with ThreadPoolTaskRunner(max_workers=slots + 1) as runner:
        preparing = {runner.submit(prepare_scene, {"scene": scene, "cache_dir": settings.cache_dir,
                                                   "output_root": settings.output_root}): scene.scene_id
                     for scene in plan.scenes_to_run()}
        while preparing or waiting or editing:
            while waiting and len(editing) < slots:
                run, parameters = waiting.popleft()
                editing[runner.submit(edit_run, parameters)] = run
            future = next(as_completed([*preparing, *editing]))
            if future in preparing:
                scene_id = preparing.pop(future)
                scene_runs = runs_by_scene[scene_id]
                if not _succeeded(future):
                    error = _error_of(future)
                    logger.error("scene %s cannot be edited: %s", scene_id, error)
                    record_failures(settings.output_root, scene_runs, error=error, preset=settings.preset,
                                    flow_run_id=flow_run_id)
                    rows += [_summary_row(run, "failed", note=error) for run in scene_runs]
                    continue
                folder, scene = future.result()
                waiting.extend((run, {"run": run, "scene": scene, "scene_folder": folder, "pool": pool,
                                      "output_root": settings.output_root, "preset": settings.preset})
                               for run in scene_runs)
                continue
            run = editing.pop(future)
            if _succeeded(future):
                row = future.result()
                rows.append(_summary_row(run, "succeeded", seconds=row["wall_seconds"], metrics=row))
            else:
                rows.append(_summary_row(run, "failed", note=_error_of(future)))
    return rows


def _failure_message(rows: list[dict[str, Any]]) -> str:
    """``2 of 5 edits failed: face · make it snowy (SceneError: …); …`` (the first three reasons)."""
    failed = [row for row in rows if row["status"] == "failed"]
    reasons = "; ".join(f"{row['scene']} · {row['edit'] or '(no edits planned)'} ({row['note']})"
                        for row in failed[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    return f"{len(failed)} of {len(rows)} edits failed: {reasons}{more}"


def execute_plan(plan: CollectionPlan, settings: PipelineSettings) -> dict[str, Any] | State:
    """Run a plan inside a flow: record skips, edit the rest on the actor pool, publish a summary.

    Returns the summary; when any (scene, edit) failed, a Failed state that carries it (the flow run
    ends Failed, with the failures in its message).  Earlier flow runs whose process was killed are
    marked Crashed first (:mod:`tasks.crashes`).
    """
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    with crash_detection(settings.cache_dir, flow_run_id):
        return _execute(plan, settings, flow_run_id)


def _execute(plan: CollectionPlan, settings: PipelineSettings, flow_run_id: str | None) -> dict[str, Any] | State:
    logger = get_run_logger()
    for problem in plan.problems:
        logger.error("scene %s cannot be planned: %s", problem.scene.scene_id, problem.error)
    logger.info("%d run(s) to do, %d skipped as already done, %d scene problem(s)", len(plan.to_run),
                len(plan.skipped), len(plan.problems))
    rows = _skip_done_runs(plan, settings, flow_run_id)
    if plan.to_run:
        rows += _run_pending(plan, settings, flow_run_id)
    rows += [_problem_row(problem) for problem in plan.problems]
    publish_summary(rows, key=artifact_key("summary", runtime.flow_run.flow_name or "batch"))
    counts = {status: sum(row["status"] == status for row in rows) for status in ("succeeded", "failed", "skipped")}
    logger.info("batch finished: %(succeeded)d succeeded, %(failed)d failed, %(skipped)d skipped", counts)
    summary = {**counts, "runs": rows, "output_root": str(settings.output_root)}
    if counts["failed"]:
        return Failed(message=_failure_message(rows), data=summary)
    return summary


def _prefect_api_url() -> str | None:
    """The API this flow reports to, handed to Ray workers (None in ephemeral mode)."""
    return get_current_settings().api.url


def folder_name(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1] or location


def collection_run_name() -> str:
    """``edit-collection · examples · full``: what a flow run edits, readable in the UI's run list."""
    parameters = runtime.flow_run.parameters
    return f"edit-collection · {folder_name(str(parameters['root']))} · {parameters.get('preset', 'full')}"


@flow(name="edit-collection", flow_run_name=collection_run_name, log_prints=False)
def edit_collection(
    root: str,
    edits: EditsParameter = None,
    output_root: str = "outputs",
    preset: str = "full",
    config_overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
    concurrency: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    cache_dir: str | None = None,
    weights_dir: str | None = None,
) -> dict[str, Any] | State:
    """Edit every scene folder under ``root`` (a local folder or fsspec URL).

    ``edits``: collection-wide edits (a path/URL to an edits file, or the document itself), added to
    each scene's own ``edits.yaml``.  ``preset``: ``full`` (the official weights) or ``tiny`` (small
    random-weight models: the pipeline runs, the images are noise).  ``config_overrides``: EditConfig
    settings for every run.
    ``workers``: EditWorker actors (default: one per GPU, or one on CPU); ``concurrency``: runs in
    flight (default: ``workers``).  ``ray_address``: an existing Ray cluster (default ``RAY_ADDRESS``,
    else a local one).  ``cache_dir``: fetched inputs, SfM poses, Ray session files
    (default ``$IMIX2MIX_CACHE`` or ``~/.cache/imix2mix``).  ``weights_dir``: the full preset's weights
    in a local folder (``WeightSources.local`` layout) instead of the Hugging Face Hub.
    """
    settings = pipeline_settings(output_root, preset, config_overrides, ray_address, concurrency, device, workers,
                                 cache_dir, weights_dir)
    scenes = list_scenes(open_root(root))
    get_run_logger().info("collection %s: %d scene(s)", root, len(scenes))
    return execute_plan(plan_runs(scenes, edits, settings), settings)
