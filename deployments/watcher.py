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

from imix2mix.errors import ConfigError, ImixError
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


class AnnouncementError(ImixError):
    """The Prefect server did not accept a scene's event (unreachable, refused); the scene is not marked announced."""


def emit_scene_ready(ready: ReadyScene) -> None:
    """Send the event to the Prefect API in ``PREFECT_API_URL`` and wait until the server accepted it.

    Prefect's ``emit_event`` only queues an event for a background sender, so a server that is down
    would lose it silently; this posts it to the API's ``/events`` endpoint and raises
    :class:`AnnouncementError` unless the server answered that it recorded it.
    """
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    event = Event(
        event=SCENE_READY_EVENT,
        resource={
            "prefect.resource.id": ready.resource_id,
            "prefect.resource.name": ready.scene.scene_id,
            "imix2mix.root": ready.scene.root.uri,
        },
        payload=ready.event_payload(),
    )
    try:
        with get_client(sync_client=True) as client:
            response = client.request("POST", "/events", json=[event.model_dump(mode="json")])
            response.raise_for_status()
    except Exception as exc:  # noqa: BLE001 (connection refused, DNS, HTTP errors: all mean "not sent")
        raise AnnouncementError(f"the Prefect API at {require_prefect_api()} did not accept the event for "
                                f"{ready.scene.uri}: {type(exc).__name__}: {exc}") from exc


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

    Returns how many scenes were announced.  A scene whose event the server did not accept is retried
    at the next scan; with ``once``, :class:`AnnouncementError` is raised after the scan instead.
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
            failures = []
            for ready in scene_watch.scan(clock()):
                logger.info("scene ready: %s (inputs hash %s, edits hash %s)", ready.scene.uri,
                            ready.content_hash[:12], ready.edits_hash[:12])
                try:
                    emit(ready)
                except AnnouncementError as exc:
                    logger.error("%s; it will be announced on the next try", exc)
                    failures.append(ready.scene.scene_id)
                    continue
                scene_watch.mark_announced(ready)
                announced += 1
            if once and failures:
                raise AnnouncementError(f"{len(failures)} scene(s) not announced ({', '.join(failures)}): the Prefect "
                                        "API did not accept their events; run the watcher again once it is reachable")
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
