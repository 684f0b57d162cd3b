"""What a teacher is: the frozen 2D editor that score distillation queries (METHOD.md §1.1, §1.5).

The loop and the run modes see teachers only through :class:`Teacher`; each implementation keeps its
own per-scene context (text embeddings, conditioning latents, guidance scales) and its own batch layout.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from imix2mix.config import CrossViewAttention, TeacherConfig
from imix2mix.edits import Edit
from imix2mix.kernels.dispatch import KernelSet


@runtime_checkable
class Teacher(Protocol):
    """A frozen latent-diffusion editor with ε-prediction, used without gradients."""

    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion VAEs)."""

    def prepare(self, edit: Edit, originals: torch.Tensor, settings: TeacherConfig) -> Any:
        """The per-scene context: whatever :meth:`predict_noise` needs about the edit and the source
        views ``originals`` [N, 3, H, W] in [−1, 1] (computed once, no graph kept)."""

    def add_noise(self, latents: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t ẑ0 + √(1−ᾱ_t) ε with the teacher's own noise schedule."""

    def predict_noise(self, noisy_latents: torch.Tensor, t: int, context: Any, *, key_view: int = 0) -> torch.Tensor:
        """Guided ε̃ [N, 4, h, w] (fp32, no graph) for N noisy views; ``key_view``: κ of the cross-view attention."""

    def edit_image(self, image: torch.Tensor, edit: Edit, settings: TeacherConfig, generator: torch.Generator) -> torch.Tensor:
        """The full 2D edit of one [3, H, W] image in [−1, 1] → [3, S, S], S = ``settings.image_size``."""

    def pipeline_inputs(self, views: torch.Tensor, edit: Edit, settings: TeacherConfig) -> dict[str, Any]:
        """The teacher's diffusers pipeline arguments for N views [N, 3, H, W] in [−1, 1] (one prompt per
        view): what the T2VZ mode runs as one batch.  ``joint_edit_shared_noise``: one initial latent for
        all frames in that mode."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [−1, 1] → scaled latents (differentiable)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images [B, 3, S, S] in [−1, 1] (fp32)."""

    def set_cross_view_attention(self, mode: CrossViewAttention) -> None:
        """The self-attention used by :meth:`predict_noise` (``none`` between runs)."""

    def offload(self) -> None:
        """Move what is used once per scene off the accelerator."""

    def onload(self) -> None:
        """Bring it back."""

    # execution settings, owned by imix2mix.accel for the length of one run
    def set_memory_format(self, memory_format: torch.memory_format) -> None: ...

    def compile_noise_prediction(self, mode: str | None) -> None: ...

    def set_graph_capture(self, enabled: bool) -> None: ...

    def set_kernels(self, kernels: KernelSet) -> KernelSet:
        """The kernel set of the fused ops of :meth:`predict_noise`'s network; returns the previous one."""
