"""Control images of the ControlNet teachers: OpenCV Canny edges and min-max normalised depth."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

from imix2mix.errors import ConfigError, MissingWeightsError
from imix2mix.teachers.control_images import CannyControl, DepthControl, load_control_images, views_to_uint8


def scene_views(count: int = 2, height: int = 48, width: int = 64) -> torch.Tensor:
    """Views in [−1, 1] with sharp shapes (edges for Canny) plus a little noise."""
    generator = torch.Generator().manual_seed(0)
    views = torch.full((count, 3, height, width), -0.6)
    views[:, 0, 10:30, 12:40] = 0.8
    views[:, 1, 20:44, 30:60] = 0.5
    views[1, 2, 5:25, 5:25] = 0.9
    return (views + 0.05 * torch.randn(views.shape, generator=generator)).clamp(-1, 1)


def test_canny_is_opencv_canny_of_the_uint8_view_on_three_equal_channels():
    views = scene_views()
    control = CannyControl()(views)
    assert control.shape == views.shape and control.dtype == torch.float32
    assert set(torch.unique(control).tolist()) == {0.0, 1.0}
    for index in range(len(views)):
        # the uint8 view, computed here independently of the library
        pixels = ((views[index].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        expected = cv2.Canny(pixels, 100, 200)
        assert expected.any()
        for channel in range(3):
            np.testing.assert_array_equal((control[index, channel].numpy() * 255).round().astype(np.uint8), expected)
    assert not torch.equal(control[0], control[1])  # each view gets its own edges


def test_views_to_uint8_rounds_like_the_saved_images():
    views = torch.tensor([-1.0, 0.0, 1.0, 0.5]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert views_to_uint8(views)[0, 0, :, 0].tolist() == [0, 128, 255, 191]


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    """A random Depth-Anything model (Dinov2 backbone) of the official class, saved as safetensors."""
    folder = tmp_path_factory.mktemp("depth") / "depth-anything-tiny"
    torch.manual_seed(0)
    backbone = Dinov2Config(
        image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(
        size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def test_depth_is_min_max_normalised_per_view_on_three_equal_channels(tiny_depth_model):
    depth = load_control_images("depth", depth_model=tiny_depth_model)
    assert isinstance(depth, DepthControl)
    views = scene_views()
    control = depth(views)
    assert control.shape == views.shape
    for index in range(len(views)):
        assert torch.equal(control[index, 0], control[index, 1]) and torch.equal(control[index, 0], control[index, 2])
        # min-max normalisation: each view spans the whole uint8 range
        assert control[index].min() == 0.0 and control[index].max() == 1.0
    # the same numbers as the pipeline's raw prediction, normalised independently here
    raw = depth.estimator(Image.fromarray(views_to_uint8(views)[1]))["predicted_depth"]
    raw = raw.reshape(views.shape[-2:]).float()
    expected = ((raw - raw.min()) / (raw.max() - raw.min()) * 255).to(torch.uint8)
    torch.testing.assert_close((control[1, 0] * 255).round().to(torch.uint8), expected, atol=1, rtol=0)


def test_depth_loading_errors_name_the_folder(tmp_path, tiny_depth_model):
    with pytest.raises(MissingWeightsError, match="no-such-depth"):
        DepthControl.from_pretrained(tmp_path / "no-such-depth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="empty"):
        DepthControl.from_pretrained(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (pickled / name).write_text((tiny_depth_model / name).read_text())
    from safetensors.torch import load_file

    torch.save(load_file(tiny_depth_model / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(MissingWeightsError, match="pickled.*safetensors"):
        DepthControl.from_pretrained(pickled)


def test_unknown_control_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="segmentation"):
        load_control_images("segmentation")
