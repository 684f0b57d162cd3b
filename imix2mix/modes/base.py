"""What a run mode is, and the per-edit session every mode works from.

A run mode (I-Mix2Mix distillation, or one of the paper's comparison methods) turns one scene and edit
into N edited views.  It gets an :class:`EditSession`: the loaded models, the scene's prepared views,
the run's randomness and config, and the steps modes share (the teacher's edit of one view, the
student's conditioning from the reference, decoding, the execution plan for the student and teacher).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from imix2mix.accel import Execution, ExecutionPlan, LoopNeeds, execute
from imix2mix.config import EditConfig
from imix2mix.edits import Edit
from imix2mix.randomness import RunRandomness
from imix2mix.seva.autoencoder import SevaAutoencoder
from imix2mix.seva.camera import StudentConditioning, build_student_conditioning
from imix2mix.seva.conditioner import ClipImageConditioner
from imix2mix.students.base import Student
from imix2mix.teachers.base import Teacher


@dataclass(frozen=True)
class ProgressEvent:
    """Reported after every distillation iteration.  ``loss``/``grad_norm`` are filled every
    ``log_every`` iterations (and at the last): reading them synchronises the device."""

    iteration: int  # 1-based
    total: int
    tau: int
    t: int
    lr: float
    loss: float | None = None
    grad_norm: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class ModeOutput:
    """What a run mode produced: the N edited views as [N, 3, S, S] in [−1, 1] (host memory)."""

    images: torch.Tensor
    reference_edit: torch.Tensor | None = None  # the teacher's edit of the reference view, if one was made
    iterations: int = 0
    log: list[dict[str, float]] = field(default_factory=list)
    teacher_timesteps: list[int] = field(default_factory=list)
    key_views: list[int] = field(default_factory=list)


@dataclass
class EditSession:
    """One scene and edit on loaded models: the inputs of a run mode and the steps modes share."""

    teacher: Teacher
    student: Student
    seva_vae: SevaAutoencoder
    clip_image: ClipImageConditioner
    device: torch.device
    scene: Any
    edit: Edit
    config: EditConfig
    prepared: list  # PreparedView per scene view (576² crops, normalised intrinsics, crop boxes)
    originals: torch.Tensor  # [N, 3, S, S] in [−1, 1]
    randomness: RunRandomness
    reference: int  # index of the reference view
    timings: dict[str, float] = field(default_factory=dict)
    # (name, start, end) of each timed phase on time.perf_counter's clock, in run order: *when* each ran
    phase_spans: list[tuple[str, float, float]] = field(default_factory=list)
    progress: ProgressCallback | None = None
    reference_edit: torch.Tensor | None = None  # the teacher's edit of the reference, once made

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + end - start
            self.phase_spans.append((name, start, end))

    def execute(self, needs: LoopNeeds, *, teacher: bool = True) -> contextlib.AbstractContextManager[Execution]:
        """The run's execution plan applied to the student (and the teacher), undone on exit."""
        plan = ExecutionPlan.resolve(self.config, self.device, needs)
        return execute(plan, self.student.network, self.teacher if teacher else None)

    # -- steps shared by the modes ---------------------------------------------------------------
    def teacher_edit(self, image: torch.Tensor) -> torch.Tensor:
        """The teacher's full 2D edit of one [3, S, S] view (plain attention), on the host."""
        return self.teacher.edit_image(image, self.edit, self.config.teacher, self.randomness.reference_edit).cpu()

    def reference_and_conditioning(self) -> tuple[torch.Tensor | None, StudentConditioning]:
        """The teacher's edit of the reference view (unless the source-reference ablation), the student's
        conditioning from it, and the student reset for this scene."""
        config = self.config
        reference_edit = None
        if config.ablation.reference_edit == "edited":
            with self.timed("reference_edit"):
                reference_edit = self.teacher_edit(self.originals[self.reference])
            size = config.method.student_image_size
            reference_image = F.interpolate(reference_edit[None], size=(size, size), mode="bilinear", align_corners=False)
        else:  # Table 3 "Source ref. frame": the unedited reference conditions the student
            reference_image = self.originals[self.reference][None]
        with self.timed("conditioning"):
            conditioning = self._student_conditioning(reference_image)
        self.student.reset()
        self.reference_edit = reference_edit
        return reference_edit, conditioning

    @torch.no_grad()
    def _student_conditioning(self, reference_image: torch.Tensor) -> StudentConditioning:
        """z_ref and the CLIP-H context of the reference image [1, 3, S, S], plus the cameras."""
        reference_image = reference_image.float().to(self.device)
        reference_latent = self.seva_vae.encode(reference_image)
        embedding = self.clip_image(reference_image)
        if self.config.acceleration.offload_after_use and self.device.type == "cuda":
            self.clip_image.to("cpu")
            if not self.seva_vae_used_after_conditioning():
                self.seva_vae.to("cpu")  # fp32, 0.31 GiB at full size: its one use per scene was z_ref
        conditioning = build_student_conditioning(
            np.stack([view.c2w for view in self.scene.views]),
            np.stack([view.K_normalized for view in self.prepared]),
            self.reference,
            reference_latent.float(),
            embedding.reshape(-1).float(),
            self.config.method.camera_scale,
        )
        return conditioning.to(self.device)

    def seva_vae_used_after_conditioning(self) -> bool:
        """Whether the run needs SEVA's VAE after z_ref: decode-encode alignment in the loop, or SEVA's
        decoder for the outputs."""
        ablation = self.config.ablation
        return ablation.alignment == "decode_encode" or ablation.output_decoder == "seva"

    def teacher_context(self) -> Any:
        """The teacher's per-scene context for score distillation (text, conditioning latents, CFG)."""
        with self.timed("teacher_context"):
            context = self.teacher.prepare(self.edit, self.originals, self.config.teacher)
            if self.config.acceleration.offload_after_use and self.device.type == "cuda":
                self.teacher.offload()
                # What the setup freed (the reference edit's activations, the offloaded encoders) stays
                # cached in the allocator's shared pool, where the CUDA graphs' private pools, made
                # next, cannot reuse it: returned to the driver, it counts once, not twice.
                torch.cuda.empty_cache()
        return context

    def teacher_latent_size(self) -> int:
        return self.config.teacher.image_size // self.teacher.vae_scale_factor

    @torch.no_grad()
    def decode(self, estimate: torch.Tensor, align: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Final student x̂0 of the N views → images in [−1, 1] (METHOD §1.7): aligned to the teacher's
        latent size (as the loop aligned them, else bilinear) and decoded by the teacher's VAE, or
        decoded by SEVA's VAE at the student size (``output_decoder`` = seva)."""
        with self.timed("decode"):
            if self.config.ablation.output_decoder == "seva":
                return self.seva_vae.decode(estimate.float()).float().cpu()
            if align is None:
                size = self.teacher_latent_size()
                aligned = F.interpolate(estimate.float(), size=(size, size), mode="bilinear", align_corners=False)
            else:
                aligned = align(estimate)
            return self.teacher.decode(aligned).cpu()


class RunMode(Protocol):
    """One way to produce the N edited views of a scene (registered by name in :mod:`imix2mix.modes`)."""

    name: str

    def run(self, session: EditSession) -> ModeOutput: ...
