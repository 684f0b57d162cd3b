"""The Ray side of the pipeline: a cluster connection and a pool of ``EditWorker`` actors.

Each actor builds one :class:`~imix2mix.editor.Editor` when it starts (models loaded once) and serves
many scenes; ``Editor.edit`` resets the student per scene.  The pool lends actors to callers (Prefect
task threads), polls the running actor for progress, replaces an actor that dies and retries its
scene (bounded).  Errors raised by the edit itself (a bad scene, CUDA out of memory) are returned to
the caller unchanged: the actor is still healthy and the run is simply failed.

Nothing here imports Prefect: actors run library code only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from imix2mix.errors import ConfigError, ImixError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_NAMESPACE = "imix2mix"
# Unix socket paths are limited to 107 bytes; Ray appends about 64 (session_<time>_<pid>/sockets/plasma_store).
_MAX_RAY_TEMP_DIR_LENGTH = 40


# --------------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaySettings:
    """How to reach Ray: an existing cluster (``address`` or ``RAY_ADDRESS``) or a local one started here."""

    address: str | None = None
    temp_dir: Path | None = None  # local clusters only; keeps session files out of /tmp/ray
    num_cpus: int | None = None  # local clusters only
    num_gpus: int | None = None  # local clusters only (logical GPUs on a CPU box are for tests)
    include_dashboard: bool = False  # the dashboard doubles Ray's memory footprint
    env_vars: Mapping[str, str] = field(default_factory=dict)  # for every Ray worker (e.g. PREFECT_API_URL)


def connect_ray(settings: RaySettings) -> bool:
    """Connect to (or start) Ray unless this process already is; returns True when it started a connection.

    Workers get the repository on ``PYTHONPATH`` so they import the same ``imix2mix`` (on a remote
    cluster, install the package on the nodes instead).
    """
    if ray.is_initialized():
        return False
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    runtime_env = {"env_vars": {"PYTHONPATH": python_path, **settings.env_vars}}
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, namespace=RAY_NAMESPACE, log_to_driver=False)
        return True
    temp_dir = settings.temp_dir
    if temp_dir is not None and len(str(temp_dir.resolve())) > _MAX_RAY_TEMP_DIR_LENGTH:
        logger.warning("Ray session folder %s is too long for Ray's socket paths; using Ray's default", temp_dir)
        temp_dir = None
    if temp_dir is not None:
        temp_dir.mkdir(parents=True, exist_ok=True)
    use_own_auth_token(os.environ)
    logger.info("starting a local Ray cluster (session files in %s)", temp_dir or "Ray's default folder")
    ray.init(
        num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus,
        include_dashboard=settings.include_dashboard,
        _temp_dir=None if temp_dir is None else str(temp_dir.resolve()),
        runtime_env=runtime_env,
        namespace=RAY_NAMESPACE,
        log_to_driver=False,
    )
    return True


def use_own_auth_token(environ: MutableMapping[str, str]) -> None:
    """A local throw-away cluster gets token authentication with a fresh token of its own, passed to its
    processes in the environment.  Left to Ray, it prints a notice on every start and writes the token to
    ``~/.ray/auth_token`` (world-readable).  A user's own ``RAY_AUTH_MODE`` / token wins."""
    if "RAY_AUTH_MODE" in environ:
        return
    environ["RAY_AUTH_MODE"] = "token"
    environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # Ray read its settings when it was imported; it refreshes them the same way when it turns token
    # authentication on itself (ray/_private/authentication/authentication_token_setup.py).
    from ray._raylet import Config

    Config.initialize("")


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


# --------------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What every actor of a pool loads; actors with the same spec are interchangeable."""

    preset: str = "full"
    device: str = "cpu"  # "cuda" (one GPU per actor) or "cpu"
    weights: Any = None  # imix2mix.presets.WeightSources, or None for the preset's defaults
    random_weights: bool = False
    torch_threads: int | None = 1  # small CPU boxes thrash with more threads per actor
    gpus: int | None = None  # Ray GPUs reserved per actor; default 1 on cuda (one actor per GPU), 0 on cpu

    @property
    def gpus_per_actor(self) -> int:
        return self.gpus if self.gpus is not None else int(self.device.startswith("cuda"))

    @property
    def key(self) -> str:
        """Short stable id, used in actor names so a later pool on the same cluster can reuse live actors."""
        text = json.dumps(asdict(self), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class EditOutcome:
    """What an actor returns for one (scene, edit): the engine result and its CLIP metrics."""

    result: Any  # imix2mix.editor.EditResult
    metrics: Any  # imix2mix.metrics.SceneMetrics | None
    worker: str  # the actor's name
    attempts: int = 1
    started_at: datetime | None = None  # when an actor took the scene (time spent queueing for one excluded)


@ray.remote(concurrency_groups={"status": 1})
class EditWorker:
    """One Editor, built once, serving scenes one at a time (default concurrency group of size 1).

    ``progress()`` and ``ready()`` run in their own concurrency group, so they answer while an edit runs.
    """

    def __init__(self, spec: WorkerSpec, name: str):
        from imix2mix.logs import quiet_third_party_notices

        quiet_third_party_notices()
        import torch

        from imix2mix.presets import build_editor

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.name = name
        self.editor = build_editor(spec.preset, device=spec.device, weights=spec.weights,
                                   random_weights=spec.random_weights)
        self._progress: dict[str, Any] | None = None

    @ray.method(concurrency_group="status")
    def ready(self) -> dict[str, Any]:
        """Who this actor is and what Ray gave it (its GPU ids; CUDA_VISIBLE_DEVICES is set to them)."""
        return {"name": self.name, "pid": os.getpid(), "device": str(self.editor.device),
                "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def edit(self, scene: Any, edit: Any, config: Any) -> EditOutcome:
        self._progress = None

        def report(event: Any) -> None:
            self._progress = asdict(event)

        try:
            result = self.editor.edit(scene, edit, config, progress=report)
            metrics = self.editor.score(result, edit) if self.editor.clip_metrics is not None else None
            return EditOutcome(result=result, metrics=metrics, worker=self.name)
        finally:
            self._release_cached_memory()

    def _release_cached_memory(self) -> None:
        """After an out-of-memory error, cached blocks would starve the next scene."""
        import torch

        if self.editor.device.type == "cuda":
            torch.cuda.empty_cache()

    @ray.method(concurrency_group="status")
    def progress(self) -> dict[str, Any] | None:
        return self._progress


# --------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------


class WorkersLostError(ImixError):
    """The actor running a scene died on every attempt."""


class WorkerStartError(ImixError):
    """An EditWorker could not build its Editor (missing weights, bad preset, no device)."""


def _start_failure(exc: RayActorError) -> WorkerStartError | None:
    """The build error of an actor whose ``__init__`` raised, as one readable line (else None)."""
    if not getattr(exc, "actor_init_failed", False):
        return None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return WorkerStartError(f"the edit workers could not start: {lines[-1] if lines else exc}")


ProgressCallback = Callable[[dict[str, Any], str], None]  # (progress event fields, actor name)


@dataclass
class _Slot:
    index: int
    name: str
    actor: Any


class EditWorkerPool:
    """``size`` EditWorker actors lent to one caller at a time each; thread-safe.

    Actors are named ``imix2mix-<spec key>-<index>`` in the ``imix2mix`` namespace: a pool on a
    cluster that still runs actors with the same spec reuses them (models stay loaded).  With
    ``detached=True`` (a shared, long-running cluster) the actors outlive the process that made
    them, so later flow runs find them warm; stop them with ``shutdown()`` or ``ray stop``.
    """

    def __init__(self, spec: WorkerSpec, size: int, *, max_attempts: int = 3, poll_seconds: float = 0.5,
                 start_timeout_s: float = 1800.0, detached: bool = False):
        if size < 1:
            raise ConfigError(f"the worker pool needs at least one worker, got {size}")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be ≥ 1, got {max_attempts}")
        self.spec = spec
        self.size = size
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.start_timeout_s = start_timeout_s
        self.detached = detached
        self._slots: list[_Slot] = []
        self.worker_info: dict[str, dict[str, Any]] = {}  # actor name → ready() at start
        self._idle: queue.Queue[_Slot] = queue.Queue()
        self._started = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------
    def _options(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": RAY_NAMESPACE,
            "get_if_exists": True,  # another pool (or flow run) may have made it: share it
            "num_gpus": self.spec.gpus_per_actor,
            "num_cpus": 1,
            "max_restarts": 0,  # the pool replaces dead actors itself, so it knows to retry the scene
            **({"lifetime": "detached"} if self.detached else {}),
        }

    def _create(self, name: str) -> Any:
        """The live actor called ``name``, or a new one (reusing a name frees up shortly after a death)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                actor = EditWorker.options(**self._options(name)).remote(self.spec, name)
                ray.get(actor.ready.remote(), timeout=self.start_timeout_s)
                return actor
            except (ValueError, RayActorError) as exc:  # the dead actor still holds the name
                failure = _start_failure(exc) if isinstance(exc, RayActorError) else None
                if failure is not None:
                    raise failure from None
                if time.monotonic() > deadline:
                    raise
                logger.debug("waiting for the name %s to be released: %s", name, exc)
                time.sleep(0.5)

    def start(self) -> "EditWorkerPool":
        """Create (or reuse) the actors and wait until each has built its Editor."""
        with self._started:
            if self._slots:
                return self
            names = [f"imix2mix-{self.spec.key}-{index}" for index in range(self.size)]
            actors = [EditWorker.options(**self._options(name)).remote(self.spec, name) for name in names]
            try:  # the actors build their Editors in parallel
                infos = ray.get([actor.ready.remote() for actor in actors], timeout=self.start_timeout_s)
            except RayActorError as exc:
                raise (_start_failure(exc) or exc) from None
            slots = [_Slot(index, name, actor) for index, (name, actor) in enumerate(zip(names, actors))]
            self.worker_info = {}
            for slot, info in zip(slots, infos):
                logger.info("edit worker %s ready (pid %s, %s%s)", slot.name, info["pid"], info["device"],
                            f", GPU {','.join(info['gpu_ids'])}" if info["gpu_ids"] else "")
                self.worker_info[slot.name] = info
                self._slots.append(slot)
                self._idle.put(slot)
        return self

    def shutdown(self) -> None:
        """Kill the actors (frees their GPUs).  Pools that share actors should not call this."""
        for slot in self._slots:
            _kill(slot.actor)
        self._slots.clear()
        self._idle = queue.Queue()

    def __enter__(self) -> "EditWorkerPool":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @contextmanager
    def _lease(self) -> Iterator[_Slot]:
        if not self._slots:
            self.start()
        slot = self._idle.get()
        try:
            yield slot
        finally:
            self._idle.put(slot)

    def _replace(self, slot: _Slot) -> None:
        _kill(slot.actor)
        slot.actor = self._create(slot.name)
        logger.warning("replaced edit worker %s", slot.name)

    # -- work -----------------------------------------------------------------------------------
    def run(self, scene: Any, edit: Any, config: Any, on_progress: ProgressCallback | None = None) -> EditOutcome:
        """Edit one scene on a free actor, blocking until done.

        If the actor dies (killed, node lost, process crashed) it is replaced and the scene starts
        again, up to ``max_attempts`` times in all.  An exception raised by the edit is re-raised as
        the original exception (e.g. :class:`~imix2mix.errors.SceneError`).
        """
        lost: list[str] = []
        started_at = None
        for attempt in range(1, self.max_attempts + 1):
            with self._lease() as slot:
                started_at = started_at or datetime.now(timezone.utc)
                try:
                    outcome = self._run_on(slot, scene, edit, config, on_progress)
                except RayActorError as exc:
                    lost.append(f"attempt {attempt} on {slot.name}: {_first_line(exc)}")
                    logger.warning("edit worker %s died during scene %s (attempt %d of %d); replacing it",
                                   slot.name, getattr(scene, "name", scene), attempt, self.max_attempts)
                    self._replace(slot)
                    continue
            return replace(outcome, attempts=attempt, started_at=started_at)
        raise WorkersLostError(
            f"the edit worker died on all {self.max_attempts} attempts for scene {getattr(scene, 'name', scene)}: "
            + "; ".join(lost)
        )

    def _run_on(self, slot: _Slot, scene: Any, edit: Any, config: Any,
                on_progress: ProgressCallback | None) -> EditOutcome:
        pending = slot.actor.edit.remote(scene, edit, config)
        last_report = None
        while True:
            done, _ = ray.wait([pending], timeout=self.poll_seconds)
            if done:
                try:
                    return ray.get(pending)
                except RayTaskError as exc:
                    raise _unwrap(exc) from None
            if on_progress is None:
                continue
            try:
                report = ray.get(slot.actor.progress.remote(), timeout=max(self.poll_seconds, 5.0))
            except GetTimeoutError:
                continue
            if report is not None and report != last_report:
                last_report = report
                on_progress(report, slot.name)


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except (RayActorError, ValueError):
        pass  # already gone


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unwrap(exc: RayTaskError) -> BaseException:
    """The exception the edit raised inside the actor (the remote traceback is logged at debug level)."""
    cause = exc.cause if isinstance(exc.cause, BaseException) else None
    logger.debug("edit failed in the worker:\n%s", exc)
    return cause if cause is not None else exc
