"""CLIP metrics: the math on hand-made embeddings with known answers, and the model wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imix2mix.errors import MissingWeightsError
from imix2mix.metrics import (
    ClipMetricsModel,
    clip_consistency,
    clip_direction,
    clip_similarity,
    scene_metrics,
    view_pairs,
)
from imix2mix.presets import MetricsClipArchitecture, build_random_metrics_clip

E1, E2, E3 = torch.eye(3)


def test_similarity_of_unit_vectors():
    edited = torch.stack([E1, E2, (E1 + E2) / math.sqrt(2)])
    sims = clip_similarity(edited, E1)
    torch.testing.assert_close(sims, torch.tensor([1.0, 0.0, 1 / math.sqrt(2)], dtype=torch.float64))


def test_direction_follows_the_caption_change():
    original, edited = E1[None], E2[None]
    assert clip_direction(edited, original, target_text=E2, source_text=E1).item() == pytest.approx(1.0)
    assert clip_direction(edited, original, target_text=E1, source_text=E2).item() == pytest.approx(-1.0)
    # edit direction (−1, 1, 0) against text direction (0, 1, −1): cos = 1/2
    assert clip_direction(edited, original, target_text=E2, source_text=E3).item() == pytest.approx(0.5)


def test_consistency_over_all_unordered_pairs():
    assert view_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    original = torch.stack([E1, E2, E3])
    edited = torch.stack([E1, E2, E1])
    # (0,1): same differences → 1; (0,2): the edits coincide → zero vector → 0; (1,2): (e2−e3)·(e2−e1)/2 = 1/2
    torch.testing.assert_close(clip_consistency(edited, original), torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    assert clip_consistency(-original, original).tolist() == pytest.approx([-1.0, -1.0, -1.0])


def test_scene_metrics_means_and_per_view_values():
    original = torch.stack([E1, E2, E3])
    edited = torch.stack([E1, E2, E1])
    metrics = scene_metrics(edited, original, target_text=E1, source_text=E2)
    assert metrics.clip_cons == pytest.approx(0.5)
    assert [v.clip_cons for v in metrics.views] == pytest.approx([0.5, 0.75, 0.25])
    assert metrics.clip_sim == pytest.approx((1 + 0 + 1) / 3)
    # directions: view0 zero edit → 0; view1 zero → 0; view2 (e1 − e3)·(e1 − e2)/2 = 1/2
    assert [v.clip_dir for v in metrics.views] == pytest.approx([0.0, 0.0, 0.5])
    assert metrics.clip_dir == pytest.approx(0.5 / 3)
    assert metrics.pair_consistency == pytest.approx((1.0, 0.0, 0.5))


def test_without_captions_only_consistency_is_computed():
    original = torch.stack([E1, E2, E3])
    metrics = scene_metrics(original, original)
    assert metrics.clip_sim is None and metrics.clip_dir is None
    assert metrics.clip_cons == pytest.approx(1.0)
    assert all(v.clip_sim is None and v.clip_dir is None for v in metrics.views)
    assert set(metrics.to_dict()) == {"clip_sim", "clip_dir", "clip_cons", "views", "pair_consistency"}


@pytest.fixture(scope="module")
def clip() -> ClipMetricsModel:
    return build_random_metrics_clip(MetricsClipArchitecture.tiny(), seed=0)


def _images(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8) for _ in range(count)]


def test_embeddings_are_unit_vectors_and_inputs_agree(clip):
    images = _images(0, 3)
    from_uint8 = clip.embed_images(images)
    as_tensor = torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images])
    torch.testing.assert_close(from_uint8, clip.embed_images(as_tensor))
    torch.testing.assert_close(from_uint8.norm(dim=-1), torch.ones(3))
    text = clip.embed_texts(["a man", "a knight"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(text[0], text[1])


def test_score_combines_model_and_math(clip):
    originals, edited = _images(1, 4), _images(2, 4)
    metrics = clip.score(edited, originals, source_caption="a man", target_caption="a knight")
    e, o = clip.embed_images(edited), clip.embed_images(originals)
    target, source = clip.embed_texts(["a knight", "a man"])
    assert metrics.clip_sim == pytest.approx(float(clip_similarity(e, target).mean()), abs=1e-6)
    assert metrics.clip_dir == pytest.approx(float(clip_direction(e, o, target, source).mean()), abs=1e-6)
    assert metrics.clip_cons == pytest.approx(float(clip_consistency(e, o).mean()), abs=1e-6)
    assert len(metrics.pair_consistency) == 6
    unchanged = clip.score(originals, originals, source_caption="a man", target_caption="a knight")
    assert unchanged.clip_dir == pytest.approx(0.0, abs=1e-6)
    assert unchanged.clip_cons == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        clip.score(edited[:3], originals)


def test_from_pretrained_round_trip(tmp_path, clip):
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = ClipMetricsModel.from_pretrained(tmp_path / "clip")
    images = _images(3, 2)
    torch.testing.assert_close(loaded.embed_images(images), clip.embed_images(images))
    torch.testing.assert_close(loaded.embed_texts(["a knight"]), clip.embed_texts(["a knight"]))
    with pytest.raises(MissingWeightsError):
        ClipMetricsModel.from_pretrained(tmp_path / "nothing-here")
