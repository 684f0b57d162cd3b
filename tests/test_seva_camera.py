"""Camera conditioning: normalisation and Plücker maps against the official fixtures, computed from
our own scene loading (load_scene + prepare_views) of shared/scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PARITY, SCENES
from safetensors.torch import load_file

from imix2mix.preprocess import prepare_views
from imix2mix.scene import load_scene
from imix2mix.seva.camera import (
    build_conditioning,
    build_student_conditioning,
    normalize_cameras,
    plucker_coordinates,
    reference_layout,
)

SCENE_NAMES = ["face", "person-small"]


@pytest.fixture(scope="module", params=SCENE_NAMES)
def scene_case(request: pytest.FixtureRequest):
    name = request.param
    scene = load_scene(SCENES / name)
    prepared = prepare_views(scene, 576)
    fx = load_file(str(PARITY / f"seva_camera_{name}.safetensors"))
    return scene, prepared, fx


def student_conditioning(scene, prepared, reference: int = 0):
    return build_student_conditioning(
        np.stack([view.c2w for view in scene.views]),
        np.stack([view.K_normalized for view in prepared]),
        reference,
        torch.zeros(1, 4, 72, 72),
        torch.ones(1024),
    )


def test_student_cameras_match_official_from_our_loading(scene_case) -> None:
    scene, prepared, fx = scene_case
    assert len(scene.views) == 4
    conditioning = student_conditioning(scene, prepared)
    assert conditioning.layout == fx["layout_src_index"].tolist() == [0, 0, 1, 2, 3]
    torch.testing.assert_close(conditioning.K_normalized, fx["input_K_normalized"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conditioning.c2w_normalized, fx["c2w_normalized"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conditioning.plucker, fx["plucker"], rtol=1e-5, atol=1e-5)
    assert conditioning.input_frame_mask.tolist() == fx["cond_frames_mask"].tolist()
    # The reference camera sits camera_scale = 2 from the centre.
    assert conditioning.c2w_normalized[0, :3, 3].norm().item() == pytest.approx(2.0, abs=1e-5)


def test_normalisation_and_plucker_from_fixture_inputs(scene_case) -> None:
    _, _, fx = scene_case
    c2w = normalize_cameras(fx["input_c2w"], fx["all_c2ws"], float(fx["camera_scale"]))
    torch.testing.assert_close(c2w, fx["c2w_normalized"], rtol=1e-5, atol=1e-5)
    plucker = plucker_coordinates(c2w, fx["input_K_normalized"], 72, 72)
    torch.testing.assert_close(plucker, fx["plucker"], rtol=1e-5, atol=1e-5)


def test_student_conditioning_tensors(scene_case) -> None:
    scene, prepared, _ = scene_case
    latent = torch.randn(1, 4, 72, 72)
    embedding = torch.randn(1024)
    conditioning = build_student_conditioning(
        np.stack([v.c2w for v in scene.views]), np.stack([p.K_normalized for p in prepared]), 2, latent, embedding
    )
    cond = conditioning.cond
    assert conditioning.num_frames == 5 and conditioning.layout == [2, 0, 1, 2, 3]
    assert cond.crossattn.shape == (5, 1, 1024) and torch.equal(cond.crossattn[3, 0], embedding)
    assert torch.equal(cond.replace[0, :4], latent[0]) and bool((cond.replace[0, 4] == 1).all())
    assert cond.replace[1:].abs().sum() == 0
    assert torch.equal(cond.concat[:, 0], cond.replace[:, 4]) and torch.equal(cond.concat[:, 1:], cond.dense_vector)
    # Slot 0 and slot 3 are the same camera: identical rays, and the reference frame has no moment.
    torch.testing.assert_close(cond.dense_vector[3], cond.dense_vector[0], rtol=0, atol=1e-5)
    assert cond.dense_vector[0, 3:].abs().max() < 1e-6


def test_plucker_single_ray_example_from_spec() -> None:
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[1, 0, 3] = 1.0
    focal = 0.5 / np.tan(np.deg2rad(27.0))  # default 54° field of view
    K = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]], dtype=torch.float32).repeat(2, 1, 1)
    plucker = plucker_coordinates(c2w, K, 4, 4)
    torch.testing.assert_close(plucker[1, :3, 0, 0], torch.tensor([-0.33619, -0.33619, 0.87975]), rtol=0, atol=1e-5)
    torch.testing.assert_close(plucker[1, 3:, 0, 0], torch.tensor([0.0, -0.87975, -0.33619]), rtol=0, atol=1e-5)
    assert plucker[0, 3:].abs().max() == 0


def test_outlier_camera_is_left_out_of_the_centre() -> None:
    c2w = torch.eye(4).repeat(6, 1, 1)
    c2w[:5, 0, 3] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    c2w[5, 0, 3] = 1e7  # far beyond 10 × q97 would be kept by q97 alone; the 1e6 cap removes it
    normalized = normalize_cameras(c2w)
    # Centre = mean of the first five (x = 3): camera 0 at x = -2, scaled to distance 2.
    torch.testing.assert_close(normalized[0, :3, 3], torch.tensor([-2.0, 0.0, 0.0]))
    torch.testing.assert_close(normalized[4, :3, 3], torch.tensor([2.0, 0.0, 0.0]))


def test_camera_at_the_centre_uses_the_plain_scale() -> None:
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[1, 0, 3], c2w[2, 0, 3] = 1.0, -1.0  # mean 0: camera 0 sits at the centre
    normalized = normalize_cameras(c2w, camera_scale=2.0)
    torch.testing.assert_close(normalized[1, :3, 3], torch.tensor([2.0, 0.0, 0.0]))


def test_reference_layout_rejects_bad_index() -> None:
    assert reference_layout(3, 1) == [1, 0, 1, 2]
    with pytest.raises(ValueError, match="reference_index"):
        reference_layout(3, 3)


def test_general_window_conditioning_averages_input_embeddings() -> None:
    c2w = torch.eye(4).repeat(4, 1, 1)
    c2w[:, 0, 3] = torch.arange(4.0)
    K = torch.eye(3).repeat(4, 1, 1)
    mask = torch.tensor([True, False, True, False])
    latents = torch.randn(2, 4, 8, 8)
    embeddings = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    cond, _ = build_conditioning(c2w, K, mask, latents, embeddings)
    assert torch.equal(cond.crossattn[:, 0], torch.tensor([[2.0, 4.0]]).expand(4, 2))
    assert torch.equal(cond.replace[2, :4], latents[1]) and cond.replace[[1, 3]].abs().sum() == 0
