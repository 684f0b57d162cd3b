"""The random draws of one run, from one seed, with no global RNG state.

:class:`RunRandomness` is the seam every draw of a run goes through: the reference choice, the initial
latent, and per iteration the teacher timestep t, the key view κ and the SDS noise ε, and per Euler step
its noise.  :class:`RecordedRandomness` replays recorded draws through the same methods (a run of the
official code, or an earlier run); the loop parity test (tests/test_loop_parity.py) injects the official
loop's draws this way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from imix2mix.errors import ImixError
from imix2mix.schedules import TeacherTimestepSampler, make_teacher_timestep_sampler

if TYPE_CHECKING:
    from imix2mix.config import EditConfig


@dataclass
class RunRandomness:
    """All random draws of one run, derived from one seed (no global RNG).

    One seed fixes the reference choice, the reference edit's sampler, the initial noise and every t, κ
    and ε draw of the loop, so the same seed on the same CPU gives identical images.  Each kind of draw
    has its own stream, so a draw added or removed in one place never shifts another (the official
    code draws all of them from torch's and numpy's global generators, in one interleaved sequence).
    """

    seed: int
    device: torch.device

    def __post_init__(self) -> None:
        self.timestep_rng = np.random.default_rng(self.seed)  # teacher t: the official stream
        self.initial_noise_generator = torch.Generator("cpu").manual_seed(self.seed)  # on CPU like SEVA's sampler
        self.key_view_generator = torch.Generator("cpu").manual_seed(self.seed + 1)  # κ: host-side, no device sync
        self.sds_noise_generator = torch.Generator(self.device).manual_seed(self.seed + 2)  # ε of the perturbation
        self.euler_noise_generator = torch.Generator(self.device).manual_seed(self.seed + 3)  # ε of the Euler steps
        self.reference_edit = torch.Generator(self.device).manual_seed(self.seed)  # the teacher pipeline's own draws

    def reference_choice(self, num_views: int) -> int:
        """The official ``random.seed(seed); random.choice(frame_indices)``, on a private Random."""
        return random.Random(self.seed).choice(range(num_views))

    def initial_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The N(0, 1) draw of the initial latent (CPU, float32), before the √(1 + σ_max²) factor."""
        return torch.randn(shape, generator=self.initial_noise_generator)

    def teacher_timestep_sampler(self, config: "EditConfig") -> TeacherTimestepSampler:
        """τ → t of the configured schedule, drawing from this run's stream."""
        method = config.method
        return make_teacher_timestep_sampler(
            config.ablation.teacher_t_schedule, self.timestep_rng, lower=method.teacher_t_lower,
            upper=method.teacher_t_upper, shape_factor=method.teacher_t_shape_factor,
        )

    def key_view(self, num_views: int) -> int:
        """κ, the view whose keys and values every view attends to in the teacher (0..N−1)."""
        return int(torch.randint(num_views, (1,), generator=self.key_view_generator))

    def sds_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """ε of one SDS perturbation, in the teacher's latent space, on the run's device."""
        return torch.randn(shape, generator=self.sds_noise_generator, device=self.sds_noise_generator.device)

    def euler_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """ε of one Euler step between τ, all T student slots, on the run's device."""
        return torch.randn(shape, generator=self.euler_noise_generator, device=self.euler_noise_generator.device)


@dataclass
class RecordedRandomness(RunRandomness):
    """A :class:`RunRandomness` whose draws come from a recording, in order, where one is given.

    Each recording replaces one stream; a stream left as None draws from ``seed`` as usual (e.g. the
    teacher pipeline's reference edit, which has no recorded form).  A recording that runs out, a
    tensor of the wrong shape or a key view out of range raises :class:`ImixError` naming the draw.
    """

    reference: int | None = None
    initial: torch.Tensor | None = None  # the N(0, 1) initial latent [T, 4, h, w] (before the σ_max factor)
    teacher_timesteps: Sequence[int] | None = None  # one t per iteration
    key_views: Sequence[int] | None = None  # one κ per iteration
    sds_noises: Sequence[torch.Tensor] | None = None  # one [N, 4, h_T, w_T] per iteration
    euler_noises: Sequence[torch.Tensor] | None = None  # one [T, 4, h, w] per Euler step

    def __post_init__(self) -> None:
        super().__post_init__()
        self._used: dict[str, int] = {}

    def _next(self, name: str, recorded: Sequence):
        index = self._used.get(name, 0)
        if index >= len(recorded):
            raise ImixError(f"RecordedRandomness: draw {index + 1} of {name} asked for, but only {len(recorded)} recorded.")
        self._used[name] = index + 1
        return recorded[index]

    @staticmethod
    def _tensor(name: str, value: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if tuple(value.shape) != tuple(shape):
            raise ImixError(f"RecordedRandomness: {name} has shape {tuple(value.shape)}, the run needs {tuple(shape)}.")
        return value.to(device=device, dtype=torch.float32)

    def reference_choice(self, num_views: int) -> int:
        if self.reference is None:
            return super().reference_choice(num_views)
        if not 0 <= self.reference < num_views:
            raise ImixError(f"RecordedRandomness: reference view {self.reference} is outside 0..{num_views - 1}.")
        return int(self.reference)

    def initial_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.initial is None:
            return super().initial_noise(shape)
        return self._tensor("the initial noise", self.initial, shape, torch.device("cpu"))

    def teacher_timestep_sampler(self, config: "EditConfig") -> TeacherTimestepSampler:
        if self.teacher_timesteps is None:
            return super().teacher_timestep_sampler(config)
        recorded = self.teacher_timesteps
        return lambda tau: int(self._next("the teacher timesteps", recorded))

    def key_view(self, num_views: int) -> int:
        if self.key_views is None:
            return super().key_view(num_views)
        value = int(self._next("the key views", self.key_views))
        if not 0 <= value < num_views:
            raise ImixError(f"RecordedRandomness: key view {value} is outside 0..{num_views - 1}.")
        return value

    def sds_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.sds_noises is None:
            return super().sds_noise(shape)
        return self._tensor("an SDS noise", self._next("the SDS noises", self.sds_noises), shape, self.device)

    def euler_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.euler_noises is None:
            return super().euler_noise(shape)
        return self._tensor("an Euler noise", self._next("the Euler noises", self.euler_noises), shape, self.device)
