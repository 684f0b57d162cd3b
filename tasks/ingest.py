"""Ingest: copy a scene's files from storage into the local cache (remote roots) and check them."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imix2mix.collection import SceneRef, fetch_scene
from tasks.retries import retry_on_storage_errors


@task(name="ingest", task_run_name="ingest · {scene.scene_id}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=2, retry_condition_fn=retry_on_storage_errors)
def ingest_scene(scene: SceneRef, cache_dir: Path) -> Path:
    """A local folder with the scene's files (remote scenes are fetched once per listing)."""
    folder = fetch_scene(scene, cache_dir)
    if scene.root.is_local:
        get_run_logger().info("scene %s: reading %s in place", scene.scene_id, folder)
    else:
        get_run_logger().info("scene %s: fetched %s into %s", scene.scene_id, scene.uri, folder)
    return folder
