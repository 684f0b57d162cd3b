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

Parity with the official loop: a :class:`~imix2mix.randomness.RecordedRandomness` replays recorded
draws, and a :class:`Distillation` observer sees each iteration's tensors (:class:`IterationRecord`,
:class:`EulerRecord`); through these tests/test_loop_parity.py compares the loop with the official one
on its fixtures.  The remaining intentional differences are listed in docs/architecture.md
("Differences from the official loop").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imix2mix.accel import Execution, ExecutionPlan, LoopNeeds
from imix2mix.config import EditConfig
from imix2mix.errors import NonFiniteError
from imix2mix.modes.base import EditSession, ModeOutput, ProgressCallback, ProgressEvent
from imix2mix.randomness import RunRandomness
from imix2mix.schedules import LearningRateSchedule, StudentSchedule
from imix2mix.seva.autoencoder import SevaAutoencoder
from imix2mix.seva.camera import StudentConditioning
from imix2mix.seva.schedule import SevaDenoiser, euler_edm_step, noise_term_scale
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


@dataclass(frozen=True)
class IterationRecord:
    """What one iteration computed, for an observer (tests, diagnostics); tensors detached, on the device.

    ``estimate`` and everything derived from it were computed with the parameters before this
    iteration's update; the observer is called after the update.
    """

    iteration: int  # 0-based: the learning-rate schedule's step
    tau: int
    t: int
    key_view: int
    lr: float
    estimate: torch.Tensor  # x̂0 of frames 1..N at the student's latent size
    aligned: torch.Tensor  # x̂0 in the teacher's latent space
    noise: torch.Tensor  # ε
    noisy: torch.Tensor  # z_t = √ᾱ_t·aligned + √(1 − ᾱ_t)·ε
    guided_noise: torch.Tensor  # the teacher's ε̃
    loss: torch.Tensor
    grad_norm: torch.Tensor  # before clipping


@dataclass(frozen=True)
class EulerRecord:
    """One Euler step between τ, for an observer: ``x_hat`` = latents + ε·√(σ̂² − σ²) (the latents
    themselves with ``euler_noise`` off, ``noise`` then None), ``denoised`` = D(x_hat; σ_τ), and
    ``latents``, those of the next τ."""

    tau: int
    tau_next: int
    noise: torch.Tensor | None
    x_hat: torch.Tensor
    denoised: torch.Tensor
    latents: torch.Tensor


LoopObserver = Callable[[IterationRecord | EulerRecord], None]


def sds_surrogate_loss(estimate: torch.Tensor, guided_noise: torch.Tensor, noise: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """L = Σ(g ⊙ x̂0)/numel with g = w(ε̃ − ε) detached, NaN and ±inf zeroed: ∂L/∂x̂0 = g/numel.

    The DreamFusion stop-gradient trick; equal to ½‖x̂0 − sg(x̂0 − g)‖²/numel up to a constant.
    Zeroing the infinities too (as the official code does) keeps an fp16 overflow in the teacher
    from writing NaN or huge values into the student's weights.
    """
    gradient = torch.nan_to_num(weight * (guided_noise.float() - noise.float()), nan=0.0, posinf=0.0, neginf=0.0).detach()
    return (gradient * estimate.float()).sum() / estimate.numel()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class Distillation:
    """Per-scene state of the loop.  ``step()`` is one iteration; ``advance()`` the Euler step to
    the next τ; ``run()`` does the whole schedule.  A benchmark can call ``step()`` directly.
    ``observer``, if given, receives an :class:`IterationRecord` after every update and an
    :class:`EulerRecord` after every Euler step.

    The official code wraps the update in a ``torch.cuda.amp.GradScaler`` (initial scale 65536); we
    leave it out.  Under bf16 autocast or in fp32 no loss scaling is needed, so it would only rescale
    and unscale.  What it changes on the GPU: the fp16-cast loss × 65536 overflows in the first
    backward pass, so the official run skips its first optimizer step (whose lr is min_lr = 1e-9) and
    halves the scale; later steps go through.  We do not copy that: it is an artefact of the fp16
    overflow, not part of the method, and all it does is keep iteration 0's gradient out of AdamW's
    moments and step count (docs/architecture.md, "Differences from the official loop", gives its size).  Its other
    behaviour, skipping steps with non-finite gradients, is covered by zeroing NaN/±inf in g before
    the backward pass (as the official code does) and by the x̂0 finiteness check (:meth:`check_finite`).

    The single-token cross-attentions of SEVA (context = one CLIP embedding, softmax ≡ 1) skip q and
    k (imix2mix/seva/attention.py), so ``attn2.to_q``, ``attn2.to_k`` and ``norm2`` of each multi-view
    transformer get no gradient and AdamW skips them, weight decay included.  In the official code they
    get round-off gradients (≤ 1e-8) and decay.  We leave them untouched: they cannot change any
    output, and they differ from the official values by ≤ 6.2e-6 after the fixture's 9 steps (the
    decay, lr·weight_decay·θ per step; about 0.15 % of θ over a default 2150-step run).
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
        observer: LoopObserver | None = None,
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
        self.observer = observer
        self.timer = PhaseTimer(config.logging.time_phases, device)
        method = config.method

        schedule = StudentSchedule.from_method(method)
        self.taus = schedule.taus
        self.updates_per_tau = schedule.updates_per_tau
        self.total_iterations = schedule.total_iterations
        self.lr_schedule = LearningRateSchedule.from_method(method)
        self.sample_t = randomness.teacher_timestep_sampler(config)
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
        noise = randomness.initial_noise(latent_shape)
        self.latents = (noise * (1.0 + sigma_max**2) ** 0.5).to(device)  # ζ ~ N(0, (1 + σ_max²) I)
        self.tau_position = 0
        self.updates_done_at_tau = 0
        self.iteration = 0
        self.last_estimate: torch.Tensor | None = None  # x̂0 of frames 1..N at the student's latent size
        self.teacher_timesteps: list[int] = []
        self.key_views: list[int] = []
        # The first iteration whose x̂0 was not finite (−1: none), kept on the device so that checking
        # costs no host synchronisation per iteration; read by check_finite().
        self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)
        self._checked_iterations = 0

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
            full_estimate = self.student_estimate(self.latents, tau)
            self._flag_nonfinite(full_estimate)
            estimate = full_estimate[1:]  # frames 1..N (slot 0 is the reference)
            aligned = self.align(estimate)
        with self.timer.phase("teacher"):
            t = self.sample_t(tau)
            key_view = self.randomness.key_view(self.num_views)
            noise = self.randomness.sds_noise(tuple(aligned.shape)).to(self.device)
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
        outcome = StepOutcome(tau=tau, t=t, key_view=key_view, lr=lr, loss=loss.detach(), grad_norm=grad_norm.detach())
        if self.observer is not None:
            self.observer(IterationRecord(
                iteration=self.iteration - 1, tau=tau, t=t, key_view=key_view, lr=lr, estimate=self.last_estimate,
                aligned=aligned.detach(), noise=noise, noisy=noisy, guided_noise=guided, loss=outcome.loss,
                grad_norm=outcome.grad_norm,
            ))
        return outcome

    def _flag_nonfinite(self, estimate: torch.Tensor) -> None:
        """Remember (on the device) the first iteration whose x̂0 holds a NaN or an infinity."""
        bad = ~torch.isfinite(estimate).all()
        self._first_nonfinite = torch.where(bad & (self._first_nonfinite < 0), self.iteration, self._first_nonfinite)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` if a student x̂0 since the last check was not finite.

        The official loop checks x̂0 every iteration before calling the teacher (a host synchronisation
        each time); here the check is recorded on the device and read where the logged values are read.
        A diverged student is therefore reported up to ``log_every`` iterations late; those iterations
        change nothing the run keeps, since it stops with the error."""
        first, checked = int(self._first_nonfinite), self._checked_iterations
        self._checked_iterations = self.iteration
        if first >= 0:
            raise NonFiniteError(
                f"The student's estimate x̂0 is not finite (NaN or inf) from iteration {first + 1} on "
                f"(checked iterations {checked + 1}–{self.iteration} of {self.total_iterations}): the student diverged."
            )

    @torch.no_grad()
    def advance(self) -> bool:
        """Euler-EDM step ζ_τ → ζ_τnext with the updated student; False after the last τ (no step).

        With ``euler_noise`` (the official step): ζ̂ = ζ + ε·√(σ̂² − σ²) with σ̂ = σ + 1e-6, then
        ζ' = ζ̂ + (σ' − σ)(ζ̂ − D(ζ̂; σ))/σ.  The student is queried at σ (σ̂ rounds to the same table
        entry) and the step divides by σ, not σ̂, as the official loop does (bit-exact on the loop
        fixture; σ̂ would move its latents by 3e-5).  In fp32 the noise factor is exactly 0 while
        σ + 1e-6 rounds back to σ (τ ≥ 814 with SEVA's table), then 0.03–0.23 % of σ at the default τ."""
        if self.tau_position + 1 >= len(self.taus):
            return False
        tau, tau_next = self.tau, self.taus[self.tau_position + 1]
        sigma, sigma_next = self.sigmas[tau], self.sigmas[tau_next]
        noise = None
        x_hat = self.latents
        if self.config.method.euler_noise:
            noise = self.randomness.euler_noise(tuple(self.latents.shape)).to(self.device)
            x_hat = self.latents + noise * noise_term_scale(sigma)
        with self.execution.eager_forwards(), self.autocast:
            denoised = self.denoiser(x_hat, sigma, self.cond, self.num_frames)
        self.latents = euler_edm_step(x_hat, denoised.float(), sigma, sigma_next)
        self.tau_position += 1
        self.updates_done_at_tau = 0
        if self.observer is not None:
            self.observer(EulerRecord(tau, tau_next, noise, x_hat, denoised.float(), self.latents))
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
                    self.check_finite()
                    loss, grad_norm = float(outcome.loss), float(outcome.grad_norm)
                    log.append(dict(iteration=self.iteration, tau=outcome.tau, t=outcome.t, lr=outcome.lr, loss=loss, grad_norm=grad_norm))
                if progress is not None:
                    progress(ProgressEvent(self.iteration, self.total_iterations, outcome.tau, outcome.t, outcome.lr, loss, grad_norm))
            if not self.advance():
                break
        self.check_finite()
        return self.last_estimate, log
