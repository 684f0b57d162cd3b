"""The three schedules of the I-Mix2Mix loop (METHOD.md §1.4, §1.5 step 3, §2).

* :class:`StudentSchedule`: the integer SEVA timesteps τ the student is distilled at, and how many
  optimizer updates k each one gets (k_initial at the first τ).
* Teacher timestep samplers: given the current τ, draw the InstructPix2Pix timestep t.  Each owns a
  seeded :class:`numpy.random.Generator` so a run never touches global random state.
* :class:`LearningRateSchedule`: linear warm-up, cosine decay, then constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from scipy.stats import truncnorm

from imix2mix.config import TeacherTimestepSchedule

if TYPE_CHECKING:
    from imix2mix.config import MethodConfig


@dataclass(frozen=True)
class StudentSchedule:
    """Integer τ values from ``t_max`` down to ``t_min`` and the number of updates at each.

    The count follows the official ``n_timesteps = ((t_max + 1 - t_min) // distill_dt) + 1`` and the
    values are ``linspace(t_max, t_min, n)`` cast to int, so the defaults give 999, 974, …, 49, 25.
    """

    t_max: int = 999
    t_min: int = 25
    distill_dt: int = 25
    k: int = 50
    k_initial: int = 200

    @classmethod
    def from_method(cls, method: "MethodConfig") -> "StudentSchedule":
        return cls(t_max=method.t_max, t_min=method.t_min, distill_dt=method.distill_dt, k=method.k, k_initial=method.k_initial)

    @property
    def num_timesteps(self) -> int:
        return (self.t_max + 1 - self.t_min) // self.distill_dt + 1

    @property
    def taus(self) -> list[int]:
        return [int(v) for v in np.linspace(self.t_max, self.t_min, self.num_timesteps).astype(np.int64)]

    @property
    def updates_per_tau(self) -> list[int]:
        return [self.k_initial] + [self.k] * (self.num_timesteps - 1)

    @property
    def total_iterations(self) -> int:
        return sum(self.updates_per_tau)


class TeacherTimestepSampler(Protocol):
    def __call__(self, tau: int) -> int: ...


@dataclass
class TruncatedNormalTimesteps:
    """t ~ TruncNorm(loc = upper, scale = (upper − τ)/f) on [τ, upper], truncated to an int.

    With f = 0.5 the density is almost flat, rising slightly towards ``upper``.  For τ ≥ upper the
    official code returns ``upper`` itself (a t below τ at the first two student steps): kept here.
    """

    rng: np.random.Generator
    upper: int = 950
    shape_factor: float = 0.5

    def __call__(self, tau: int) -> int:
        if tau >= self.upper:
            return self.upper
        scale = (self.upper - tau) / self.shape_factor
        low, high = (tau - self.upper) / scale, 0.0  # standardised bounds: (−f, 0)
        draw = truncnorm.rvs(low, high, loc=self.upper, scale=scale, random_state=self.rng)
        return int(draw)

    def distribution(self, tau: int):
        """The frozen scipy distribution drawn from at ``tau`` (before the int cast); for checks."""
        scale = (self.upper - tau) / self.shape_factor
        return truncnorm((tau - self.upper) / scale, 0.0, loc=self.upper, scale=scale)


@dataclass
class UniformTimesteps:
    """Ablation "Uniform t ∈ [0.05, 0.95]": t uniform on [lower, upper], independent of τ."""

    rng: np.random.Generator
    lower: int = 50
    upper: int = 950

    def __call__(self, tau: int) -> int:
        return int(self.rng.integers(self.lower, self.upper + 1))


@dataclass
class TauMatchedTimesteps:
    """Ablation "τ-matched t": t = τ, clipped to the teacher range [lower, upper]. Draws nothing."""

    lower: int = 50
    upper: int = 950

    def __call__(self, tau: int) -> int:
        return int(min(max(tau, self.lower), self.upper))


def make_teacher_timestep_sampler(
    kind: TeacherTimestepSchedule,
    rng: np.random.Generator,
    *,
    lower: int = 50,
    upper: int = 950,
    shape_factor: float = 0.5,
) -> TeacherTimestepSampler:
    if kind == "truncnorm":
        return TruncatedNormalTimesteps(rng=rng, upper=upper, shape_factor=shape_factor)
    if kind == "uniform":
        return UniformTimesteps(rng=rng, lower=lower, upper=upper)
    if kind == "tau_matched":
        return TauMatchedTimesteps(lower=lower, upper=upper)
    raise ValueError(f"unknown teacher timestep schedule {kind!r}")


@dataclass(frozen=True)
class LearningRateSchedule:
    """Linear warm-up ``min_lr → lr`` over ``warmup_steps``, cosine ``lr → final_lr`` over
    ``decay_steps``, then constant ``final_lr``.

    The official decay length is ``int((1000 / distill_dt) · k − warmup)`` (= 1800): it decays "until
    τ = 0" even though distillation stops at τ = 25, which leaves the last 150 of 2150 steps constant.
    """

    lr: float = 1e-4
    final_lr: float = 5e-5
    min_lr: float = 1e-9
    warmup_steps: int = 200
    decay_steps: int = 1800

    @classmethod
    def official(cls, *, lr: float, final_lr: float, min_lr: float, warmup_steps: int, distill_dt: int, k: int) -> "LearningRateSchedule":
        decay = int((1000 / distill_dt) * k - warmup_steps)
        return cls(lr=lr, final_lr=final_lr, min_lr=min_lr, warmup_steps=warmup_steps, decay_steps=max(decay, 1))

    @classmethod
    def from_method(cls, method: "MethodConfig") -> "LearningRateSchedule":
        return cls.official(
            lr=method.lr, final_lr=method.final_lr, min_lr=method.min_lr, warmup_steps=method.warmup_steps,
            distill_dt=method.distill_dt, k=method.k,
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.min_lr + (self.lr - self.min_lr) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / self.decay_steps
        if progress >= 1.0:
            return self.final_lr
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
