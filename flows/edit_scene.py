"""``edit-scene``: edit one scene of a collection (the entry point for storage events).

The scene is looked up again in the root's own listing; a ``scene_uri`` outside ``root`` (or not a
scene folder directly under it) is refused before anything is read.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.states import State

from flows.edit_collection import folder_name, execute_plan, pipeline_settings
from tasks.plan import EditsParameter, plan_runs
from imix2mix.collection import find_scene, open_root


def scene_run_name() -> str:
    """``edit-scene · face · full``: the scene folder's name and the preset."""
    parameters = runtime.flow_run.parameters
    return f"edit-scene · {folder_name(str(parameters['scene_uri']))} · {parameters.get('preset', 'full')}"


@flow(name="edit-scene", flow_run_name=scene_run_name, log_prints=False)
def edit_scene(
    scene_uri: str,
    root: str,
    edits: EditsParameter = None,
    output_root: str = "outputs",
    preset: str = "full",
    config_overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    cache_dir: str | None = None,
    weights_dir: str | None = None,
) -> dict[str, Any] | State:
    """Edit the scene folder ``scene_uri`` of the collection ``root`` with its ``edits.yaml`` (plus ``edits``)."""
    settings = pipeline_settings(output_root, preset, config_overrides, ray_address, None, device, workers, cache_dir,
                                 weights_dir)
    scene = find_scene(open_root(root), scene_uri)
    get_run_logger().info("scene %s of collection %s", scene.scene_id, root)
    return execute_plan(plan_runs([scene], edits, settings), settings)
