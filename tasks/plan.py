"""Plan: scenes × edits with their config hashes, minus what the manifest says already succeeded
with the same config on the same scene contents (photos and poses)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from imix2mix.collection import CollectionPlan, SceneRef, claim_runs, collection_edit_document, plan_collection
from imix2mix.manifests import ManifestError, ManifestStore, succeeded_runs
from imix2mix.config import default_config
from tasks.settings import PipelineSettings

# Collection-wide edits as a flow parameter: a path/URL to an edits file, or the document itself.
EditsParameter = list[Any] | dict[str, Any] | str | None


@task(name="plan", cache_policy=NO_CACHE)
def plan_runs(scenes: list[SceneRef], edits: EditsParameter, settings: PipelineSettings) -> CollectionPlan:
    """Scenes × edits with their config hashes; what already succeeded on the same photos, or what another
    batch on the same output root has claimed, is marked skipped; the runs to do are claimed.

    Scene content hashes are cached in ``cache_dir/content`` by listing, so unchanged scenes are not re-read.
    """
    logger = get_run_logger()
    store = ManifestStore(settings.output_root)
    try:
        succeeded = succeeded_runs(store)
    except ManifestError as exc:
        logger.warning("%s; every run will be redone, and the file moved aside on the next write", exc)
        succeeded = {}
    plan = plan_collection(
        scenes, collection_edit_document(edits), default_config(settings.preset), preset=settings.preset,
        output_root=settings.output_root, succeeded=succeeded, base_overrides=settings.config_overrides,
        content_cache_dir=settings.cache_dir / "content",
    )
    # Another batch on this output root may be running: take a claim on each run to do, skip what it holds.
    return claim_runs(plan, batch=str(runtime.flow_run.id) if runtime.flow_run.id else None)
