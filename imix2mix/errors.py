"""Errors a user can act on.

Every error raised to users derives from :class:`ImixError`; the CLI prints its message without a
stack trace.  Errors about an input file name that file and the reason.
"""

from __future__ import annotations

from pathlib import Path


class ImixError(Exception):
    """Base class: a problem the user can fix (bad input, missing weights, bad setting)."""


class SceneError(ImixError):
    """A scene folder or one of its files cannot be used."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


class RegistrationError(SceneError):
    """Structure from motion could not pose every photo of a scene."""

    def __init__(self, path: str | Path | None, reason: str, unregistered: list[str]):
        self.unregistered = list(unregistered)
        super().__init__(path, reason)


class MissingWeightsError(ImixError):
    """Model weights are not available locally and cannot be fetched."""


class ConfigError(ImixError):
    """An invalid setting (unknown key, wrong type or out-of-range value)."""


class NonFiniteError(ImixError, FloatingPointError):
    """A computation produced NaN or infinite values (e.g. the student's estimate diverged)."""
