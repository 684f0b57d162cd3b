"""The epipolar consistency metric and the no-edit detector, on synthetic scenes with known cameras."""

from __future__ import annotations

import numpy as np
import pytest

from imix2mix.evaluation import NO_EDIT_CHANGED_FRACTION, edit_change
from imix2mix.geometry_metrics import (
    CONSISTENT_MEDIAN_PX,
    MIN_MATCHES,
    fundamental_matrix,
    pair_epipolar,
    scene_epipolar_consistency,
    square_intrinsics,
    symmetric_epipolar_distance,
    view_set_epipolar,
)
from imix2mix.preprocess import crop_box, prepare_view
from imix2mix.scene import Scene, View
from synthetic_scenes import _look_at, intrinsics, render, render_views

WIDTH, HEIGHT, CROP = 320, 240, 256


def _project(K: np.ndarray, c2w: np.ndarray, point: np.ndarray) -> np.ndarray:
    camera = np.linalg.inv(c2w) @ np.append(point, 1.0)
    pixel = K @ camera[:3]
    return pixel[:2] / pixel[2]


def test_fundamental_matrix_from_known_cameras_puts_projections_on_their_epipolar_lines():
    views = render_views(3, 64, 48)  # only the cameras are used
    K = intrinsics(320, 240, 260.0)
    rng = np.random.default_rng(0)
    points = rng.uniform([-1, 2, 0], [1, 4, 1.5], size=(20, 3))
    F = fundamental_matrix(K, views[0].c2w, K, views[2].c2w)
    x_i = np.array([_project(K, views[0].c2w, p) for p in points])
    x_j = np.array([_project(K, views[2].c2w, p) for p in points])
    assert np.max(symmetric_epipolar_distance(F, x_i, x_j)) < 1e-6
    shifted = symmetric_epipolar_distance(F, x_i, x_j + np.array([0.0, 5.0]))  # off the line by a few pixels
    assert np.all(shifted > 0.5)


def test_square_intrinsics_follow_the_engine_crop_and_the_output_size():
    view = render_views(2, WIDTH, HEIGHT)[0]
    point = np.array([0.3, 3.1, 0.7])
    x = _project(view.K, view.c2w, point)
    box = crop_box(HEIGHT, WIDTH, 576)
    height, width = box.original_hw
    in_crop = np.array([x[0] * box.resized_hw[1] / width - box.left, x[1] * box.resized_hw[0] / height - box.top])
    K_out = square_intrinsics(view.K, HEIGHT, WIDTH, crop_size=576, image_size=512)
    assert np.allclose(_project(K_out, view.c2w, point), in_crop * 512 / 576, atol=1e-9)


def test_pair_with_too_few_matches_is_insufficient_not_inconsistent():
    assert pair_epipolar(0, 1, np.full(MIN_MATCHES - 1, 50.0)).status == "insufficient"
    assert pair_epipolar(0, 1, np.full(MIN_MATCHES, 50.0)).status == "inconsistent"
    assert pair_epipolar(0, 1, np.full(MIN_MATCHES, CONSISTENT_MEDIAN_PX / 2)).status == "consistent"


@pytest.fixture(scope="module")
def synthetic():
    """Four views of the room, the engine's square crops of them, and three kinds of 'edits'."""
    truth = render_views(4, WIDTH, HEIGHT, 40.0)
    scene = Scene(tuple(View(v.name, v.image, v.K, v.c2w) for v in truth))

    def crops(images):
        out = []
        for v, image in zip(truth, images):
            square = prepare_view(View(v.name, image, v.K, v.c2w), CROP).image.permute(1, 2, 0).numpy()
            out.append(np.clip(np.round(square * 127.5 + 127.5), 0, 255).astype(np.uint8))
        return out

    originals = crops([v.image for v in truth])
    # 3D-consistent: the same geometry painted with other textures, rendered from the same cameras.
    repainted = crops([render(v.K, v.c2w, WIDTH, HEIGHT, texture_seed=100) for v in truth])

    def patched(image, seed):
        # Per-view independent: the same patches pasted at different random places in each view.
        rng, out, size = np.random.default_rng(seed), image.copy(), CROP // 3
        for k in range(6):
            top, left = rng.integers(0, CROP - size, 2)
            out[top:top + size, left:left + size] = repainted[k % 4][size:2 * size, size:2 * size]
        return out

    independent = [patched(image, 10 + index) for index, image in enumerate(originals)]
    return scene, originals, repainted, independent


def test_epipolar_score_separates_consistent_from_independent_changes(synthetic):
    scene, originals, repainted, independent = synthetic
    source = scene_epipolar_consistency(scene, originals, originals, CROP)
    consistent = scene_epipolar_consistency(scene, repainted, originals, CROP)
    inconsistent = scene_epipolar_consistency(scene, independent, originals, CROP)
    print(f"\nepipolar score: source {source.score}, repainted {consistent.score}, independent patches "
          f"{inconsistent.score}; medians {consistent.edited.median_px:.2f} vs {inconsistent.edited.median_px:.2f} px")
    assert source.score == 1.0 and source.source.consistent_fraction == 1.0
    assert source.source.median_px < 1.5  # SIFT on exact renders with exact cameras: sub-2-px
    assert all(pair.matches >= MIN_MATCHES for pair in consistent.edited.pairs)
    assert consistent.score >= 0.9
    assert inconsistent.score <= 0.5
    assert consistent.score - inconsistent.score >= 0.5
    assert inconsistent.edited.median_px > 4 * consistent.edited.median_px
    record = consistent.to_dict()
    assert len(record["edited"]["pairs"]) == 6 and record["score"] == consistent.score


def test_views_without_overlap_are_reported_as_insufficient():
    K = intrinsics(WIDTH, HEIGHT, 260.0)
    at_back_wall = _look_at(np.array([2.0, 1.0, 1.5]), np.array([2.5, 6.0, 2.0]))
    at_left_wall = _look_at(np.array([-1.0, 1.0, 1.5]), np.array([-4.0, 3.0, 2.0]))
    images = [render(K, at_back_wall, WIDTH, HEIGHT), render(K, at_left_wall, WIDTH, HEIGHT)]
    result = view_set_epipolar(images, [K, K], [at_back_wall, at_left_wall])
    (pair,) = result.pairs
    assert pair.status == "insufficient" and pair.matches < MIN_MATCHES and pair.median_px is None
    assert result.measured == 0 and result.consistent_fraction is None


def test_no_edit_detector_flags_identity_but_not_real_changes(synthetic):
    _, originals, repainted, _ = synthetic
    identity = edit_change(originals, originals)
    assert identity.no_edit and identity.changed_fraction == 0.0 and "near-identical" in identity.reason
    rng = np.random.default_rng(0)  # a VAE-like round trip: small high-frequency noise everywhere
    noisy = [np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8) for image in originals]
    assert edit_change(noisy, originals).no_edit
    changed = edit_change(repainted, originals)
    assert not changed.no_edit and changed.changed_fraction > 0.3 and changed.reason is None
    local = []  # a local edit (a mask on a face): one block of about 6% of each view replaced
    for image, other in zip(originals, repainted):
        out = image.copy()
        out[96:160, 96:160] = 255 - other[96:160, 96:160]
        local.append(out)
    local_change = edit_change(local, originals, clip_dir=0.2)
    assert not local_change.no_edit and local_change.changed_fraction > NO_EDIT_CHANGED_FRACTION
    # The same small change that CLIP says does not go towards the target caption is flagged.
    tiny = []
    for image in originals:
        out = image.copy()
        out[:40, :40] = 0  # about 2% of the view
        tiny.append(out)
    assert not edit_change(tiny, originals).no_edit
    weak = edit_change(tiny, originals, clip_dir=0.01)
    assert weak.no_edit and "CLIP Dir." in weak.reason


def test_run_evaluation_lands_in_the_runs_and_pairs_manifests(synthetic, tmp_path):
    from conftest import EXAMPLES

    from imix2mix.collection import EditSpec, PlannedRun, list_scenes
    from imix2mix.config import EditConfig
    from imix2mix.evaluation import RunEvaluation
    from imix2mix.manifests import PAIRS, RUNS, ManifestStore, pair_rows, run_row
    from imix2mix.metrics import SceneMetrics
    from imix2mix.storage import open_output_root

    scene, originals, repainted, _ = synthetic
    evaluation = RunEvaluation(change=edit_change(repainted, originals, clip_dir=0.3),
                               epipolar=scene_epipolar_consistency(scene, repainted, originals, CROP))
    face = next(ref for ref in list_scenes(EXAMPLES) if ref.scene_id == "face")
    config = EditConfig()
    run = PlannedRun(scene=face, edit=EditSpec("make it snowy"), config=config, config_hash=config.config_hash(),
                     output_root=open_output_root(tmp_path), folder_name="x")
    metrics = SceneMetrics(0.2, 0.3, 0.4, views=(), pair_consistency=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    store = ManifestStore(tmp_path)
    store.upsert_many({RUNS.name: [run_row(run, run_id="r1", status="succeeded", preset="tiny", started_at=None,
                                           metrics=metrics, evaluation=evaluation)],
                       PAIRS.name: pair_rows(run, run_id="r1", evaluation=evaluation, metrics=metrics)})
    (row,) = store.read_rows(RUNS)
    assert row["epipolar_score"] == evaluation.epipolar.score and row["no_edit"] is False
    assert row["changed_fraction"] == evaluation.change.changed_fraction
    assert row["epipolar_source_fraction"] == evaluation.epipolar.source.consistent_fraction
    pairs = store.read_rows(PAIRS)
    assert len(pairs) == 12 and [p["views"] for p in pairs] == ["edited"] * 6 + ["source"] * 6
    assert [p["clip_cons"] for p in pairs[:6]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] and pairs[6]["clip_cons"] is None
    assert [(p["view_i"], p["view_j"]) for p in pairs[:6]] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert all(p["matches"] >= MIN_MATCHES and p["status"] == "consistent" for p in pairs)
