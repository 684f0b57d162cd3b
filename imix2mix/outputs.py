"""Files of one edit run: ``view_XX.png``, ``view_XX_full.png``, ``reference_edit.png``,
``contact_sheet.png``, ``transforms.json`` and ``run.json``.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written image or JSON behind.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imix2mix.errors import ImixError
from imix2mix.files import atomic_write_bytes
from imix2mix.scene import TRANSFORMS_FILE, transforms_dict


@dataclass(frozen=True)
class OutputPaths:
    views: list[Path]
    full_views: list[Path]
    contact_sheet: Path
    run_json: Path
    reference_edit: Path | None = None
    transforms: Path | None = None


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, image: np.ndarray) -> Path:
    return atomic_write_bytes(path, png_bytes(image))


def contact_sheet(originals: list[np.ndarray], edits: list[np.ndarray], tile: int | None = None) -> np.ndarray:
    """Originals in the top row, their edits below, each tile resized to ``tile`` (default: edit size)."""
    if len(originals) != len(edits) or not edits:
        raise ValueError(f"need as many originals as edits (got {len(originals)} and {len(edits)})")
    tile = tile or edits[0].shape[0]
    rows = []
    for row in (originals, edits):
        tiles = [np.asarray(Image.fromarray(img).resize((tile, tile), Image.Resampling.BICUBIC)) for img in row]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def run_record(result, scene, metrics=None, evaluation=None) -> dict[str, Any]:
    """Everything ``run.json`` holds about one run (also useful to callers that log elsewhere)."""
    return _json_safe(
        {
            "scene": {"name": scene.name, "content_hash": scene.content_hash, "views": [view.name for view in scene.views]},
            "edit": result.edit.to_dict(),
            "config": result.config.to_dict(),
            "config_hash": result.config.config_hash(),
            "preset": result.preset,
            "random_weights": result.random_weights,
            "mode": result.config.mode,
            "reference_index": result.reference_index,
            "iterations": result.iterations,
            "timings_seconds": result.timings,
            "peak_memory_bytes": result.peak_memory_bytes,
            "device": result.device,
            "metrics": metrics.to_dict() if metrics is not None else None,
            "evaluation": evaluation.to_dict() if evaluation is not None else None,  # imix2mix.evaluation
            "log": result.log,
            "teacher_timesteps": result.teacher_timesteps,
            "key_views": result.key_views,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )


def view_file(index: int) -> str:
    """The file name of edited view ``index`` (square crop); ``_full`` marks the photo's own framing."""
    return f"view_{index:02d}.png"


def write_edit_outputs(result, scene, out_dir: str | Path, metrics=None, evaluation=None,
                       extra: dict[str, Any] | None = None) -> OutputPaths:
    """Write the images, contact sheet, ``transforms.json`` and ``run.json`` of ``result`` into ``out_dir``.

    ``transforms.json`` (nerfstudio format) holds the scene's cameras with the full-frame edited views
    (``view_XX_full.png``, each the size of its photo), so the folder trains a 3DGS/NeRF as it is.
    ``evaluation`` (its :class:`~imix2mix.evaluation.RunEvaluation`) is recorded in ``run.json``;
    ``extra`` adds top-level keys to ``run.json`` (the pipeline stores its manifest rows there).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ImixError(f"{out_dir}: the output path exists and is not a folder")
    if len(result.views) != len(scene.views):
        raise ImixError(f"{out_dir}: result has {len(result.views)} views but scene '{scene.name}' has {len(scene.views)}")
    views = [write_png(out_dir / view_file(i), image) for i, image in enumerate(result.views)]
    full_views = [write_png(out_dir / view_file(i).replace(".png", "_full.png"), image)
                  for i, image in enumerate(result.full_views)]
    reference = write_png(out_dir / "reference_edit.png", result.reference_edit) if result.reference_edit is not None else None
    sheet = write_png(out_dir / "contact_sheet.png", contact_sheet(result.originals, result.views))
    cameras = transforms_dict(scene, out_dir, file_paths=[path.name for path in full_views])
    transforms = atomic_write_bytes(out_dir / TRANSFORMS_FILE, (json.dumps(cameras, indent=2) + "\n").encode("utf-8"))
    record = run_record(result, scene, metrics, evaluation)
    record["files"] = {
        "views": [p.name for p in views],
        "full_views": [p.name for p in full_views],
        "contact_sheet": sheet.name,
        "reference_edit": reference.name if reference else None,
        "transforms": transforms.name,
    }
    record.update(_json_safe(extra or {}))
    run_json = atomic_write_bytes(out_dir / "run.json", (json.dumps(record, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return OutputPaths(views=views, full_views=full_views, contact_sheet=sheet, run_json=run_json,
                       reference_edit=reference, transforms=transforms)
