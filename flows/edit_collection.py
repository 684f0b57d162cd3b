"""``edit-collection``: edit every scene of a collection with every requested edit.

Plans scenes × edits, skips what the manifest says already succeeded with the same config on the
same scene contents (a scene uploaded again with other photos is edited again), then
fans out one ``prepare`` task per scene and one ``edit`` task per (scene, edit) onto a shared pool
of Ray ``EditWorker`` actors.  A bad scene fails its own runs only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.futures import as_completed
from prefect.settings import get_current_settings
from prefect.task_runners import ThreadPoolTaskRunner

from imix2mix.collection import CollectionPlan, SceneProblem, list_scenes, open_root
from imix2mix.presets import WeightSources
from tasks.distill import edit_run, start_workers
from tasks.manifest import record_failures, record_skipped
from tasks.metrics import artifact_key, publish_summary
from tasks.plan import EditsParameter, plan_runs
from tasks.poses import prepare_scene
from tasks.settings import PipelineSettings, default_cache_dir


def pipeline_settings(output_root: str, preset: str, config_overrides: dict[str, Any] | None,
                      ray_address: str | None, concurrency: int | None, device: str, workers: int | None,
                      cache_dir: str | None, weights_dir: str | None) -> PipelineSettings:
    """The flows' parameters as one typed settings object (paths made absolute)."""
    return PipelineSettings(
        output_root=Path(output_root).expanduser().resolve(), preset=preset, device=device, workers=workers,
        concurrency=concurrency, ray_address=ray_address,
        cache_dir=(default_cache_dir() if cache_dir is None else Path(cache_dir)).expanduser().resolve(),
        weights=None if weights_dir is None else WeightSources.local(Path(weights_dir).expanduser().resolve()),
        config_overrides=dict(config_overrides or {}),
    )


def _summary_row(run: Any, status: str, *, seconds: float | None = None, clip_dir: float | None = None,
                 clip_cons: float | None = None, note: str = "", no_edit: bool | None = None) -> dict[str, Any]:
    return {"scene": run.scene.scene_id, "edit": run.edit.instruction, "edit_id": run.edit.edit_id,
            "status": status, "seconds": None if seconds is None else round(seconds, 2),
            "clip_dir": clip_dir, "clip_cons": clip_cons, "output_dir": str(run.output_dir), "note": note,
            "no_edit": no_edit}


def _problem_row(problem: SceneProblem) -> dict[str, Any]:
    """A scene that could not be planned: it has no (scene, edit) runs, only a reason."""
    return {"scene": problem.scene.scene_id, "edit": None, "edit_id": None, "status": "failed", "seconds": None,
            "clip_dir": None, "clip_cons": None, "output_dir": None, "note": problem.error, "no_edit": None}


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
        logger.info("skipping %s: already succeeded with config %s on these photos (content %s, run %s)",
                    run.label, run.config_hash[:12], (run.scene_content_hash or "")[:12], previous.get("run_id"))
        rows.append(_summary_row(run, "skipped", clip_dir=previous.get("clip_dir"),
                                 clip_cons=previous.get("clip_cons"), note="already done with this config",
                                 no_edit=previous.get("no_edit")))
    return rows


def _run_pending(plan: CollectionPlan, settings: PipelineSettings, flow_run_id: str | None) -> list[dict[str, Any]]:
    """Prepare each scene, then fan its edits out to the pool as soon as it is ready."""
    logger = get_run_logger()
    pool = start_workers(settings, _prefect_api_url())
    runs_by_scene: dict[str, list[Any]] = {}
    for run in plan.to_run:
        runs_by_scene.setdefault(run.scene.scene_id, []).append(run)
    rows: list[dict[str, Any]] = []
    edits: dict[Any, Any] = {}
    # One thread more than the pool's size, so the next scene is prepared while the pool is busy.
    with ThreadPoolTaskRunner(max_workers=(settings.concurrency or pool.size) + 1) as runner:
        prepared = {runner.submit(prepare_scene, {"scene": scene, "cache_dir": settings.cache_dir,
                                                  "output_root": settings.output_root}): scene.scene_id
                    for scene in plan.scenes_to_run()}
        for future in as_completed(list(prepared)):
            scene_runs = runs_by_scene[prepared[future]]
            if not _succeeded(future):
                error = _error_of(future)
                logger.error("scene %s cannot be edited: %s", prepared[future], error)
                record_failures(settings.output_root, scene_runs, error=error, preset=settings.preset,
                                flow_run_id=flow_run_id)
                rows += [_summary_row(run, "failed", note=error) for run in scene_runs]
                continue
            folder, scene = future.result()
            for run in scene_runs:
                parameters = {"run": run, "scene": scene, "scene_folder": folder, "pool": pool,
                              "output_root": settings.output_root, "preset": settings.preset}
                edits[runner.submit(edit_run, parameters)] = run
        for future, run in edits.items():
            if _succeeded(future):
                row = future.result()
                rows.append(_summary_row(run, "succeeded", seconds=row["wall_seconds"], clip_dir=row["clip_dir"],
                                         clip_cons=row["clip_cons"], no_edit=row.get("no_edit")))
            else:
                rows.append(_summary_row(run, "failed", note=_error_of(future)))
    return rows


def execute_plan(plan: CollectionPlan, settings: PipelineSettings) -> dict[str, Any]:
    """Run a plan inside a flow: record skips, edit the rest on the actor pool, publish a summary."""
    logger = get_run_logger()
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
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
    return {**counts, "runs": rows, "output_root": str(settings.output_root)}


def _prefect_api_url() -> str | None:
    """The API this flow reports to, handed to Ray workers (None in ephemeral mode)."""
    return get_current_settings().api.url


@flow(name="edit-collection", log_prints=False)
def edit_collection(
    root: str,
    edits: EditsParameter = None,
    output_root: str = "outputs",
    preset: str = "tiny",
    config_overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
    concurrency: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    cache_dir: str | None = None,
    weights_dir: str | None = None,
) -> dict[str, Any]:
    """Edit every scene folder under ``root`` (a local folder or fsspec URL).

    ``edits``: collection-wide edits (a path/URL to an edits file, or the document itself), added to
    each scene's own ``edits.yaml``.  ``config_overrides``: EditConfig settings for every run.
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
