"""Teachers by name: ``EditConfig.teacher.name`` picks one (``--teacher`` on the command line).

A teacher class registers itself with :func:`register_teacher`; :func:`teacher_class` finds it.
``imix2mix.config.TEACHER_NAMES`` lists the same names without importing torch (a test checks).
"""

from __future__ import annotations

from imix2mix.registry import Registry
from imix2mix.teachers.base import Teacher

_TEACHERS: Registry[type] = Registry("teacher")


def register_teacher(name: str):
    """Class decorator: make a :class:`Teacher` implementation selectable as ``name``."""

    def register(cls: type) -> type:
        return _TEACHERS.register(name, cls)

    return register


def teacher_class(name: str) -> type:
    return _TEACHERS[name]


def teacher_names() -> tuple[str, ...]:
    return _TEACHERS.names()


from imix2mix.teachers import controlnet, ip2p  # noqa: E402  (registers the built-in teachers)

__all__ = ["Teacher", "controlnet", "register_teacher", "teacher_class", "teacher_names", "ip2p"]
