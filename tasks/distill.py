"""Distill: one (scene, edit) on the shared Ray actor pool, then its outputs, manifest rows and artifacts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from imix2mix.collection import PlannedRun, release_run
from imix2mix.config import ALLOCATOR_ENV
from imix2mix.errors import ConfigError
from imix2mix.evaluation import evaluate_result, format_score
from imix2mix.manifests import new_run_id, rows_to_json, utc_now
from imix2mix.outputs import view_file, write_edit_outputs
from imix2mix.storage import OutputRoot
from tasks.manifest import record_failure, record_success, success_rows
from tasks.metrics import ProgressArtifact, publish_run_artifacts
from tasks.retries import retry_on_storage_errors
from tasks.settings import PipelineSettings
from tasks.workers import EditWorkerPool, RaySettings, WorkerSpec, cluster_gpus, connect_ray


def current_run_ids() -> tuple[str, str | None]:
    """(run_id, flow_run_id): the Prefect task run id keeps a retried run on one manifest row."""
    task_run_id, flow_run_id = runtime.task_run.id, runtime.flow_run.id
    return (str(task_run_id) if task_run_id else new_run_id()), (str(flow_run_id) if flow_run_id else None)


@task(name="edit", task_run_name="{run.label}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_on_storage_errors)
def edit_run(run: PlannedRun, scene: Any, scene_folder: Path, pool: EditWorkerPool, output_root: OutputRoot,
             preset: str) -> dict[str, Any]:
    """Edit one scene on a pooled actor and publish the results; a failure is recorded, then raised."""
    logger = get_run_logger()
    run_id, flow_run_id = current_run_ids()
    started_at = utc_now()
    staging = None
    try:
        try:
            progress = ProgressArtifact(run)
            logger.info("%s: distilling (config %s) into %s", run.label, run.config_hash[:12], run.output_dir)
            outcome = pool.run(scene, run.edit.to_edit(), run.config, on_progress=progress.update)
            progress.finish()
            evaluation = evaluate_result(outcome.result, scene, outcome.metrics)
            if evaluation.no_edit:
                logger.warning("%s: no edit happened: %s", run.label, evaluation.change.reason)
            staging = output_root.staging(run.output_subdir.as_posix())
            rows = success_rows(run, run_id=run_id, preset=preset, started_at=started_at, finished_at=utc_now(),
                                scene=scene, scene_folder=scene_folder, outcome=outcome,
                                view_files=[view_file(index) for index in range(len(scene.views))],
                                flow_run_id=flow_run_id, evaluation=evaluation)
            written = write_edit_outputs(outcome.result, scene, staging, outcome.metrics, evaluation=evaluation,
                                         extra={"manifest": rows_to_json(rows)})
            output_root.publish(staging, run.output_subdir.as_posix())
            row = record_success(output_root, rows)
        except Exception as exc:
            record_failure(output_root, run, run_id=run_id, preset=preset, started_at=started_at, error=exc,
                           flow_run_id=flow_run_id)
            raise
        # Locally the staging folder is the published one now; on object stores it is still the local copy.
        local = output_root.local_path(run.output_subdir.as_posix()) if output_root.is_local else staging
        publish_run_artifacts(run, outcome, local / written.contact_sheet.name)
    finally:
        if staging is not None:
            output_root.discard(staging)
        release_run(run)
    logger.info("%s: done in %.1f s (%d iterations, CLIP dir %s, epipolar score %s)", run.label,
                row["wall_seconds"], row["iterations"], format_score(row["clip_dir"]), format_score(row["epipolar_score"]))
    return row


def worker_env_vars(settings: PipelineSettings, prefect_api_url: str | None) -> dict[str, str]:
    """Environment of every Ray worker: the Prefect API to report to, the CUDA allocator's
    configuration, and where compiled kernels are kept.  With ``compile=true`` a cold inductor cache costs minutes of warm-up per number of views;
    beside the pipeline's other caches it survives reboots, unlike torch's default under /tmp."""
    env_vars = {"PREFECT_API_URL": prefect_api_url} if prefect_api_url else {}
    env_vars["TORCHINDUCTOR_CACHE_DIR"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(settings.cache_dir / "torchinductor")
    # The CUDA allocator's configuration (``--memory``'s, imix2mix.config.apply_allocator): read when a
    # worker process first initialises CUDA, so it travels in the workers' environment.
    if os.environ.get(ALLOCATOR_ENV):
        env_vars[ALLOCATOR_ENV] = os.environ[ALLOCATOR_ENV]
    return env_vars


@task(name="start workers", cache_policy=NO_CACHE)
def start_workers(settings: PipelineSettings, prefect_api_url: str | None) -> EditWorkerPool:
    """Connect to Ray (or start it) and bring up the EditWorker actors, one per GPU (or ``workers``)."""
    logger = get_run_logger()
    connect_ray(RaySettings(address=settings.ray_address, temp_dir=settings.cache_dir / "ray",
                            env_vars=worker_env_vars(settings, prefect_api_url)))
    gpus = cluster_gpus()
    device = settings.device if settings.device != "auto" else ("cuda" if gpus else "cpu")
    if device.startswith("cuda") and not gpus:
        raise ConfigError("device 'cuda' was asked for, but the Ray cluster has no GPUs")
    size = settings.workers or (gpus if device.startswith("cuda") else 1)
    spec = WorkerSpec(preset=settings.preset, device=device, weights=settings.weights,
                      torch_threads=1 if device == "cpu" else None)
    logger.info("starting %d edit worker(s) for preset %s on %s", size, settings.preset, device)
    # On a shared cluster the actors stay up between flow runs, so events and nightly batches find them warm.
    shared_cluster = bool(settings.ray_address or os.environ.get("RAY_ADDRESS"))
    return EditWorkerPool(spec, size, max_attempts=settings.max_attempts, detached=shared_cluster).start()
