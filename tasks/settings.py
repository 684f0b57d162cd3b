"""Typed settings of one pipeline run, built by the flows from their parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imix2mix.storage import OutputRoot


def default_cache_dir() -> Path:
    """``$IMIX2MIX_CACHE``, else ``$XDG_CACHE_HOME/imix2mix`` (``~/.cache/imix2mix``).

    Shared by every output root: fetched inputs and SfM poses are keyed by content, so sharing helps.
    """
    if os.environ.get("IMIX2MIX_CACHE"):
        return Path(os.environ["IMIX2MIX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imix2mix"


@dataclass(frozen=True)
class PipelineSettings:
    """Where outputs and caches go, which models to load, and how Ray is reached."""

    output_root: OutputRoot  # a local folder or an fsspec URL (imix2mix.storage)
    preset: str = "full"
    device: str = "auto"  # auto (GPU when the Ray cluster has one) | cuda | cpu
    workers: int | None = None  # EditWorker actors; default one per GPU, or 1 on CPU
    concurrency: int | None = None  # (scene, edit) runs in flight; default = workers
    ray_address: str | None = None  # an existing cluster; default RAY_ADDRESS, else a local one
    cache_dir: Path = field(default_factory=default_cache_dir)  # fetched inputs, SfM poses, Ray sessions
    weights: Any = None  # imix2mix.presets.WeightSources for the full preset
    config_overrides: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 3  # per scene, when its actor dies
