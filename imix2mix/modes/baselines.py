"""The paper's comparison methods (METHOD.md §5.1) as run modes."""

from __future__ import annotations

import torch

from imix2mix.accel import LoopNeeds
from imix2mix.modes.base import EditSession, ModeOutput
from imix2mix.seva.sampling import sample_novel_views


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
                    cfg_min=config.student_only_cfg_min, generator=session.randomness.initial_noise,
                )
        images = session.decode(latents[1:])
        return ModeOutput(images=images, reference_edit=reference_edit)
