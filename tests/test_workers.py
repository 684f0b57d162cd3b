"""The Ray actor pool, on a real local Ray cluster with the real tiny Editor (no Prefect here)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
from conftest import SCENES

from imix2mix.edits import Edit
from imix2mix.errors import ConfigError
from imix2mix.presets import default_config
from imix2mix.scene import load_scene
from tasks.workers import EditWorkerPool, RaySettings, WorkersLostError, WorkerSpec, WorkerStartError, connect_ray

# End to end with real services: deselect with -m 'not slow'; the timeout only guards against hangs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The tiny preset with a shorter schedule: 6 iterations at τ=999, one teacher step.
SHORT = {"distill_dt": 999, "k_initial": 6, "k": 1, "warmup_steps": 1, "teacher_steps": 1}


@pytest.fixture(scope="module")
def pool(tmp_root: Path) -> Iterator[EditWorkerPool]:
    # Two logical GPUs: Ray's placement of GPU actors is tested on a CPU box (they run the tiny Editor on CPU).
    started = connect_ray(RaySettings(temp_dir=tmp_root / "ray-workers", num_cpus=2, num_gpus=2))
    worker_pool = EditWorkerPool(WorkerSpec(preset="tiny", device="cpu"), size=1, max_attempts=2,
                                 poll_seconds=0.2).start()
    yield worker_pool
    worker_pool.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def scene():  # noqa: ANN201
    return load_scene(SCENES / "face")


@pytest.fixture(scope="module")
def config():  # noqa: ANN201
    return default_config("tiny").overridden(SHORT)


def worker_pid(pool: EditWorkerPool) -> int:
    (slot,) = pool._slots
    return ray.get(slot.actor.ready.remote())["pid"]


def test_edits_a_scene_and_reports_progress(pool: EditWorkerPool, scene, config) -> None:  # noqa: ANN001
    reports: list[dict] = []
    outcome = pool.run(scene, Edit("make it snowy", source_caption="a face", target_caption="a snowy face"), config,
                       on_progress=lambda report, worker: reports.append(report))
    assert outcome.attempts == 1 and outcome.started_at is not None
    assert len(outcome.result.views) == len(scene.views) == 4
    assert outcome.result.iterations == config.total_iterations == 6
    assert outcome.metrics is not None and outcome.metrics.clip_dir is not None
    iterations = [report["iteration"] for report in reports]
    assert iterations and iterations == sorted(iterations) and all(r["total"] == 6 for r in reports)


def test_a_killed_actor_is_replaced_and_the_scene_retried(pool: EditWorkerPool, scene, config) -> None:  # noqa: ANN001
    before = worker_pid(pool)
    killed: list[str] = []

    def kill_on_first_report(report: dict, worker: str) -> None:
        if not killed:
            killed.append(worker)
            ray.kill(ray.get_actor(worker, namespace="imix2mix"), no_restart=True)

    outcome = pool.run(scene, Edit("turn him into a knight"), config, on_progress=kill_on_first_report)
    assert killed, "the edit finished before any progress report"
    assert outcome.attempts == 2
    assert outcome.result.iterations == 6 and len(outcome.result.views) == 4
    assert worker_pid(pool) != before


def test_an_edit_error_fails_the_run_but_keeps_the_actor(pool: EditWorkerPool, scene, config) -> None:  # noqa: ANN001
    before = worker_pid(pool)
    with pytest.raises(ConfigError, match="reference_index 9 but the scene 'face' has 4 views"):
        pool.run(scene, Edit("make it snowy"), config.overridden({"reference_index": 9}))
    assert worker_pid(pool) == before
    assert pool.run(scene, Edit("make it snowy"), config).attempts == 1


def test_an_actor_dying_on_every_attempt_gives_up(pool: EditWorkerPool, scene, config) -> None:  # noqa: ANN001
    def always_kill(report: dict, worker: str) -> None:
        ray.kill(ray.get_actor(worker, namespace="imix2mix"), no_restart=True)

    with pytest.raises(WorkersLostError, match="died on all 2 attempts for scene face"):
        pool.run(scene, Edit("make it snowy"), config, on_progress=always_kill)
    assert pool.run(scene, Edit("make it snowy"), config).attempts == 1  # the pool healed itself


def test_a_worker_that_cannot_build_its_editor_says_why(pool: EditWorkerPool) -> None:  # noqa: ARG001 (Ray up)
    with pytest.raises(WorkerStartError, match="could not start: .*unknown preset 'bogus'"):
        EditWorkerPool(WorkerSpec(preset="bogus"), size=1).start()


def test_one_worker_per_gpu_each_on_its_own_gpu_sharing_a_batch(pool: EditWorkerPool, scene, config) -> None:  # noqa: ANN001, ARG001
    """Ray's declared GPUs (2 logical ones here): two actors, each given its own GPU, both doing the batch's work."""
    assert int(ray.cluster_resources().get("GPU", 0)) == 2
    gpu_pool = EditWorkerPool(WorkerSpec(preset="tiny", device="cpu", gpus=1), size=2, poll_seconds=0.2).start()
    try:
        infos = list(gpu_pool.worker_info.values())
        assert len(infos) == 2 and len({info["pid"] for info in infos}) == 2
        assert sorted(gpu for info in infos for gpu in info["gpu_ids"]) == ["0", "1"]
        assert all(info["cuda_visible_devices"] == info["gpu_ids"][0] for info in infos)
        with ThreadPoolExecutor(max_workers=2) as threads:
            outcomes = list(threads.map(lambda text: gpu_pool.run(scene, Edit(text), config),
                                        ["make it snowy", "turn him into a knight"]))
        assert {outcome.worker for outcome in outcomes} == set(gpu_pool.worker_info)
        assert all(outcome.result.iterations == config.total_iterations for outcome in outcomes)
    finally:
        gpu_pool.shutdown()
