"""Text2Video-Zero-style joint edit (the paper's T2VZ baseline, METHOD.md §5.1): a teacher's own
diffusers pipeline run on all N views as one batch, every frame's self-attention using the keys and
values of the **first** frame of its CFG group.

That is diffusers' ``CrossFrameAttnProcessor`` (Text2Video-Zero) semantics, and our RCVAttn
(:mod:`imix2mix.attention`) with κ fixed to 0: the same processors, so no second implementation.
The pipeline's batch is CFG groups × N views with the frames of one group contiguous (IP2P: 3
groups, ControlNet: 2), the layout the processors split by N.

The pipeline inputs are teacher-specific (``Teacher.pipeline_inputs``); :func:`joint_edit` runs any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from imix2mix.config import BaselineConfig

JOINT_EDIT_STEPS = BaselineConfig.t2vz_steps  # 100: the diffusers pipelines' default, as the T2VZ baseline ran them
FIRST_FRAME = 0


def _select_key_view(teacher, num_views: int, key_view: int) -> None:
    select = getattr(teacher, "select_key_view", None)  # teachers with several attention modules (ControlNet)
    if select is not None:
        select(num_views, key_view)
    else:
        teacher.key_view_state.select(num_views, key_view, teacher.device)


@contextlib.contextmanager
def first_frame_attention(teacher, num_views: int) -> Iterator[None]:
    """Within the block, the teacher's self-attention attends to frame 0 of each CFG group of
    ``num_views`` frames; its previous cross-view mode is restored afterwards."""
    previous = teacher.attention_mode
    teacher.set_cross_view_attention("rcv")
    _select_key_view(teacher, num_views, FIRST_FRAME)
    try:
        yield
    finally:
        teacher.set_cross_view_attention(previous)


def joint_edit(
    teacher,
    inputs: dict[str, Any],
    *,
    generator: torch.Generator,
    steps: int = JOINT_EDIT_STEPS,
    shared_initial_noise: bool = False,
) -> torch.Tensor:
    """Edit N views as one pipeline batch with first-frame cross-frame attention; returns
    [N, 3, S, S] in [−1, 1].

    ``inputs``: the teacher's pipeline arguments for the N views (one prompt per view).
    ``shared_initial_noise``: one initial latent for every frame (diffusers' Text2Video-Zero
    ControlNet recipe) instead of the pipeline's independent draws per frame (its IP2P recipe).
    """
    num_views = len(inputs["prompt"])
    extra: dict[str, Any] = {}
    if shared_initial_noise:
        size = int(inputs.get("height") or inputs["image"].shape[-1]) // teacher.pipeline.vae_scale_factor
        shape = (1, int(teacher.vae.config.latent_channels), size, size)
        one = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        extra["latents"] = one.expand(num_views, *shape[1:]).to(teacher.device, teacher.dtype)
    with first_frame_attention(teacher, num_views), torch.inference_mode():
        edited = teacher.pipeline(**inputs, **extra, num_inference_steps=steps, generator=generator, output_type="pt").images
    return (edited.float() * 2 - 1).clone()
