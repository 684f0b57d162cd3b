"""Student τ schedule, teacher-t samplers and the LR schedule against METHOD.md §1.4, §1.5, §2."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from imix2mix.schedules import (
    LearningRateSchedule,
    StudentSchedule,
    TauMatchedTimesteps,
    TruncatedNormalTimesteps,
    UniformTimesteps,
    make_teacher_timestep_sampler,
)


def test_default_student_schedule_has_40_taus_and_2150_iterations():
    schedule = StudentSchedule()
    taus = schedule.taus
    assert len(taus) == 40
    assert taus[0] == 999 and taus[1] == 974 and taus[2] == 949
    assert taus[-2] == 49 and taus[-1] == 25
    assert all(a > b for a, b in zip(taus, taus[1:]))
    assert schedule.updates_per_tau[0] == 200 and set(schedule.updates_per_tau[1:]) == {50}
    assert schedule.total_iterations == 200 + 39 * 50 == 2150


def test_short_student_schedule():
    schedule = StudentSchedule(t_max=999, t_min=25, distill_dt=195, k=2, k_initial=4)
    assert schedule.num_timesteps == 6
    assert schedule.taus[0] == 999 and schedule.taus[-1] == 25
    assert schedule.total_iterations == 4 + 5 * 2


def test_truncnorm_draws_stay_in_support_and_follow_the_density():
    sampler = TruncatedNormalTimesteps(rng=np.random.default_rng(0), upper=950, shape_factor=0.5)
    tau = 300
    draws = np.array([sampler(tau) for _ in range(4000)])
    assert draws.min() >= tau and draws.max() <= 949
    # Compare the integer draws with the floor of scipy's continuous truncnorm: P(int ≤ m) = F(m + 1).
    scale = (950 - tau) / 0.5
    reference = stats.truncnorm(-0.5, 0.0, loc=950, scale=scale)
    result = stats.kstest(draws + 1.0, reference.cdf)
    assert result.pvalue > 0.01
    # f = 0.5: almost flat, slightly more mass near the upper end (density ratio e^{-1/8} at the edges).
    lower_half = np.mean(draws < (tau + 950) / 2)
    assert 0.44 < lower_half < 0.50


def test_truncnorm_returns_the_upper_bound_at_large_tau():
    sampler = TruncatedNormalTimesteps(rng=np.random.default_rng(0))
    assert sampler(999) == 950 and sampler(974) == 950 and sampler(950) == 950


def test_truncnorm_is_reproducible_with_the_same_seed():
    a = TruncatedNormalTimesteps(rng=np.random.default_rng(42))
    b = TruncatedNormalTimesteps(rng=np.random.default_rng(42))
    assert [a(100) for _ in range(20)] == [b(100) for _ in range(20)]


def test_uniform_and_tau_matched_samplers():
    uniform = UniformTimesteps(rng=np.random.default_rng(1))
    draws = np.array([uniform(500) for _ in range(3000)])
    assert draws.min() >= 50 and draws.max() <= 950
    assert abs(draws.mean() - 500) < 15
    matched = TauMatchedTimesteps()
    assert matched(999) == 950 and matched(400) == 400 and matched(25) == 50


def test_factory_rejects_unknown_kind():
    with pytest.raises(ValueError):
        make_teacher_timestep_sampler("nope", np.random.default_rng(0))  # type: ignore[arg-type]


def test_learning_rate_schedule_matches_method():
    schedule = LearningRateSchedule.official(lr=1e-4, final_lr=5e-5, min_lr=1e-9, warmup_steps=200, distill_dt=25, k=50)
    assert schedule.decay_steps == 1800
    assert schedule(0) == pytest.approx(1e-9, rel=1e-9)
    # the official warm-up: α = s/(W − 1), the peak reached at step W − 1 = 199
    assert schedule(1) == pytest.approx(1e-9 + (1e-4 - 1e-9) / 199, rel=1e-9)
    assert schedule(100) == pytest.approx((1 - 100 / 199) * 1e-9 + 100 / 199 * 1e-4, rel=1e-9)
    assert schedule(199) == pytest.approx(1e-4, rel=1e-12)
    assert schedule(200) == pytest.approx(1e-4, rel=1e-12)
    # halfway through the cosine: the mean of the two ends
    assert schedule(200 + 900) == pytest.approx(7.5e-5, rel=1e-9)
    assert schedule(2000) == pytest.approx(5e-5, rel=1e-12)
    assert schedule(2149) == pytest.approx(5e-5, rel=1e-12)
    values = [schedule(s) for s in range(200, 2001)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert not math.isnan(sum(values))


def test_learning_rate_schedule_edge_cases_follow_the_official_lambda():
    # W = 4 (the loop fixture): 1e-9, then thirds of the way to the peak, the peak at step 3
    four = LearningRateSchedule.official(lr=1e-4, final_lr=5e-5, min_lr=1e-9, warmup_steps=4, distill_dt=400, k=3)
    assert four.decay_steps == 3
    assert [four(s) for s in range(4)] == pytest.approx([1e-9, 1e-9 + (1e-4 - 1e-9) / 3, 1e-9 + 2 * (1e-4 - 1e-9) / 3, 1e-4], rel=1e-12)
    assert [four(s) for s in (4, 5, 6, 7, 100)] == pytest.approx([1e-4, 8.75e-5, 6.25e-5, 5e-5, 5e-5], rel=1e-12)
    # W = 1: the peak at once; W = 0: no warm-up
    assert LearningRateSchedule(warmup_steps=1, decay_steps=10)(0) == 1e-4
    assert LearningRateSchedule(warmup_steps=0, decay_steps=10)(0) == 1e-4
    # a decay length ≤ 0: final_lr right after the warm-up
    none = LearningRateSchedule.official(lr=1e-4, final_lr=5e-5, min_lr=1e-9, warmup_steps=50, distill_dt=500, k=10)
    assert none.decay_steps == 0
    assert none(49) == pytest.approx(1e-4) and none(50) == 5e-5
