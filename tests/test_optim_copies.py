"""AdamWWithComputeCopies (fp32 master weights, bf16 copies written by one Triton pass, the clip
folded in) against torch's AdamW after ``clip_grad_norm_``, as autocast runs them: the reference's
gradients are the bf16 gradients widened to fp32.

The kernels run under Triton's interpreter in a child process (see tests/test_kernels_layer_norm.py
for why); it saves both optimizers' states, and the comparisons live here.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import run_interpreted

import dataclasses

from imix2mix.accel import ExecutionPlan, LoopNeeds, execute
from imix2mix.config import EditConfig
from imix2mix.optim import matrix_parameters
from imix2mix.kernels.adamw import ChunkPlan
from imix2mix.presets import build_editor

_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import imix2mix.kernels.adamw as ka
    from imix2mix.optim import AdamWWithComputeCopies

    out_path = sys.argv[1]
    # Small chunks: tensors of a few hundred elements have full chunks and a ragged last one.
    ka.CHUNK, ka.BLOCK = 256, 64
    torch.manual_seed(0)
    # (shape, bf16 copy?, group): a 4-D weight in channels-last, ragged sizes, one tensor under a chunk.
    specs = [((700,), True, 0), ((3, 5), False, 0), ((16, 8, 3, 3), True, 0), ((40, 31), True, 1), ((300,), False, 1)]
    reference = [torch.nn.Parameter(torch.randn(shape)) for shape, _, _ in specs]
    reference[2].data = reference[2].data.contiguous(memory_format=torch.channels_last)
    ours = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in reference]
    # A master that is a view at an odd offset: the optimizer must take a dense, aligned copy.
    storage = torch.randn(1 + 40 * 31)
    ours[3].data = storage[1:].view(40, 31)
    reference[3].data = ours[3].detach().clone()

    def groups(params):
        return [
            {"params": [p for p, (_, _, g) in zip(params, specs) if g == 0]},
            {"params": [p for p, (_, _, g) in zip(params, specs) if g == 1], "lr": 3e-2, "weight_decay": 0.0},
        ]

    hyper = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    torch_adamw = torch.optim.AdamW(groups(reference), **hyper)
    optimizer = AdamWWithComputeCopies(
        groups(ours), **hyper, compute_copies=[p for p, (_, copy, _) in zip(ours, specs) if copy]
    )
    results = {"dtypes": [str(p.dtype) for p in ours], "strides": [p.stride() for p in ours],
               "master_strides": [optimizer.master(p).stride() for p in ours], "steps": []}
    for step in range(4):
        grads = [(torch.randn(shape) * 10).to(torch.bfloat16) for shape, _, _ in specs]
        # A parameter without a gradient in one step is untouched, and its step count falls behind
        # its kind's: the next step splits that kind in two launches.
        skipped = 0 if step == 2 else None
        for number, (r, o, g) in enumerate(zip(reference, ours, grads)):
            if number == skipped:
                r.grad = o.grad = None
                continue
            r.grad = g.float().contiguous(memory_format=torch.preserve_format)
            if r.dim() == 4:
                r.grad = r.grad.contiguous(memory_format=torch.channels_last)
            # ours get the bf16 gradient (copied) or its fp32 widening, NCHW: a layout to fix up
            o.grad = g if o.dtype == torch.bfloat16 else g.float()
        max_norm = 0.5 if step != 3 else 1e9  # the last step unclipped
        norm_reference = torch.nn.utils.clip_grad_norm_(reference, max_norm)
        torch_adamw.step()
        norm = optimizer.clip_and_step(max_norm)
        results["steps"].append({
            "norm": (float(norm_reference), float(norm)),
            "masters": [optimizer.master(p).clone() for p in ours],
            "copies": [p.detach().clone() for p in ours],
            "reference": [p.detach().clone() for p in reference],
            "exp_avg": [(torch_adamw.state[r]["exp_avg"].clone(), optimizer.state[o]["exp_avg"].clone())
                        for r, o in zip(reference, ours) if torch_adamw.state[r]],
        })
    results["plans"] = len(optimizer._plans)
    results["step_counts"] = [optimizer.state[p]["step"] for p in ours]
    masters = [optimizer.master(p) for p in ours]
    optimizer.release()
    results["released_same_tensors"] = [p.data.data_ptr() == m.data_ptr() and p.dtype == torch.float32 for p, m in zip(ours, masters)]
    try:
        optimizer.clip_and_step(0.5)
        results["after_release"] = "stepped"
    except RuntimeError as error:
        results["after_release"] = str(error)
    torch.save(results, out_path)
    """
)


@pytest.fixture(scope="module")
def tiny_editor():
    return build_editor("tiny", device="cpu")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_interpreted(_CHILD, folder=tmp_path_factory.mktemp("optim"))


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


def test_release_gives_back_the_fp32_masters(results):
    assert all(results["released_same_tensors"])
    assert "after release" in results["after_release"]


def test_plan_rejects_mismatched_layouts():
    grad = torch.zeros(4, 6, dtype=torch.bfloat16)
    states = [torch.zeros(4, 6) for _ in range(3)]
    with pytest.raises(ValueError, match="tensor 0 of shape \\(6, 4\\): shapes, strides"):
        ChunkPlan.build([grad.t()], *[[s] for s in states], None)
    with pytest.raises(ValueError, match="master weights and moments must be fp32"):
        ChunkPlan.build([grad], [states[0].double()], [states[1]], [states[2]], None)


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
