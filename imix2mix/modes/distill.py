"""I-Mix2Mix: personalise the student to one scene by score distillation from the teacher (METHOD.md §1).

:class:`DistillMode` runs one scene and edit in steps:

1. the teacher's edit of the reference view, the student's conditioning from it (z_ref, CLIP-H context,
   Plücker rays), the student reset to its pristine weights;
2. the teacher's per-scene context (text embeddings, conditioning latents, guidance);
3. the teacher's cross-view attention switched on;
4. the loop (:class:`Distillation`) under the run's execution plan: at each student timestep τ, k
   iterations of (student query → alignment → teacher t → noise → teacher ε̃ with cross-view attention →
   SDS update), then an Euler step to the next τ;
5. the last x̂0 decoded to images.

Reproducibility: one seed fixes the reference choice, the initial noise and every t, κ and ε draw
through the run's own generators (:class:`~imix2mix.randomness.RunRandomness`).  On CUDA, results are
repeatable only up to nondeterministic kernels (atomics in convolution/attention backward passes,
bf16/fp16 reductions): reruns agree closely but not bit for bit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imix2mix.accel import Execution, ExecutionPlan, LoopNeeds
from imix2mix.config import EditConfig
from imix2mix.modes.base import EditSession, ModeOutput, ProgressCallback, ProgressEvent
from imix2mix.randomness import RunRandomness
from imix2mix.schedules import LearningRateSchedule, StudentSchedule, make_teacher_timestep_sampler
from imix2mix.seva.autoencoder import SevaAutoencoder
from imix2mix.seva.camera import StudentConditioning
from imix2mix.seva.schedule import SevaDenoiser, euler_edm_step
from imix2mix.students.base import Student
from imix2mix.teachers.base import Teacher
from imix2mix.teachers.ip2p import resize_images


class DistillMode:
    """I-Mix2Mix (the default mode)."""

    name = "distill"

    def run(self, session: EditSession) -> ModeOutput:
        with prepared_distillation(session) as loop:  # 1.–3., and 4.'s execution plan
            with session.timed("distill"):
                estimate, log = loop.run(session.progress)  # 4.
        session.timings.update({f"phase_{k}": v for k, v in loop.timer.totals.items()})
        images = session.decode(estimate, loop.align)  # 5.
        return ModeOutput(
            images=images, reference_edit=session.reference_edit, iterations=loop.iteration, log=log,
            teacher_timesteps=list(loop.teacher_timesteps), key_views=list(loop.key_views),
        )


@contextlib.contextmanager
def prepared_distillation(session: EditSession) -> Iterator["Distillation"]:
    """Steps 1–3 and the loop ready to ``step()`` under the run's execution plan, undone on exit
    (benchmarks step it by hand through :meth:`imix2mix.editor.Editor.prepare_distillation`)."""
    config = session.config
    _, conditioning = session.reference_and_conditioning()  # 1.
    context = session.teacher_context()  # 2.
    session.teacher.set_cross_view_attention(config.ablation.cross_view_attention)  # 3.
    try:
        with session.execute(loop_needs(config)) as execution:
            yield Distillation(
                student=session.student, conditioning=conditioning, teacher=session.teacher, teacher_context=context,
                config=config, randomness=session.randomness, execution=execution, seva_vae=session.seva_vae,
            )
    finally:
        session.teacher.set_cross_view_attention("none")  # the next reference edit must not use it


def loop_needs(config: EditConfig) -> LoopNeeds:
    """What the loop asks of the execution: it trains the student, with ``student_query_steps`` student
    calls per step (one call is replayable as a captured graph)."""
    return LoopNeeds(trains_student=True, student_calls_per_step=config.ablation.student_query_steps)


# ---------------------------------------------------------------------------------------------
# Pieces of one iteration
# ---------------------------------------------------------------------------------------------


class LearnedAlignment(torch.nn.Module):
    """Table 3 "Learned Mapping": bilinear resize, then a 5×5 conv 4→4 initialised to the identity."""

    def __init__(self, size: int, channels: int = 4):
        super().__init__()
        self.size = size
        # skip_init: the default (random) init would draw from the global generator for nothing
        self.conv = torch.nn.utils.skip_init(torch.nn.Conv2d, channels, channels, kernel_size=5, padding=2)
        torch.nn.init.dirac_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(latents.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.conv(resized)


class PhaseTimer:
    """Wall time per phase, summed over iterations; a no-op unless enabled (it synchronises)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        self.totals: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


@dataclass
class StepOutcome:
    """One iteration's values, kept on the device (reading them is the caller's choice)."""

    tau: int
    t: int
    key_view: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor


def sds_surrogate_loss(estimate: torch.Tensor, guided_noise: torch.Tensor, noise: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """L = Σ(g ⊙ x̂0)/numel with g = w(ε̃ − ε) detached and NaNs zeroed: ∂L/∂x̂0 = g/numel.

    The DreamFusion stop-gradient trick; equal to ½‖x̂0 − sg(x̂0 − g)‖²/numel up to a constant.
    """
    gradient = torch.nan_to_num(weight * (guided_noise.float() - noise.float()), nan=0.0).detach()
    return (gradient * estimate.float()).sum() / estimate.numel()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class Distillation:
    """Per-scene state of the loop.  ``step()`` is one iteration; ``advance()`` the Euler step to
    the next τ; ``run()`` does the whole schedule.  A benchmark can call ``step()`` directly.

    The official code wraps the update in a ``GradScaler``; under bf16 autocast (or fp32) it only
    rescales and unscales, so it is left out.  The one behaviour it would add is skipping a step whose
    gradients are not finite; NaNs in g are zeroed before the backward pass, as in the official code.
    """

    def __init__(
        self,
        *,
        student: Student,
        conditioning: StudentConditioning,
        teacher: Teacher,
        teacher_context: Any,
        config: EditConfig,
        randomness: RunRandomness,
        execution: Execution | None = None,
        seva_vae: SevaAutoencoder | None = None,
    ):
        device = conditioning.cond.concat.device
        self.execution = execution or Execution(ExecutionPlan.eager(device), student.network)
        self.conditioning = conditioning
        self.cond = conditioning.cond
        self.num_frames = conditioning.num_frames
        self.num_views = self.num_frames - 1
        self.teacher = teacher
        self.teacher_context = teacher_context
        self.config = config
        self.randomness = randomness
        self.device = device
        self.seva_vae = seva_vae
        self.timer = PhaseTimer(config.logging.time_phases, device)
        method = config.method

        schedule = StudentSchedule.from_method(method)
        self.taus = schedule.taus
        self.updates_per_tau = schedule.updates_per_tau
        self.total_iterations = schedule.total_iterations
        self.lr_schedule = LearningRateSchedule.from_method(method)
        self.sample_t = make_teacher_timestep_sampler(
            config.ablation.teacher_t_schedule, randomness.timesteps, lower=method.teacher_t_lower,
            upper=method.teacher_t_upper, shape_factor=method.teacher_t_shape_factor,
        )
        self.teacher_latent_size = config.teacher.image_size // teacher.vae_scale_factor
        self.alignment = LearnedAlignment(self.teacher_latent_size).to(device) if config.ablation.alignment == "learned" else None
        self.trainable_parameters = student.trainable_parameters()
        if self.alignment is not None:
            self.trainable_parameters += list(self.alignment.parameters())
        self.optimizer = self.execution.optimizer(self.trainable_parameters, config)
        self.autocast = self.execution.autocast()
        latent_size = method.student_image_size // 8
        network = self.execution.student_function(self.cond, self.num_frames, latent_size)
        self.denoiser = SevaDenoiser(network, student.denoiser.schedule)
        self.sigmas = self.denoiser.schedule.table(device)

        latent_shape = (self.num_frames, 4, latent_size, latent_size)
        sigma_max = float(self.denoiser.schedule.sigmas[method.t_max])
        noise = torch.randn(latent_shape, generator=randomness.initial_noise)
        self.latents = (noise * (1.0 + sigma_max**2) ** 0.5).to(device)  # ζ ~ N(0, (1 + σ_max²) I)
        self.tau_position = 0
        self.updates_done_at_tau = 0
        self.iteration = 0
        self.last_estimate: torch.Tensor | None = None  # x̂0 of frames 1..N at the student's latent size
        self.teacher_timesteps: list[int] = []
        self.key_views: list[int] = []

    # -- the iteration --------------------------------------------------------------------------
    @property
    def tau(self) -> int:
        return self.taus[self.tau_position]

    def student_estimate(self, latents: torch.Tensor, tau: int) -> torch.Tensor:
        """x̂0 of all T frames from ζ_τ: the Tweedie estimate D(ζ; σ_τ) = ζ̃ − σ_τ ε_θ, or with
        ``student_query_steps`` = n > 1 the end of an n-step Euler trajectory τ → 0 (gradients through all)."""
        steps = self.config.ablation.student_query_steps
        indices = np.linspace(tau, 0, steps, endpoint=False).astype(int)
        sigmas = [self.sigmas[i] for i in indices] + [None]
        x = latents
        with self.autocast:
            for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
                denoised = self.denoiser(x, sigma, self.cond, self.num_frames)
                if sigma_next is None:
                    return denoised
                x = euler_edm_step(x, denoised, sigma, sigma_next)
        raise AssertionError("unreachable")  # pragma: no cover

    def align(self, estimate: torch.Tensor) -> torch.Tensor:
        """Student latents [N,4,h,w] → teacher latents [N,4,h_T,w_T] (METHOD §1.5 step 2)."""
        size, alignment = self.teacher_latent_size, self.config.ablation.alignment
        if alignment == "bilinear":
            return F.interpolate(estimate.float(), size=(size, size), mode="bilinear", align_corners=False)
        if alignment == "learned":
            return self.alignment(estimate)
        # decode_encode: student VAE decode → resize to the teacher's image size → teacher VAE encode
        images = self.seva_vae.decode(estimate.float())
        images = resize_images(images.float(), self.config.teacher.image_size)
        return self.teacher.encode(images).float()

    def step(self) -> StepOutcome:
        """One distillation iteration at the current τ (no host synchronisation)."""
        tau, config = self.tau, self.config
        # The previous iteration's gradients go before this forward, not just before the backward:
        # their memory is free while the activations build up.
        self.optimizer.zero_grad(set_to_none=True)
        self.execution.begin_iteration()
        with self.timer.phase("student_forward"):
            estimate = self.student_estimate(self.latents, tau)[1:]  # frames 1..N (slot 0 is the reference)
            aligned = self.align(estimate)
        with self.timer.phase("teacher"):
            t = self.sample_t(tau)
            key_view = self.randomness.key_view(self.num_views)
            noise = torch.randn(aligned.shape, generator=self.randomness.sds_noise, device=self.device)
            noisy = self.teacher.add_noise(aligned.detach(), t, noise)
            guided = self.teacher.predict_noise(noisy, t, self.teacher_context, key_view=key_view)
        with self.timer.phase("backward"):
            loss = sds_surrogate_loss(aligned, guided, noise, config.method.sds_weight)
            loss.backward()
        with self.timer.phase("clip_and_optimizer"):
            lr = self.lr_schedule(self.iteration)
            self.optimizer.set_lr(lr)
            grad_norm = self.optimizer.clip_and_step(config.method.grad_clip)
        self.last_estimate = estimate.detach()
        self.iteration += 1
        self.updates_done_at_tau += 1
        self.teacher_timesteps.append(t)
        self.key_views.append(key_view)
        return StepOutcome(tau=tau, t=t, key_view=key_view, lr=lr, loss=loss.detach(), grad_norm=grad_norm.detach())

    @torch.no_grad()
    def advance(self) -> bool:
        """Euler-EDM step ζ_τ → ζ_τnext with the updated student; False after the last τ (no step)."""
        if self.tau_position + 1 >= len(self.taus):
            return False
        sigma, sigma_next = self.sigmas[self.tau], self.sigmas[self.taus[self.tau_position + 1]]
        with self.execution.eager_forwards(), self.autocast:
            denoised = self.denoiser(self.latents, sigma, self.cond, self.num_frames)
        self.latents = euler_edm_step(self.latents, denoised.float(), sigma, sigma_next)
        self.tau_position += 1
        self.updates_done_at_tau = 0
        return True

    def run(self, progress: ProgressCallback | None = None) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """The whole schedule; returns the last x̂0 of frames 1..N and the logged values."""
        log: list[dict[str, float]] = []
        log_every = self.config.logging.log_every
        while True:
            for _ in range(self.updates_per_tau[self.tau_position] - self.updates_done_at_tau):
                outcome = self.step()
                logged = self.iteration % log_every == 0 or self.iteration == self.total_iterations
                loss = grad_norm = None
                if logged:
                    loss, grad_norm = float(outcome.loss), float(outcome.grad_norm)
                    log.append(dict(iteration=self.iteration, tau=outcome.tau, t=outcome.t, lr=outcome.lr, loss=loss, grad_norm=grad_norm))
                if progress is not None:
                    progress(ProgressEvent(self.iteration, self.total_iterations, outcome.tau, outcome.t, outcome.lr, loss, grad_norm))
            if not self.advance():
                break
        return self.last_estimate, log
