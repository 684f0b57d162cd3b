"""Subcommands of the ``imix2mix`` CLI, one module per group, and the helpers they share."""

from __future__ import annotations

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
