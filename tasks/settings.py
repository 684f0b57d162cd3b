"""Typed settings of one pipeline run, built by the flows from their parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PipelineSettings:
    """Where outputs and caches go, which models to load, and how Ray is reached."""

    output_root: Path
    preset: str = "tiny"
    device: str = "auto"  # auto (GPU when the Ray cluster has one) | cuda | cpu
    workers: int | None = None  # EditWorker actors; default one per GPU, or 1 on CPU
    concurrency: int | None = None  # (scene, edit) runs in flight; default = workers
    ray_address: str | None = None  # an existing cluster; default RAY_ADDRESS, else a local one
    cache_dir: Path | None = None  # default <output_root>/.cache
    weights: Any = None  # imix2mix.presets.WeightSources for the full preset
    config_overrides: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 3  # per scene, when its actor dies

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.output_root / ".cache"
