"""One edit request: the instruction and what may override the run's config for it.

Torch-free, so edit documents can be parsed and validated (imix2mix.collection) without the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from imix2mix.errors import ConfigError


@dataclass(frozen=True)
class Edit:
    """One edit request.  Captions feed CLIP Sim./Dir. only; CFG scales and seed override the config."""

    instruction: str
    source_caption: str | None = None
    target_caption: str | None = None
    text_cfg: float | None = None
    image_cfg: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.instruction or not self.instruction.strip():
            raise ConfigError("Edit: the instruction is empty.")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Edit)}
