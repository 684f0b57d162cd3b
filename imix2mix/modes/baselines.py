"""The paper's comparison methods (METHOD.md §5.1) as run modes."""

from __future__ import annotations

import numpy as np
import torch

from imix2mix.accel import LoopNeeds
from imix2mix.modes.base import EditSession, ModeOutput
from imix2mix.seva.sampling import sample_novel_views
from imix2mix.seva.sdedit import SDEditSettings, sdedit_fusion
from imix2mix.teachers.joint_edit import joint_edit


class TeacherOnlyMode:
    """The teacher's 2D edit of every view, independently (no student)."""

    name = "teacher_only"

    def run(self, session: EditSession) -> ModeOutput:
        with session.timed("teacher_edits"):
            edited = torch.stack([session.teacher_edit(view) for view in session.originals])
        return ModeOutput(images=edited)


class StudentOnlyMode:
    """SEVA samples all N views from the edited reference alone (no distillation)."""

    name = "student_only"

    def run(self, session: EditSession) -> ModeOutput:
        config = session.config.baselines
        reference_edit, conditioning = session.reference_and_conditioning()
        with session.execute(LoopNeeds(trains_student=False), teacher=False) as execution, session.timed("student_sampling"):
            with torch.no_grad(), execution.eager_forwards():
                latents = sample_novel_views(
                    session.student.denoiser, conditioning, num_steps=config.student_only_steps, cfg=config.student_only_cfg,
                    cfg_min=config.student_only_cfg_min, generator=session.randomness.initial_noise_generator,
                )
        images = session.decode(latents[1:])
        return ModeOutput(images=images, reference_edit=reference_edit)


class JointEditMode:
    """Text2Video-Zero style (``t2vz``): the teacher's own pipeline on all N views as one batch, every
    frame's self-attention on frame 0's keys and values, ``t2vz_steps`` steps, the edit's CFG scales."""

    name = "t2vz"

    def run(self, session: EditSession) -> ModeOutput:
        teacher, settings = session.teacher, session.config.teacher
        inputs = teacher.pipeline_inputs(session.originals, session.edit, settings)
        with session.timed("joint_edit"):
            edited = joint_edit(
                teacher, inputs, generator=session.randomness.reference_edit, steps=session.config.baselines.t2vz_steps,
                shared_initial_noise=getattr(teacher, "joint_edit_shared_noise", False),
            ).cpu()
        return ModeOutput(images=edited)


class SDEditMode:
    """SDEdit fusion (``sdedit``, App. E.1): independent teacher edits of every view, fused by SEVA from
    noise level ``sdedit_t``: bilinear to the student size, SEVA-VAE encode, noise, ``sdedit_steps`` Euler
    steps with MultiviewCFG ``sdedit_cfg``, conditioned on the edited reference as the one input view."""

    name = "sdedit"

    def run(self, session: EditSession) -> ModeOutput:
        config = session.config
        with session.timed("teacher_edits"):
            edited = torch.stack([session.teacher_edit(view) for view in session.originals])
        settings = SDEditSettings(
            start=config.baselines.sdedit_t, num_steps=config.baselines.sdedit_steps, cfg=config.baselines.sdedit_cfg,
            cfg_min=config.baselines.sdedit_cfg_min, image_size=config.method.student_image_size,
        )
        session.student.reset()  # SEVA's own weights: an earlier run of this editor may have fine-tuned them
        with session.execute(LoopNeeds(trains_student=False), teacher=False) as execution, session.timed("sdedit_fusion"):
            with torch.no_grad(), execution.eager_forwards():
                latents = sdedit_fusion(
                    edited, np.stack([view.c2w for view in session.scene.views]), np.stack([view.K_normalized for view in session.prepared]),
                    session.reference, denoiser=session.student.denoiser, autoencoder=session.seva_vae, clip=session.clip_image,
                    settings=settings, generator=session.randomness.initial_noise_generator, camera_scale=config.method.camera_scale,
                )
        return ModeOutput(images=session.decode(latents), reference_edit=edited[session.reference])
