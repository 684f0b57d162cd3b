"""Subcommands of the ``imix2mix`` CLI, one module per group, and the helpers they share."""

from __future__ import annotations

import argparse

from imix2mix.errors import ConfigError


def parse_settings(items: list[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` arguments as a dict of strings; ``EditConfig.overridden`` parses the values."""
    settings = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        settings[key.strip()] = value.strip()
    return settings


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--teacher``, ``--teacher-id`` and ``--mode``: shorthands for ``--set teacher=…`` etc."""
    from imix2mix.config import MODE_NAMES, TEACHER_NAMES

    parser.add_argument("--teacher", choices=TEACHER_NAMES, default=None,
                        help="the 2D editor that teaches (default: ip2p); controlnet_* need --target-caption")
    parser.add_argument("--teacher-id", default=None, metavar="ID",
                        help="the teacher's weights: a hub id or local folder (ip2p: any InstructPix2Pix-pipeline "
                             "checkpoint, e.g. vinesmsuic/magicbrush-jul7; controlnet_*: the ControlNet)")
    parser.add_argument("--mode", choices=MODE_NAMES, default=None,
                        help="run mode: distill (I-Mix2Mix, default) or a comparison method")
    add_memory_argument(parser)


def add_memory_argument(parser: argparse.ArgumentParser) -> None:
    """``--memory``: a named memory profile (imix2mix.config.MEMORY_PROFILES)."""
    from imix2mix.config import MEMORY_PROFILES

    parser.add_argument("--memory", choices=tuple(MEMORY_PROFILES), default="default",
                        help="GPU memory profile: " + "; ".join(f"{name}: {p.summary}" for name, p in MEMORY_PROFILES.items())
                        + " (--set values win over the profile's)")


def selected_settings(args: argparse.Namespace) -> dict[str, str]:
    """The ``--memory`` profile's settings, then ``--set`` values, with ``--teacher`` / ``--teacher-id`` /
    ``--mode`` applied on top."""
    from imix2mix.config import memory_settings

    settings = memory_settings(args.memory, parse_settings(args.settings))
    for key, value in (("teacher", args.teacher), ("teacher_id", args.teacher_id), ("mode", args.mode)):
        if value is not None:
            settings[key] = value
    return settings
