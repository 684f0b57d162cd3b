"""Control images for the ControlNet teachers (METHOD.md §7, §8.1 ``src/utils.py``), one per source view.

* ``canny``: OpenCV ``cv2.Canny(view, 100, 200)`` on the uint8 RGB view, replicated to 3 channels
  (values 0 or 255).  OpenCV itself, not kornia: kornia's ``canny`` smooths with a Gaussian first and
  thresholds normalised float gradients, so its edges are not OpenCV's.
* ``depth``: the transformers ``depth-estimation`` pipeline (Depth-Anything-V2 base by default),
  its predicted depth at the view's size min-max normalised per image to uint8, replicated to 3
  channels.

Both take views as [N, 3, H, W] tensors in [−1, 1] and return [N, 3, H, W] float32 in [0, 1], the
range diffusers' ControlNet pipelines feed the ControlNet (no normalisation to [−1, 1]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from imix2mix.errors import ConfigError, MissingWeightsError
from imix2mix.hub import resolve_dir

ControlKind = Literal["canny", "depth"]
CONTROL_KINDS: tuple[str, ...] = ("canny", "depth")
CANNY_THRESHOLDS = (100, 200)
DEPTH_MODEL = "depth-anything/Depth-Anything-V2-base-hf"
# What a depth-model snapshot needs: configs and safetensors weights, never a pickle.
_DEPTH_FILES = ["*.json", "*.safetensors"]


def views_to_uint8(views: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [−1, 1] → [N, H, W, 3] uint8 RGB (the rounding of the saved PNGs)."""
    pixels = ((views.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy().copy()


def _as_control_tensor(maps: list[np.ndarray]) -> torch.Tensor:
    """H×W uint8 maps → [N, 3, H, W] float32 in [0, 1], each map replicated to 3 channels."""
    stacked = torch.from_numpy(np.stack(maps)).float() / 255.0
    return stacked[:, None].expand(-1, 3, -1, -1).contiguous()


class ControlImages(Protocol):
    """Computes one control image per view: [N, 3, H, W] in [−1, 1] → [N, 3, H, W] in [0, 1]."""

    kind: str

    def __call__(self, views: torch.Tensor) -> torch.Tensor: ...


class CannyControl:
    """OpenCV Canny edges with the official thresholds (100, 200)."""

    kind = "canny"

    def __init__(self, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]):
        self.low, self.high = low, high

    def edges(self, view: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 RGB → H×W uint8 edge map (0 or 255)."""
        import cv2

        return cv2.Canny(np.ascontiguousarray(view), self.low, self.high)

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        return _as_control_tensor([self.edges(view) for view in views_to_uint8(views)])


class DepthControl:
    """Relative depth from a transformers depth-estimation pipeline, min-max normalised per image."""

    kind = "depth"

    def __init__(self, estimator):
        self.estimator = estimator  # a transformers DepthEstimationPipeline

    @classmethod
    def from_pretrained(cls, source: str | Path = DEPTH_MODEL, *, device: torch.device | str = "cpu") -> "DepthControl":
        """Load a depth-estimation model folder or hub id (safetensors weights only)."""
        from transformers import pipeline

        what = "depth estimator (ControlNet depth teacher)"
        folder = resolve_dir(source, what=what, hint=f"It is public: `hf download {DEPTH_MODEL}`.", allow_patterns=_DEPTH_FILES)
        try:
            estimator = pipeline("depth-estimation", model=str(folder), device=torch.device(device), model_kwargs={"use_safetensors": True})
        except (OSError, ValueError, KeyError) as exc:
            raise MissingWeightsError(
                f"{what}: '{folder}' is not a transformers depth-estimation model folder with safetensors weights ({exc})."
            ) from exc
        return cls(estimator)

    def depth_map(self, view: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 RGB → H×W uint8: the predicted depth at the view's size, min-max normalised."""
        from PIL import Image

        with torch.inference_mode():
            depth = self.estimator(Image.fromarray(view))["predicted_depth"]
        depth = depth.float().cpu().reshape(view.shape[:2]).numpy()
        span = float(depth.max() - depth.min())
        if span == 0.0:  # a flat prediction has no relative depth: black rather than 0/0
            return np.zeros(view.shape[:2], dtype=np.uint8)
        return ((depth - depth.min()) / span * 255.0).astype(np.uint8)

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        return _as_control_tensor([self.depth_map(view) for view in views_to_uint8(views)])


def build_random_depth_control(tiny: bool = True, seed: int = 0, device: torch.device | str = "cpu") -> DepthControl:
    """A Depth-Anything estimator of the official class with random weights and no files: ``tiny``
    (a 4-layer, 16-wide Dinov2 backbone at 28² inputs) or the V2-base architecture (benchmarks)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor, pipeline

    if tiny:
        backbone = Dinov2Config(
            image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
            out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
        )
        config = DepthAnythingConfig(
            backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8,
        )
        size = 28
    else:  # Depth-Anything-V2-base: ViT-B/14 backbone, DPT neck of the released config
        backbone = Dinov2Config(
            image_size=518, patch_size=14, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            out_indices=[3, 6, 9, 12], reshape_hidden_states=False, layerscale_value=1.0,
        )
        config = DepthAnythingConfig(
            backbone_config=backbone, reassemble_hidden_size=768, neck_hidden_sizes=[96, 192, 384, 768], fusion_hidden_size=128,
            head_hidden_size=32, depth_estimation_type="relative",
        )
        size = 518
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = DepthAnythingForDepthEstimation(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    processor = DPTImageProcessor(
        size={"height": size, "width": size}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    return DepthControl(pipeline("depth-estimation", model=model, image_processor=processor, device=torch.device(device)))


def load_control_images(kind: str, *, depth_model: str | Path = DEPTH_MODEL, device: torch.device | str = "cpu") -> ControlImages:
    """The control-image maker registered under ``kind`` ("canny" or "depth")."""
    if kind == "canny":
        return CannyControl()
    if kind == "depth":
        return DepthControl.from_pretrained(depth_model, device=device)
    raise ConfigError(f"unknown control image kind '{kind}'; choose one of {', '.join(CONTROL_KINDS)}")
