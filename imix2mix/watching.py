"""Deciding when a scene folder that lands in storage is complete, and remembering what was announced.

A scene folder is *ready* when it holds a ``_READY`` marker file, or when its listing (names, sizes,
mtimes / etags) has not changed for a quiet period.  A ready scene is announced once per content: its
inputs hash (photos and poses, as the planner computes it) and its edit files' hash; announcements
are remembered in a JSON state file that survives restarts, once the server accepted them.  Scenes
are found with :func:`imix2mix.collection.list_scenes`, so folders and
files that resolve outside the root are never read.

The clock is always passed in (``now``, epoch seconds), so the logic is tested without sleeping.  Sending the
events is the caller's job (``deployments/watcher.py``); nothing here talks to Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from imix2mix.collection import (
    READY_MARKER,
    CollectionRoot,
    SceneRef,
    edit_files_hash,
    list_scenes,
    listing_fingerprint,
    open_root,
    scene_content_hash,
)
from imix2mix.errors import SceneError
from imix2mix.files import atomic_write_text

logger = logging.getLogger(__name__)

SCENE_READY_EVENT = "imix2mix.scene.ready"
SCENE_RESOURCE_PREFIX = "imix2mix.scene."


@dataclass(frozen=True)
class WatchSettings:
    quiet_seconds: float = 30.0  # a folder without marker is complete after this long unchanged
    marker: str = READY_MARKER
    poll_seconds: float = 5.0  # rescan interval when file-system notifications are not available


@dataclass(frozen=True)
class ReadyScene:
    """A complete scene folder to announce.

    ``content_hash`` is the scene's inputs hash (photos and poses: :func:`imix2mix.collection.scene_content_hash`),
    the one the planner logs and ``runs.parquet`` records as ``scene_content_hash``; ``edits_hash`` covers
    its edit files.  A scene is announced again when either changes.
    """

    scene: SceneRef
    content_hash: str
    edits_hash: str

    @property
    def resource_id(self) -> str:
        return f"{SCENE_RESOURCE_PREFIX}{self.scene.scene_id}"

    @property
    def announcement(self) -> str:
        """What the ledger remembers as announced."""
        return f"{self.content_hash}+{self.edits_hash}"

    def event_payload(self) -> dict[str, str]:
        return {
            "scene_uri": self.scene.uri,
            "root": self.scene.root.uri,
            "scene_id": self.scene.scene_id,
            "content_hash": self.content_hash,
            "edits_hash": self.edits_hash,
        }


@dataclass
class _Observation:
    listing: str
    since: float


class ReadinessTracker:
    """Remembers each scene's listing between scans to apply the quiet period."""

    def __init__(self, settings: WatchSettings):
        self.settings = settings
        self._observations: dict[str, _Observation] = {}

    def is_ready(self, scene: SceneRef, listing: str, now: float, modified_at: float | None = None) -> bool:
        """``now`` and ``modified_at`` (the newest file time, when storage reports one) in epoch seconds.

        A folder seen for the first time counts as unchanged since its newest file, so folders that
        were already complete when the watcher started need not wait another quiet period.
        """
        has_marker = scene.root.fs.isfile(posixpath.join(scene.path, self.settings.marker))
        observation = self._observations.get(scene.scene_id)
        if observation is None:
            since = now if modified_at is None else min(now, modified_at)
            observation = self._observations[scene.scene_id] = _Observation(listing, since)
        elif observation.listing != listing:
            observation = self._observations[scene.scene_id] = _Observation(listing, now)
        return has_marker or now - observation.since >= self.settings.quiet_seconds


def newest_modification(scene: SceneRef) -> float | None:
    """The newest modification time of the scene's files in epoch seconds, if the storage reports one."""
    times = []
    for info in scene.root.fs.find(scene.path, withdirs=False, detail=True).values():
        value = info.get("mtime", info.get("LastModified", info.get("updated")))
        if isinstance(value, (int, float)):
            times.append(float(value))
        elif isinstance(value, datetime):
            times.append(value.timestamp())
    return max(times) if times else None


class AnnouncementLedger:
    """Which content hash was last announced per scene, persisted as JSON (written atomically)."""

    def __init__(self, state_file: str | os.PathLike[str]):
        self.state_file = Path(state_file)
        self._announced: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        if not self.state_file.exists():
            return {}
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            announced = data["announced"]
            if not isinstance(announced, dict):
                raise TypeError("'announced' is not an object")
            return {str(key): str(value) for key, value in announced.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SceneError(self.state_file, f"watch state file is unreadable ({exc}); "
                                              "move it away to start over (scenes will be announced again)") from exc

    def already_announced(self, scene_id: str, content_hash: str) -> bool:
        return self._announced.get(scene_id) == content_hash

    def record(self, scene_id: str, content_hash: str) -> None:
        self._announced[scene_id] = content_hash
        atomic_write_text(self.state_file, json.dumps({"announced": self._announced}, indent=1, sort_keys=True))


def default_state_file(root_uri: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Where the watcher of ``root_uri`` keeps its ledger by default (one file per root)."""
    key = hashlib.sha256(root_uri.encode()).hexdigest()[:16]
    return Path(cache_dir) / "watch" / f"{key}.json"


@dataclass
class SceneWatch:
    """One watched root: scan it to get the scenes that became ready since the last announcement.

    ``scan(now)`` returns the ready scenes not yet announced with their current contents; the caller
    calls :meth:`mark_announced` once the Prefect server accepted a scene's event, so a scene whose
    event could not be sent is returned again by the next scan.
    """

    root: CollectionRoot
    ledger: AnnouncementLedger
    settings: WatchSettings = field(default_factory=WatchSettings)
    tracker: ReadinessTracker = field(init=False)
    _hashed: dict[tuple[str, str], tuple[str, str]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.tracker = ReadinessTracker(self.settings)

    @classmethod
    def open(cls, root: str | os.PathLike[str], state_file: str | os.PathLike[str],
             settings: WatchSettings | None = None) -> "SceneWatch":
        return cls(open_root(root), AnnouncementLedger(state_file), settings or WatchSettings())

    def scan(self, now: float) -> list[ReadyScene]:
        ready = []
        for scene in list_scenes(self.root):
            try:
                listing = listing_fingerprint(scene)
                if not self.tracker.is_ready(scene, listing, now, newest_modification(scene)):
                    continue
                hashes = self._hashes(scene, listing)
            except (SceneError, OSError) as exc:
                logger.warning("not announcing scene %s: %s", scene.uri, exc)
                continue
            candidate = ReadyScene(scene, *hashes)
            if not self.ledger.already_announced(scene.scene_id, candidate.announcement):
                ready.append(candidate)
        return ready

    def mark_announced(self, ready: ReadyScene) -> None:
        self.ledger.record(ready.scene.scene_id, ready.announcement)

    def _hashes(self, scene: SceneRef, listing: str) -> tuple[str, str]:
        """(inputs hash, edits hash), computed once per listing: rescans of an unchanged folder read no bytes."""
        key = (scene.scene_id, listing)
        if key not in self._hashed:
            self._hashed[key] = (scene_content_hash(scene), edit_files_hash(scene))
        return self._hashed[key]
