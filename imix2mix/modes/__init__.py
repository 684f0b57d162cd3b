"""Run modes by name: ``EditConfig.mode`` picks one (``--set mode=…``, ``modes:`` in edits files).

A mode registers itself with :func:`register_mode`; ``imix2mix.config.MODE_NAMES`` lists the same names
without importing torch (a test checks).
"""

from __future__ import annotations

from imix2mix.modes.base import EditSession, ModeOutput, ProgressCallback, ProgressEvent, RunMode
from imix2mix.registry import Registry

_MODES: Registry[RunMode] = Registry("mode")


def register_mode(mode: RunMode) -> RunMode:
    return _MODES.register(mode.name, mode)


def run_mode(name: str) -> RunMode:
    return _MODES[name]


def mode_names() -> tuple[str, ...]:
    return _MODES.names()


def _register_built_in_modes() -> None:
    from imix2mix.modes.baselines import JointEditMode, SDEditMode, StudentOnlyMode, TeacherOnlyMode
    from imix2mix.modes.distill import DistillMode

    for mode in (DistillMode(), TeacherOnlyMode(), StudentOnlyMode(), JointEditMode(), SDEditMode()):
        register_mode(mode)


_register_built_in_modes()

__all__ = ["EditSession", "ModeOutput", "ProgressCallback", "ProgressEvent", "RunMode", "mode_names", "register_mode", "run_mode"]
