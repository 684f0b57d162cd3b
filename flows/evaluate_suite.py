"""``evaluate-suite``: run an evaluation suite (scenes × edits × variants) and write its report.

Each variant is one ordinary collection batch (:func:`flows.edit_collection.execute_plan`) over its
staged collection root into its own output root, so resume and skip work as for any collection and
the actor pool is shared by all variants.  The report is built from the manifests by the library
(:func:`imix2mix.report.build_report`) and also published as a markdown artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.edit_collection import execute_plan, pipeline_settings
from imix2mix.collection import list_scenes, open_root
from imix2mix.config import EditConfig
from imix2mix.report import build_report
from imix2mix.suite import inputs_root, load_suite, outputs_root, plan_suite
from tasks.metrics import artifact_key
from tasks.plan import plan_runs


@flow(name="evaluate-suite", log_prints=False)
def evaluate_suite(
    suite: str,
    output_root: str,
    preset: str = "full",
    scenes: list[str] | None = None,
    modes: list[str] | None = None,
    data_root: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
    concurrency: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    cache_dir: str | None = None,
    weights_dir: str | None = None,
) -> dict[str, Any]:
    """Run ``suite`` (a bundled name such as ``paper``, or a suite file) into ``output_root``.

    ``scenes`` / ``modes``: only these scenes and variants.  ``data_root``: the folder the suite's
    relative scene paths start from (default: the current folder).  ``config_overrides``: EditConfig
    settings for every run (a variant's own settings win).  The rest as for ``edit-collection``.
    """
    logger = get_run_logger()
    out = Path(output_root).expanduser().resolve()
    data = Path(data_root or ".").expanduser().resolve()
    plan = plan_suite(load_suite(suite).select(scenes, modes), out, data, EditConfig())
    for problem in plan.problems:
        logger.warning("left out: %s", problem)
    summaries: dict[str, Any] = {}
    names = {scene.name for scene in plan.scenes}
    for variant in plan.runnable:
        settings = pipeline_settings(str(outputs_root(out, variant)), preset,
                                     {**(config_overrides or {}), **variant.config}, ray_address, concurrency, device,
                                     workers, cache_dir, weights_dir)
        staged = [scene for scene in list_scenes(open_root(inputs_root(out, variant))) if scene.scene_id in names]
        logger.info("variant %s (%s): %d scene(s), settings %s", variant.name, variant.label, len(staged),
                    dict(variant.config))
        summaries[variant.name] = execute_plan(plan_runs(staged, None, settings), settings)
    markdown = build_report(plan, out)
    create_markdown_artifact(key=artifact_key("evaluation", plan.suite.name), markdown=markdown,
                             description=f"Evaluation report of suite {plan.suite.name}")
    logger.info("report written to %s", out / "report.md")
    return {"variants": summaries, "problems": list(plan.problems), "report": str(out / "report.md")}
