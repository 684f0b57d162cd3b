"""Poses: load the fetched scene, running structure from motion only when no poses come with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import CommitMode, transaction

from imix2mix.collection import SceneRef, load_scene_cached
from imix2mix.manifests import SCENES, ManifestStore, scene_row
from tasks.ingest import ingest_scene


@task(name="poses", task_run_name="poses · {scene.scene_id}", cache_policy=NO_CACHE)
def pose_scene(scene: SceneRef, folder: Path, cache_dir: Path, output_root: Path) -> Any:
    """The validated :class:`~imix2mix.scene.Scene` (SfM results cached by photo content); records its row."""
    loaded = load_scene_cached(folder, cache_dir / "poses")
    logger = get_run_logger()
    logger.info("scene %s: %d views, poses from %s", scene.scene_id, len(loaded.views), loaded.pose_source)
    if loaded.registration is not None and loaded.registration.unregistered:
        logger.warning("scene %s: unregistered views %s", scene.scene_id, loaded.registration.unregistered)
    ManifestStore(output_root).upsert(SCENES, [scene_row(scene.scene_id, scene.uri, loaded)])
    return loaded


@task(name="prepare", task_run_name="prepare · {scene.scene_id}", cache_policy=NO_CACHE)
def prepare_scene(scene: SceneRef, cache_dir: Path, output_root: Path) -> tuple[Path, Any]:
    """Ingest then pose one scene (two nested task runs); returns (local folder, Scene).

    The ingest commits its own transaction: otherwise a failing pose step rolls back this task's
    transaction, and Prefect shows the finished ingest as "RolledBack" instead of Completed.
    """
    with transaction(commit_mode=CommitMode.EAGER):
        folder = ingest_scene(scene, cache_dir)
    return folder, pose_scene(scene, folder, cache_dir, output_root)
