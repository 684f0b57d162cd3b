"""The editor: models loaded once, one scene and edit per call.

:meth:`Editor.edit` reads top to bottom:

1. the effective config (the preset's, overridden, with the edit's own CFG and seed);
2. the models it uses on the device (an earlier run may have offloaded some);
3. the scene's square crops, the run's randomness and the reference view;
4. the run mode (``config.mode``, from :mod:`imix2mix.modes`) produces the N edited views;
5. uint8 views, pasted back into each photo's framing, and the :class:`EditResult`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from imix2mix.accel import release_cuda_memory
from imix2mix.config import EditConfig, TeacherConfig
from imix2mix.edits import Edit
from imix2mix.errors import ConfigError
from imix2mix.metrics import ClipMetricsModel, SceneMetrics
from imix2mix.modes import ProgressCallback, run_mode
from imix2mix.modes.base import EditSession
from imix2mix.modes.distill import Distillation, prepared_distillation
from imix2mix.preprocess import paste_back, prepare_views
from imix2mix.randomness import RunRandomness
from imix2mix.seva.autoencoder import SevaAutoencoder
from imix2mix.seva.conditioner import ClipImageConditioner
from imix2mix.students.seva import SevaStudent
from imix2mix.teachers.base import Teacher

TeacherLoader = Callable[[TeacherConfig], Teacher]


@dataclass
class EditResult:
    """What one edit produced.  Images are H×W×3 uint8; ``views[i]`` is the edit of scene view i."""

    views: list[np.ndarray]
    full_views: list[np.ndarray]  # each edit pasted back into the original photo's framing
    originals: list[np.ndarray]  # the square crops the edits correspond to
    reference_index: int
    reference_edit: np.ndarray | None  # the teacher's edit of the reference (None for teacher_only)
    edit: Edit
    config: EditConfig
    timings: dict[str, float]
    peak_memory_bytes: int | None  # device memory high-water mark (CUDA only)
    iterations: int
    log: list[dict[str, float]]
    device: str
    teacher_timesteps: list[int] = field(default_factory=list)
    key_views: list[int] = field(default_factory=list)
    preset: str = ""
    random_weights: bool = False  # True: the models were random (tiny preset, benchmarks): not a real edit
    # (name, start, end) of each timed phase in seconds since the edit began, in run order
    phase_spans: list[tuple[str, float, float]] = field(default_factory=list)


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [−1, 1] → H×W×3 uint8."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy().copy()


class Editor:
    """Holds the loaded teacher(s), the student, SEVA's VAE, CLIP-H and (optionally) the metrics CLIP.

    ``edit()`` resets the student to its pristine weights and builds a fresh optimizer, so one Editor
    serves many scenes.  Teachers are kept by (name, weights): the one given at construction, and any
    other a run's config names, loaded once through ``teacher_loader``.
    """

    def __init__(
        self,
        *,
        teacher: Teacher,
        student: SevaStudent,
        seva_vae: SevaAutoencoder,
        clip_image: ClipImageConditioner,
        clip_metrics: ClipMetricsModel | None = None,
        device: torch.device | str = "cpu",
        default_config: EditConfig | None = None,
        preset: str = "full",
        random_weights: bool = False,
        teacher_loader: TeacherLoader | None = None,
    ):
        self.device = torch.device(device)
        self.default_config = default_config or EditConfig()
        self.student = student
        self.seva_vae = seva_vae
        self.clip_image = clip_image
        self.clip_metrics = clip_metrics
        self.preset = preset
        self.random_weights = random_weights
        self.teacher_loader = teacher_loader
        self._teachers: dict[tuple[str, str | None], Teacher] = {self._teacher_key(self.default_config.teacher): teacher}

    @staticmethod
    def _teacher_key(settings: TeacherConfig) -> tuple[str, str | None]:
        return settings.name, settings.model_id

    @property
    def teacher(self) -> Teacher:
        """The default config's teacher."""
        return self.teacher_for(self.default_config.teacher)

    def teacher_for(self, settings: TeacherConfig) -> Teacher:
        """The teacher a run's config names, loaded on first use."""
        key = self._teacher_key(settings)
        if key not in self._teachers:
            if self.teacher_loader is None:
                raise ConfigError(f"this Editor has no loader for teacher '{settings.name}' ({settings.model_id or 'default weights'})")
            self._teachers[key] = self.teacher_loader(settings)
        return self._teachers[key]

    # -- the edit -------------------------------------------------------------------------------
    def edit(self, scene, edit: Edit, config: EditConfig | None = None, progress: ProgressCallback | None = None) -> EditResult:
        """Edit every view of ``scene`` (METHOD §1) with the mode ``config.mode`` (I-Mix2Mix
        distillation or a comparison method).  ``config`` defaults to the preset's."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        session = self.session(scene, edit, config, progress)  # 1.–3.
        output = run_mode(session.config.mode).run(session)  # 4.
        views = [to_uint8_image(image) for image in output.images]  # 5.
        full_views = [paste_back(image, view, prep.box) for image, view, prep in zip(views, scene.views, session.prepared)]
        session.timings["total"] = time.perf_counter() - started
        return EditResult(
            views=views,
            full_views=full_views,
            originals=[to_uint8_image(image) for image in session.originals],
            reference_index=session.reference,
            reference_edit=None if output.reference_edit is None else to_uint8_image(output.reference_edit),
            edit=edit,
            config=session.config,
            timings=session.timings,
            phase_spans=[(name, start - started, end - started) for name, start, end in session.phase_spans],
            peak_memory_bytes=int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None,
            iterations=output.iterations,
            log=output.log,
            device=_device_name(self.device),
            teacher_timesteps=output.teacher_timesteps,
            key_views=output.key_views,
            preset=self.preset,
            random_weights=self.random_weights,
        )

    def session(self, scene, edit: Edit, config: EditConfig | None = None, progress: ProgressCallback | None = None) -> EditSession:
        """Steps 1–3 of :meth:`edit`: what a run mode works from."""
        config = (config or self.default_config).for_edit(edit)
        teacher = self.teacher_for(config.teacher)
        # What an earlier run left to the cyclic collector (a run's execution releases its own CUDA
        # graphs when it ends; a run that failed before, or a mode's own objects, may not have).
        release_cuda_memory(self.device)
        if self.device.type == "cuda":
            # An earlier run with offload_after_use moved these to the host.
            teacher.onload()
            self.clip_image.to(self.device)
            self.seva_vae.to(self.device)
            if self.clip_metrics is not None and config.acceleration.offload_after_use:
                self.clip_metrics.to("cpu")  # waits on the host until score() (1.6 GiB less during the loop)
        prepared = prepare_views(scene, config.method.student_image_size)
        randomness = RunRandomness(config.seed, self.device)
        num_views = len(prepared)
        reference = config.reference_index if config.reference_index is not None else randomness.reference_choice(num_views)
        if reference >= num_views:
            raise ConfigError(f"EditConfig: reference_index {reference} but the scene '{scene.name}' has {num_views} views.")
        return EditSession(
            teacher=teacher, student=self.student, seva_vae=self.seva_vae, clip_image=self.clip_image, device=self.device,
            scene=scene, edit=edit, config=config, prepared=prepared,
            originals=torch.stack([view.image for view in prepared]),  # [N, 3, S, S] in [−1, 1]
            randomness=randomness, reference=reference, progress=progress,
        )

    def preview(self, scene, edit: Edit, config: EditConfig | None = None) -> tuple[int, np.ndarray]:
        """Only the teacher's edit of the reference view: (reference index, edited image)."""
        session = self.session(scene, edit, config)
        return session.reference, to_uint8_image(session.teacher_edit(session.originals[session.reference]))

    def score(self, result: EditResult, edit: Edit | None = None) -> SceneMetrics:
        """CLIP Sim./Dir./Cons. of a result with the already loaded metrics CLIP."""
        if self.clip_metrics is None:
            raise ConfigError("this Editor was built without the metrics CLIP (build_editor(..., metrics=True))")
        edit = edit or result.edit
        if self.clip_metrics.device != self.device:  # offloaded for the run (offload_after_use)
            self.clip_metrics.to(self.device)
        return self.clip_metrics.score(result.views, result.originals, edit.source_caption, edit.target_caption)

    # -- benchmarks: the loop by hand -----------------------------------------------------------
    def prepare_distillation(self, scene, edit: Edit, config: EditConfig | None = None) -> contextlib.AbstractContextManager[Distillation]:
        """Everything the distill mode does before its loop, and the :class:`Distillation` ready to
        ``step()`` under the run's execution plan, as a context manager (the plan is undone on exit):
        for benchmarks that time iterations."""
        return prepared_distillation(self.session(scene, edit, config))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


__all__ = ["EditResult", "Editor", "to_uint8_image"]
