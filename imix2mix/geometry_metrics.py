"""Geometric consistency of an edited scene from its known cameras (TSED-style epipolar test).

Every view's camera is known, so for each unordered pair of views (i, j) the fundamental matrix F_ij
follows from the cameras alone; no estimation from the images is involved.  Local features (SIFT,
pycolmap) are matched between the two edited views (mutual nearest neighbours that pass Lowe's ratio
test), and each match's *symmetric epipolar distance* is measured: the mean of the distance of x_j to
the epipolar line F x_i and of x_i to Fᵀ x_j.  Matches on content that exists consistently in 3D
lie on their epipolar lines; content invented differently in each view does not.

Per pair: the number of matches, the median distance, and the fractions of matches under 2, 4 and
8 px.  Distances are expressed in pixels of a :data:`REFERENCE_SIZE`² image (the paper's 512² output),
whatever the size of the compared images, so thresholds mean the same at every preset.

* A pair is **consistent** when it has at least :data:`MIN_MATCHES` matches and a median under
  :data:`CONSISTENT_MEDIAN_PX`; **inconsistent** when it has the matches but not the median;
  **insufficient** (no measurable overlap) when it has fewer matches.  Insufficient pairs are left out
  of the score, not counted as failures.
* The scene's consistent fraction is consistent / (consistent + inconsistent) pairs.
* The **score** is the edited views' fraction divided by the source views' (the same measurement on
  the unedited crops: the floor the photos and their poses reach).  1 means as consistent as the
  photos; lower means edits that do not agree in 3D.

In the spirit of TSED (Yu et al. 2023, "Long-term photometric consistent novel view synthesis with
diffusion models"), with the known cameras of the scene instead of estimated ones.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from imix2mix.poses import pycolmap
from imix2mix.preprocess import crop_box, crop_intrinsics

REFERENCE_SIZE = 512  # distances are reported in pixels of an image this size
MIN_MATCHES = 10  # fewer matches: the pair has no measurable overlap
CONSISTENT_MEDIAN_PX = 4.0  # at REFERENCE_SIZE
DISTANCE_BINS_PX = (2.0, 4.0, 8.0)
RATIO = 0.8  # Lowe's ratio test
MAX_FEATURES = 4096

PairStatus = Literal["consistent", "inconsistent", "insufficient"]


@dataclass(frozen=True)
class PairEpipolar:
    """One unordered pair of views (i < j)."""

    i: int
    j: int
    matches: int
    median_px: float | None  # None below MIN_MATCHES
    under_2px: float | None
    under_4px: float | None
    under_8px: float | None
    status: PairStatus


@dataclass(frozen=True)
class ViewSetEpipolar:
    """Every pair of one set of views (the edits, or the source crops)."""

    pairs: tuple[PairEpipolar, ...]

    @property
    def measured(self) -> int:
        return sum(pair.status != "insufficient" for pair in self.pairs)

    @property
    def consistent(self) -> int:
        return sum(pair.status == "consistent" for pair in self.pairs)

    @property
    def consistent_fraction(self) -> float | None:
        """Consistent pairs over measured pairs; None when no pair could be measured."""
        return self.consistent / self.measured if self.measured else None

    @property
    def median_px(self) -> float | None:
        """Median over the measured pairs of their median distances."""
        medians = [pair.median_px for pair in self.pairs if pair.median_px is not None]
        return float(np.median(medians)) if medians else None


@dataclass(frozen=True)
class EpipolarConsistency:
    """The edited views' pairs, the source views' pairs, and the normalised score."""

    edited: ViewSetEpipolar
    source: ViewSetEpipolar
    threshold_px: float = CONSISTENT_MEDIAN_PX
    min_matches: int = MIN_MATCHES

    @property
    def score(self) -> float | None:
        """Edited consistent fraction / source consistent fraction (None when either is undefined or 0)."""
        edited, source = self.edited.consistent_fraction, self.source.consistent_fraction
        if edited is None or not source:
            return None
        return edited / source

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "threshold_px": self.threshold_px,
            "min_matches": self.min_matches,
            "reference_size": REFERENCE_SIZE,
            "edited": {"consistent_fraction": self.edited.consistent_fraction, "median_px": self.edited.median_px,
                       "measured_pairs": self.edited.measured, "pairs": [asdict(p) for p in self.edited.pairs]},
            "source": {"consistent_fraction": self.source.consistent_fraction, "median_px": self.source.median_px,
                       "measured_pairs": self.source.measured, "pairs": [asdict(p) for p in self.source.pairs]},
        }


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def square_intrinsics(K: np.ndarray, height: int, width: int, crop_size: int, image_size: int) -> np.ndarray:
    """Pixel K of an ``image_size``² image that shows the centre crop the engine took at ``crop_size``
    (:func:`~imix2mix.preprocess.crop_box`) of a ``height``×``width`` photo with intrinsics ``K``."""
    K_normalized = crop_intrinsics(K, crop_box(height, width, crop_size))
    return np.diag([image_size, image_size, 1.0]) @ K_normalized


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def fundamental_matrix(K_i: np.ndarray, c2w_i: np.ndarray, K_j: np.ndarray, c2w_j: np.ndarray) -> np.ndarray:
    """F with x_jᵀ F x_i = 0 for pixels x_i, x_j of one 3D point (OpenCV cameras, camera-to-world)."""
    w2c_i, w2c_j = np.linalg.inv(c2w_i), np.linalg.inv(c2w_j)
    rotation = w2c_j[:3, :3] @ w2c_i[:3, :3].T
    translation = w2c_j[:3, 3] - rotation @ w2c_i[:3, 3]
    essential = _skew(translation) @ rotation
    return np.linalg.inv(K_j).T @ essential @ np.linalg.inv(K_i)


def symmetric_epipolar_distance(F: np.ndarray, x_i: np.ndarray, x_j: np.ndarray) -> np.ndarray:
    """Per match, the mean of the distances of x_j to the line F x_i and of x_i to Fᵀ x_j (pixels)."""
    h_i = np.concatenate([x_i, np.ones((len(x_i), 1))], axis=1)
    h_j = np.concatenate([x_j, np.ones((len(x_j), 1))], axis=1)
    lines_j = h_i @ F.T  # F x_i, lines in image j
    lines_i = h_j @ F  # Fᵀ x_j, lines in image i
    algebraic = np.abs(np.sum(h_j * lines_j, axis=1))
    return 0.5 * (algebraic / np.linalg.norm(lines_j[:, :2], axis=1) + algebraic / np.linalg.norm(lines_i[:, :2], axis=1))


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def _two_nearest(distance: np.ndarray) -> np.ndarray:
    """Per row, the column indices of the smallest and second-smallest entries, in that order."""
    two = np.argpartition(distance, 1, axis=1)[:, :2]
    swap = np.take_along_axis(distance, two[:, :1], 1) > np.take_along_axis(distance, two[:, 1:], 1)
    return np.where(swap, two[:, ::-1], two)


class SiftMatcher:
    """SIFT keypoints and descriptors (pycolmap, CPU), matched by mutual nearest neighbour + ratio test."""

    def __init__(self, max_features: int = MAX_FEATURES, ratio: float = RATIO, num_threads: int = 1):
        options = pycolmap.FeatureExtractionOptions()
        options.num_threads = num_threads
        options.sift.max_num_features = max_features
        self.extractor = pycolmap.FeatureExtractor.create(options, device=pycolmap.Device.cpu)
        self.ratio = ratio

    def features(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints [M, 2] in pixel coordinates, pixel centres at +0.5; descriptors [M, 128] unit rows)."""
        image = np.asarray(image)
        grey = image if image.ndim == 2 else image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114])
        grey = np.ascontiguousarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
        keypoints, descriptors = self.extractor.extract_from_uint8_array(grey)
        points = np.array([[kp.x, kp.y] for kp in keypoints], dtype=np.float64).reshape(-1, 2)
        values = np.asarray(descriptors.data, dtype=np.float32).reshape(len(points), -1)
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        return points, values / np.maximum(norms, 1e-12)

    def match(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Index pairs [K, 2] of mutual nearest neighbours whose ratio test passes in both directions."""
        if len(first) < 2 or len(second) < 2:
            return np.zeros((0, 2), dtype=np.int64)
        distance = np.sqrt(np.maximum(2.0 - 2.0 * first @ second.T, 0.0))
        forward = _two_nearest(distance)
        backward = _two_nearest(distance.T)
        rows = np.arange(len(first))
        nearest, second_nearest = distance[rows, forward[:, 0]], distance[rows, forward[:, 1]]
        columns = np.arange(len(second))
        back_nearest, back_second = distance[backward[:, 0], columns], distance[backward[:, 1], columns]
        mutual = backward[forward[:, 0], 0] == rows
        keep = mutual & (nearest < self.ratio * second_nearest)
        keep &= back_nearest[forward[:, 0]] < self.ratio * back_second[forward[:, 0]]
        return np.stack([rows[keep], forward[keep, 0]], axis=1)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def pair_epipolar(i: int, j: int, distances: np.ndarray, *, threshold_px: float = CONSISTENT_MEDIAN_PX,
                  min_matches: int = MIN_MATCHES) -> PairEpipolar:
    """Summary of one pair's match distances (already in reference pixels)."""
    count = int(len(distances))
    if count < min_matches:
        return PairEpipolar(i, j, count, None, None, None, None, "insufficient")
    median = float(np.median(distances))
    under = [float(np.mean(distances < bound)) for bound in DISTANCE_BINS_PX]
    return PairEpipolar(i, j, count, median, *under, "consistent" if median < threshold_px else "inconsistent")


def view_set_epipolar(images: list[np.ndarray], Ks: list[np.ndarray], c2ws: list[np.ndarray], *,
                      matcher: SiftMatcher | None = None, threshold_px: float = CONSISTENT_MEDIAN_PX,
                      min_matches: int = MIN_MATCHES) -> ViewSetEpipolar:
    """Every pair (i < j) of ``images`` (H×W×3 or H×W uint8) with pixel intrinsics ``Ks`` for their own size."""
    if not (len(images) == len(Ks) == len(c2ws)):
        raise ValueError(f"{len(images)} images, {len(Ks)} intrinsics and {len(c2ws)} poses")
    matcher = matcher or SiftMatcher()
    features = [matcher.features(image) for image in images]
    pairs = []
    for i, j in itertools.combinations(range(len(images)), 2):
        (points_i, descriptors_i), (points_j, descriptors_j) = features[i], features[j]
        matches = matcher.match(descriptors_i, descriptors_j)
        F = fundamental_matrix(Ks[i], c2ws[i], Ks[j], c2ws[j])
        distances = symmetric_epipolar_distance(F, points_i[matches[:, 0]], points_j[matches[:, 1]])
        scale = REFERENCE_SIZE / max(images[i].shape[:2])  # both images of a pair have one size
        distances = distances[np.isfinite(distances)] * scale
        pairs.append(pair_epipolar(i, j, distances, threshold_px=threshold_px, min_matches=min_matches))
    return ViewSetEpipolar(tuple(pairs))


def epipolar_consistency(edited: list[np.ndarray], originals: list[np.ndarray], Ks: list[np.ndarray],
                         c2ws: list[np.ndarray], *, original_Ks: list[np.ndarray] | None = None,
                         matcher: SiftMatcher | None = None, threshold_px: float = CONSISTENT_MEDIAN_PX,
                         min_matches: int = MIN_MATCHES) -> EpipolarConsistency:
    """The edited views' and the source views' pair tables and the normalised score.

    ``Ks`` are the edited images' pixel intrinsics; ``original_Ks`` the originals' (default ``Ks``,
    when both sets have one size).
    """
    matcher = matcher or SiftMatcher()
    options = {"matcher": matcher, "threshold_px": threshold_px, "min_matches": min_matches}
    return EpipolarConsistency(
        edited=view_set_epipolar(edited, Ks, c2ws, **options),
        source=view_set_epipolar(originals, original_Ks or Ks, c2ws, **options),
        threshold_px=threshold_px, min_matches=min_matches,
    )


def scene_epipolar_consistency(scene, edited: list[np.ndarray], originals: list[np.ndarray], crop_size: int,
                               **options) -> EpipolarConsistency:
    """:func:`epipolar_consistency` of square edits and source crops of ``scene``'s views (same order),
    the crops having been taken at ``crop_size`` (``EditConfig.student_image_size``) and resized to
    whatever size each image has."""
    def intrinsics(images: list[np.ndarray]) -> list[np.ndarray]:
        return [square_intrinsics(view.K, view.height, view.width, crop_size, image.shape[0])
                for view, image in zip(scene.views, images, strict=True)]

    c2ws = [view.c2w for view in scene.views]
    return epipolar_consistency(edited, originals, intrinsics(edited), c2ws, original_Ks=intrinsics(originals),
                                **options)
