"""Checks of a finished edit beyond CLIP: did an edit happen at all, and is it consistent in 3D?

* **No-edit detector.**  The paper's failure mode (uniform / τ-matched teacher t) and a bad instruction
  both give a near-identity output: high CLIP Cons., CLIP Dir. ≈ 0.  Each edited view is compared with
  its source crop at :data:`COMPARE_SIZE`² (area-downsampled, which removes the VAE's high-frequency
  reconstruction error but keeps any real change of content): a pixel *changed* when its mean absolute
  difference over RGB in [0, 1] exceeds :data:`PIXEL_CHANGE`.  A run is flagged ``no_edit`` when the
  mean changed fraction over views is under :data:`NO_EDIT_CHANGED_FRACTION`, or, when CLIP Dir. is
  known, under :data:`WEAK_EDIT_CHANGED_FRACTION` with CLIP Dir. under :data:`NO_EDIT_CLIP_DIR` (a
  small change that does not go towards the target caption).
* **Geometric consistency**: :mod:`imix2mix.geometry_metrics`.

:func:`evaluate_result` computes both for an :class:`~imix2mix.editor.EditResult`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from imix2mix.geometry_metrics import EpipolarConsistency, scene_epipolar_consistency

COMPARE_SIZE = 64
PIXEL_CHANGE = 0.1
NO_EDIT_CHANGED_FRACTION = 0.01
WEAK_EDIT_CHANGED_FRACTION = 0.03
NO_EDIT_CLIP_DIR = 0.05


@dataclass(frozen=True)
class EditChange:
    """How much the edited views differ from their source crops."""

    changed_fraction: float  # mean over views of the fraction of changed pixels (at COMPARE_SIZE²)
    mean_abs_diff: float  # mean over views and pixels of |E − O| in [0, 1] (at COMPARE_SIZE²)
    per_view_changed: tuple[float, ...]
    clip_dir: float | None
    no_edit: bool
    reason: str | None  # why it was flagged

    def to_dict(self) -> dict:
        return asdict(self)


def _small(image: np.ndarray) -> np.ndarray:
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return np.asarray(pil.resize((COMPARE_SIZE, COMPARE_SIZE), Image.Resampling.BOX), np.float32) / 255.0


def edit_change(edited: list[np.ndarray], originals: list[np.ndarray], clip_dir: float | None = None) -> EditChange:
    """Compare H×W×3 uint8 edits with their source crops (any sizes; both are resized) and decide ``no_edit``."""
    if len(edited) != len(originals) or not edited:
        raise ValueError(f"need as many edits as originals (got {len(edited)} and {len(originals)})")
    changed, differences = [], []
    for edit, original in zip(edited, originals):
        difference = np.abs(_small(edit) - _small(original)).mean(axis=2)
        changed.append(float(np.mean(difference > PIXEL_CHANGE)))
        differences.append(float(difference.mean()))
    fraction = float(np.mean(changed))
    reason = None
    if fraction < NO_EDIT_CHANGED_FRACTION:
        reason = (f"the edited views are near-identical to the source crops ({100 * fraction:.2f}% of pixels "
                  f"changed, under {100 * NO_EDIT_CHANGED_FRACTION:g}%)")
    elif clip_dir is not None and clip_dir < NO_EDIT_CLIP_DIR and fraction < WEAK_EDIT_CHANGED_FRACTION:
        reason = (f"the edited views barely differ from the source crops ({100 * fraction:.2f}% of pixels changed) "
                  f"and not towards the target caption (CLIP Dir. {clip_dir:.3f})")
    return EditChange(changed_fraction=fraction, mean_abs_diff=float(np.mean(differences)),
                      per_view_changed=tuple(changed), clip_dir=clip_dir, no_edit=reason is not None, reason=reason)


@dataclass(frozen=True)
class RunEvaluation:
    """What :func:`evaluate_result` found: the no-edit check and the epipolar consistency."""

    change: EditChange
    epipolar: EpipolarConsistency

    @property
    def no_edit(self) -> bool:
        return self.change.no_edit

    def to_dict(self) -> dict:
        return {"no_edit": self.change.to_dict(), "epipolar": self.epipolar.to_dict()}


def evaluate_result(result, scene, metrics=None) -> RunEvaluation:
    """The checks of one :class:`~imix2mix.editor.EditResult` of ``scene`` (``metrics``: its CLIP scores)."""
    clip_dir = None if metrics is None else metrics.clip_dir
    change = edit_change(result.views, result.originals, clip_dir)
    epipolar = scene_epipolar_consistency(scene, result.views, result.originals, result.config.method.student_image_size)
    return RunEvaluation(change=change, epipolar=epipolar)


def format_score(value: float | None) -> str:
    """A score for a log or console line: three decimals, or ``n/a`` where it could not be measured."""
    return "n/a" if value is None else f"{value:.3f}"
