"""AdamWWithComputeCopies (fp32 master weights, bf16 copies written by one Triton pass, the clip
folded in) against torch's AdamW after ``clip_grad_norm_``, as autocast runs them: the reference's
gradients are the bf16 gradients widened to fp32.

The kernels run under Triton's interpreter in a child process (:mod:`kernel_programs.adamw`); it
saves both optimizers' states, and the comparisons live here.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import run_program, ulp_distance

import dataclasses

from imix2mix.accel import ExecutionPlan, LoopNeeds, execute
from imix2mix.config import EditConfig
from imix2mix.optim import matrix_parameters
from imix2mix.kernels.adamw import ChunkPlan, fused_adamw_available
from imix2mix.presets import build_editor

@pytest.fixture(scope="module")
def tiny_editor():
    return build_editor("tiny", device="cpu")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_program("adamw", folder=tmp_path_factory.mktemp("optim"))


@pytest.fixture(scope="module")
def bf16_results(tmp_path_factory):
    return run_program("adamw", "bf16", folder=tmp_path_factory.mktemp("optim_bf16"))


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    """bf16 moments and split masters: the 24gb memory profile's optimizer."""
    return run_program("adamw", "bf16", "split", folder=tmp_path_factory.mktemp("optim_split"))


def test_copied_parameters_compute_in_bf16_with_their_layout(results):
    assert results["dtypes"] == ["torch.bfloat16", "torch.float32", "torch.bfloat16", "torch.bfloat16", "torch.float32"]
    assert results["strides"][2] == (72, 1, 24, 8)  # channels-last kept by the copy
    assert results["master_strides"] == results["strides"]


def test_update_and_clip_match_torch_adamw(results):
    for number, step in enumerate(results["steps"]):
        expected, got = step["norm"]
        assert got == pytest.approx(expected, rel=1e-6), f"step {number}: gradient norm"
        for tensor, (master, reference) in enumerate(zip(step["masters"], step["reference"])):
            # Over four steps the two differ by a few fp32 ulps of the norm's summation order.
            scale = reference.abs().max()
            assert (master - reference).abs().max() <= 2e-6 * scale, f"step {number}, tensor {tensor}"
        for tensor, (m_reference, m_ours) in enumerate(step["exp_avg"]):
            assert torch.allclose(m_ours, m_reference, rtol=1e-5, atol=1e-6), f"step {number}, exp_avg {tensor}"


def test_copies_are_the_masters_rounded(results):
    for step in results["steps"]:
        for master, copy in zip(step["masters"], step["copies"]):
            if copy.dtype == torch.bfloat16:
                assert torch.equal(copy, master.to(torch.bfloat16))
            else:
                assert torch.equal(copy, master)  # uncopied: the parameter is the master


def test_parameters_without_gradient_are_skipped(results):
    before, during = results["steps"][1]["masters"][0], results["steps"][2]["masters"][0]
    assert torch.equal(before, during)
    assert results["step_counts"] == [3, 4, 4, 4, 4]
    # Four kinds (group × copied); then tensor 2 alone in step 2, and tensor 0 alone in step 3.
    assert results["plans"] == 6
    # Chunks of 256 elements (the launch given to the optimizer): 3 + 5, 1, 5, 2, then 5 and 3.
    assert results["chunks"] == 24


def test_release_gives_back_the_fp32_masters(results):
    assert all(results["released_same_tensors"])
    assert "after release" in results["after_release"]


def test_plan_rejects_mismatched_layouts():
    grad = torch.zeros(4, 6, dtype=torch.bfloat16)
    states = [torch.zeros(4, 6) for _ in range(3)]
    with pytest.raises(ValueError, match="tensor 0 of shape \\(6, 4\\): shapes, strides"):
        ChunkPlan.build([grad.t()], *[[s] for s in states], None)
    with pytest.raises(ValueError, match="master weights must be fp32"):
        ChunkPlan.build([grad], [states[0].double()], [states[1]], [states[2]], None)
    with pytest.raises(ValueError, match="moments' dtypes differ"):
        ChunkPlan.build([grad], [states[0]], [states[1].bfloat16()], [states[2]], None)
    with pytest.raises(ValueError, match="moments must be fp32 or bf16"):
        ChunkPlan.build([grad], [states[0]], [states[1].half()], [states[2].half()], None)
    residual = torch.zeros(4, 6, dtype=torch.int16)
    with pytest.raises(ValueError, match="split masters' residuals need bf16 copies"):
        ChunkPlan.build([grad], [residual], [states[1]], [states[2]], None)
    with pytest.raises(ValueError, match="fp32, or all int16 residuals"):
        ChunkPlan.build([grad, grad], [residual, states[0]], [states[1]] * 2, [states[2]] * 2, [grad, grad])


def test_weight_copies_cover_matrix_layers_only(tiny_editor):
    student = tiny_editor.student.network
    chosen = {id(p) for p in matrix_parameters(student)}
    names = {name for name, p in student.named_parameters() if id(p) in chosen}
    assert names and all(name.endswith((".weight", ".bias")) for name in names)
    norms = [m for m in student.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and not any(id(p) in chosen for m in norms for p in m.parameters())
    linears = [m for m in student.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert all(id(m.weight) in chosen for m in linears)
    # Copies only where they change nothing but speed: CUDA, bf16 autocast, the fused AdamW.
    def copies(overrides: dict, device: str = "cuda") -> bool:
        config = EditConfig().overridden(overrides)
        return ExecutionPlan.resolve(config, torch.device(device), LoopNeeds(trains_student=True)).weight_copies

    assert not copies({}, "cpu")
    assert not copies({"optimizer": "adamw"})
    assert copies({"optimizer": "adamw_bf16_states"}) == fused_adamw_available(torch.device("cuda"))
    assert not copies({"bf16_weight_copies": False})
    assert not copies({"student_precision": "fp32"})


def test_a_failed_run_gives_the_student_its_fp32_weights_back(tiny_editor):
    """Weight copies put bf16 tensors into the student's parameters for one run; when the run fails,
    leaving the execution context must still give back the fp32 weights, unrounded."""
    network = tiny_editor.student.network
    parameter = matrix_parameters(network)[0]
    before = parameter.detach().clone()
    plan = dataclasses.replace(ExecutionPlan.eager("cpu"), weight_copies=True)
    with pytest.raises(RuntimeError, match="the run failed"):
        with execute(plan, network, None) as execution:
            execution.optimizer(list(network.parameters()), EditConfig())
            assert parameter.dtype == torch.bfloat16
            raise RuntimeError("the run failed")
    assert parameter.dtype == torch.float32
    assert torch.equal(parameter.detach(), before)


@pytest.mark.parametrize("bad", [{"lr": -1e-4}, {"eps": -1.0}, {"weight_decay": -0.1}, {"betas": (0.9, 1.0)}])
def test_both_adamw_variants_reject_invalid_hyper_parameters(bad):
    from imix2mix.optim import AdamWLowPrecisionStates, AdamWWithComputeCopies

    for optimizer in (AdamWLowPrecisionStates, AdamWWithComputeCopies):
        with pytest.raises(ValueError, match="invalid AdamW hyper-parameters"):
            optimizer([torch.nn.Parameter(torch.zeros(4))], **bad)


def test_the_optimizer_takes_the_plans_adamw_launch(tiny_editor):
    from imix2mix.kernels.adamw import AdamWLaunch
    from imix2mix.kernels.dispatch import TORCH

    network = tiny_editor.student.network
    launch = AdamWLaunch(chunk=256, block=64)
    plan = dataclasses.replace(ExecutionPlan.eager("cpu"), weight_copies=True, student_kernels=TORCH.replace(adamw_launch=launch))
    with execute(plan, network, None) as execution:
        optimizer = execution.optimizer(list(network.parameters()), EditConfig())
        assert optimizer.launch == launch


def test_bf16_moments_are_stored_stochastically_rounded(bf16_results):
    """The first step starts from zero moments, so the kernel's fp32 moments are torch's AdamW's up to
    the clip coefficient's last ulp: the stored bf16 moments are those rounded stochastically with the
    torch reference's random bits (tensor number = position among the parameters), bit for bit but
    where that last ulp crosses a rounding threshold."""
    from imix2mix.kernels.adamw import moment_seed, stochastic_round_bf16

    first = bf16_results["steps"][0]
    for moment, name in enumerate(("exp_avg", "exp_avg_sq")):
        nearest_differs = 0
        for tensor, (reference, ours) in enumerate(first[name]):
            assert ours.dtype == torch.bfloat16 and ours.stride() == reference.stride(), f"{name} {tensor}"
            expected = stochastic_round_bf16(reference, moment_seed(1, tensor, moment))
            ulps = ulp_distance(ours, expected)
            assert int(ulps.max()) <= 1, f"{name} {tensor}"
            assert float((ulps == 0).float().mean()) > 0.99, f"{name} {tensor}"
            nearest_differs += int((ours != reference.to(torch.bfloat16)).sum())
        assert nearest_differs > 0.1 * sum(r.numel() for r, _ in first[name])  # not round-to-nearest


def test_bf16_moments_keep_the_update_close_to_torch_adamw(bf16_results, results):
    """Over four steps the bf16 moments' rounding moves the weights by a small fraction of the
    update (the same bound as AdamWLowPrecisionStates' test); fp32 moments stay at the ulp level."""
    start = bf16_results["steps"][0]["reference"]  # after one step; compare the later updates
    for number in (1, 3):
        ours, fp32 = bf16_results["steps"][number], results["steps"][number]
        for tensor, (master, reference, before) in enumerate(zip(ours["masters"], ours["reference"], start)):
            update = (reference - before).norm()
            assert update > 0
            assert (master - reference).norm() / update < 0.02, f"step {number}, tensor {tensor}"
            assert not torch.equal(master, fp32["masters"][tensor]), "bf16 moments change the numbers"
    assert bf16_results["step_counts"] == results["step_counts"]


def test_split_masters_are_the_fp32_masters_bit_for_bit(split_results, bf16_results):
    """Keeping each master as its bf16 copy plus an int16 residual changes no number: every master,
    copy and moment equals the fp32-master run's at every step."""
    for number, (split, fp32) in enumerate(zip(split_results["steps"], bf16_results["steps"])):
        for name in ("masters", "copies"):
            for tensor, (a, b) in enumerate(zip(split[name], fp32[name])):
                assert a.dtype == b.dtype and torch.equal(a, b), f"step {number}, {name} {tensor}"
        for name in ("exp_avg", "exp_avg_sq"):
            for tensor, ((_, a), (_, b)) in enumerate(zip(split[name], fp32[name])):
                assert torch.equal(a, b), f"step {number}, {name} {tensor}"
    assert split_results["step_counts"] == bf16_results["step_counts"]


def test_split_masters_keep_two_bytes_per_copied_parameter(split_results):
    copied = [dtype == "torch.bfloat16" for dtype in split_results["dtypes"]]
    for tensor, is_copied in enumerate(copied):
        master, copy = split_results["state"]["master"][tensor], split_results["state"]["copy"][tensor]
        if is_copied:  # the residual, and the copy that is the parameter itself: no fp32 tensor
            assert master == ("torch.int16", False) and copy == ("torch.bfloat16", True), tensor
        else:
            assert master == ("torch.float32", True) and copy is None, tensor


def test_release_joins_split_masters_after_freeing_their_moments(split_results):
    assert all(split_results["released_values"])  # fp32 parameters holding the joined masters
    for tensor, dtype in enumerate(split_results["dtypes"]):
        expected = [] if dtype == "torch.bfloat16" else ["exp_avg", "exp_avg_sq"]
        assert split_results["moments_after_release"][tensor] == expected, tensor


def test_split_and_join_give_back_every_fp32_value():
    from imix2mix.kernels.adamw import RESIDUAL_MAX, join_fp32, split_fp32

    generator = torch.Generator().manual_seed(3)
    values = torch.randn(50_000, generator=generator) * torch.logspace(-40, 38, 50_000)
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.0e38, -3.0e38, float("inf"), -float("inf")])])
    copy, residual = split_fp32(values)
    assert copy.dtype == torch.bfloat16 and residual.dtype == torch.int16
    assert torch.equal(copy, values.to(torch.bfloat16))  # the copy is autocast's rounding
    assert torch.equal(join_fp32(copy, residual).view(torch.int32), values.view(torch.int32))
    # Exact ties: rounding to even goes up for one, down for the other; the one rounding down would
    # need a residual of 2^15 and keeps one fp32 ulp less (which still rounds to the same copy).
    up, down = torch.tensor([1.0 + 3 * 2**-8]), torch.tensor([1.0 + 2**-8])  # halfway; odd, even below
    for tie, ulps in ((up, 0), (down, 1)):
        copy, residual = split_fp32(tie)
        assert torch.equal(copy, tie.to(torch.bfloat16))
        joined = join_fp32(copy, residual)
        assert int(tie.view(torch.int32) - joined.view(torch.int32)) == ulps
        assert torch.equal(joined.to(torch.bfloat16), copy)
    assert int(split_fp32(down)[1]) == RESIDUAL_MAX
    # A channels-last 1×1 convolution weight: any stride of a size-1 dim is dense, and subtraction
    # picks other strides than the weight's; the plan needs the residual laid out as the weight.
    weight = torch.nn.Conv2d(6, 640, 1).to(memory_format=torch.channels_last).weight.detach()
    copy, residual = split_fp32(weight)
    assert weight.stride() == copy.stride() == residual.stride() == join_fp32(copy, residual).stride() == (6, 1, 6, 6)


def test_split_masters_only_with_weight_copies():
    def split(overrides: dict, device: str = "cuda") -> bool:
        config = EditConfig().overridden({"split_master_weights": True, **overrides})
        return ExecutionPlan.resolve(config, torch.device(device), LoopNeeds(trains_student=True)).split_masters

    assert not split({}, "cpu")
    assert not split({"bf16_weight_copies": False})
    assert split({}) == fused_adamw_available(torch.device("cuda"))
