"""The storage watcher: announce complete scene folders as ``imix2mix.scene.ready`` Prefect events.

``imix2mix watch ROOT`` runs :func:`watch`.  Local roots are watched with file-system notifications
(watchdog) plus a periodic rescan for quiet periods; fsspec URLs are polled.  Which folders are
complete and which were already announced is decided by :mod:`imix2mix.watching`; this module only
loops and emits.  The ``edit-scene-on-upload`` deployment (``prefect.yaml``) reacts to the events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from imix2mix.errors import ConfigError
from imix2mix.watching import SCENE_READY_EVENT, ReadyScene, SceneWatch, WatchSettings

logger = logging.getLogger(__name__)

Emitter = Callable[[ReadyScene], None]


def require_prefect_api() -> str:
    """The API URL events go to; without one Prefect would start a throw-away server that nobody watches."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError("set PREFECT_API_URL to the Prefect server that runs the edit-scene-on-upload deployment "
                          "(e.g. http://127.0.0.1:4200/api)")
    return url


def emit_scene_ready(ready: ReadyScene) -> None:
    """Send the event to the Prefect API in ``PREFECT_API_URL`` (the deployment's trigger matches it)."""
    from prefect.events import emit_event

    event = emit_event(
        event=SCENE_READY_EVENT,
        resource={
            "prefect.resource.id": ready.resource_id,
            "prefect.resource.name": ready.scene.scene_id,
            "imix2mix.root": ready.scene.root.uri,
        },
        payload=ready.event_payload(),
    )
    if event is None:
        logger.warning("no Prefect API is configured (set PREFECT_API_URL); the event for %s was not sent",
                       ready.scene.uri)


def _start_notifications(root: Path, wake: threading.Event):  # noqa: ANN202 (watchdog observer)
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    class WakeOnChange(FileSystemEventHandler):
        def on_any_event(self, event) -> None:  # noqa: ANN001
            wake.set()

    observer = Observer()
    observer.schedule(WakeOnChange(), str(root), recursive=True)
    observer.daemon = True
    observer.start()
    return observer


def watch(
    root: str,
    state_file: str | Path,
    settings: WatchSettings | None = None,
    *,
    emit: Emitter = emit_scene_ready,
    stop: threading.Event | None = None,
    once: bool = False,
    clock: Callable[[], float] = time.time,
) -> int:
    """Announce ready scenes under ``root`` until ``stop`` is set (or after one scan with ``once``).

    Returns how many scenes were announced.
    """
    settings = settings or WatchSettings()
    stop = stop or threading.Event()
    if emit is emit_scene_ready:
        require_prefect_api()
    scene_watch = SceneWatch.open(root, state_file, settings)
    wake = threading.Event()
    observer = None
    if not once and scene_watch.root.is_local:
        observer = _start_notifications(Path(scene_watch.root.path), wake)
    logger.info("watching %s (marker %s, quiet period %.0f s, state %s)", scene_watch.root.uri, settings.marker,
                settings.quiet_seconds, state_file)
    announced = 0
    try:
        while True:
            for ready in scene_watch.scan(clock()):
                logger.info("scene ready: %s (content %s)", ready.scene.uri, ready.content_hash[:12])
                emit(ready)
                announced += 1
            if once or stop.is_set():
                return announced
            # Notifications end the wait early; the timeout catches quiet periods and remote roots.
            wake.wait(timeout=settings.poll_seconds)
            wake.clear()
            if stop.is_set():
                return announced
    finally:
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
