"""The speed and memory options compute what the plain iteration computes (or, for the lean mode's
bf16 optimizer states, what they are documented to change)."""

from __future__ import annotations

import pytest
import torch
from conftest import SCENES

from imix2mix.edits import Edit
from imix2mix.optim import AdamWLowPrecisionStates
from imix2mix.presets import build_editor, default_config
from imix2mix.scene import load_scene


def _params_and_grads(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48,), (3, 5, 7, 7), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(6)]
    return params, grads


def _run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def test_low_precision_adamw_with_fp32_states_is_torch_adamw():
    reference, grads = _params_and_grads()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    settings = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    _run(torch.optim.AdamW(reference, **settings), reference, grads)
    # A tiny chunk size makes every chunk boundary case happen.
    _run(AdamWLowPrecisionStates(ours, state_dtype=torch.float32, chunk_numel=100, **settings), ours, grads)
    for a, b in zip(reference, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_low_precision_adamw_keeps_bf16_moments_close_to_adamw():
    reference, grads = _params_and_grads(1)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    start = [p.detach().clone() for p in reference]
    settings = dict(lr=1e-2, weight_decay=0.01)
    _run(torch.optim.AdamW(reference, **settings), reference, grads)
    optimizer = AdamWLowPrecisionStates(ours, **settings)
    _run(optimizer, ours, grads)
    assert all(state["exp_avg"].dtype == torch.bfloat16 for state in optimizer.state.values())
    for a, b, s in zip(reference, ours, start):
        update = (a - s).norm()
        assert update > 0
        assert (b - a).norm() / update < 0.02  # bf16 moments: ~3 significant digits


@pytest.mark.parametrize("gradient", ["zero", "small"])
def test_bf16_second_moments_decay_as_fp32_ones_do(gradient):
    """β₂ = 0.999 changes exp_avg_sq by 0.1 % a step, under half a bf16 ulp: rounded to nearest it
    would stay frozen (after one large gradient, at its first value; under small gradients, never
    decaying to them).  Stochastic rounding keeps it on fp32 AdamW's course on average."""
    steps, numel = 300, 4096
    ours, reference = torch.nn.Parameter(torch.zeros(numel)), torch.nn.Parameter(torch.zeros(numel))
    settings = dict(lr=1e-3, weight_decay=0.0)
    optimizer, fp32 = AdamWLowPrecisionStates([ours], **settings), torch.optim.AdamW([reference], **settings)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        g = torch.ones(numel) if step == 0 else torch.randn(numel, generator=generator) * (0.0 if gradient == "zero" else 0.01)
        ours.grad, reference.grad = g.clone(), g.clone()
        optimizer.step()
        fp32.step()
    v, v_fp32 = optimizer.state[ours]["exp_avg_sq"].float(), fp32.state[reference]["exp_avg_sq"]
    nearest = v_fp32.new_full((), 1e-3).to(torch.bfloat16).float()  # where round-to-nearest stays
    assert float(v_fp32.mean()) < 0.8 * float(nearest)  # the fp32 moment did decay
    assert abs(float(v.mean()) / float(v_fp32.mean()) - 1) < 0.01


@pytest.fixture(scope="module")
def editor():
    return build_editor("tiny", metrics=False)


def _two_steps(editor, overrides: dict) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    config = default_config("tiny").overridden({"reference_index": 1, "teacher_steps": 2, **overrides})
    with editor.prepare_distillation(load_scene(SCENES / "face"), Edit("make it snowy"), config) as distillation:
        losses = [distillation.step().loss.clone() for _ in range(2)]
    grads = {name: p.grad.detach().clone() for name, p in editor.student.network.named_parameters() if p.grad is not None}
    weights = {name: p.detach().clone() for name, p in editor.student.network.named_parameters()}
    return losses, grads, weights


def test_fused_iteration_equals_the_plain_one(editor):
    """The default optimizer (fused AdamW) against plain for-loop AdamW, both eager.

    torch.compile (``compile=true``) is not compared here: compiling even the tiny student takes over
    seven minutes on a 2-core CPU; its effect was measured on the GPU (docs/benchmarks.md)."""
    plain = _two_steps(editor, {"optimizer": "adamw"})
    fused = _two_steps(editor, {"optimizer": "adamw_fused"})
    for a, b in zip(plain[0], fused[0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    pristine = editor.student.pristine
    assert fused[1].keys() == plain[1].keys()
    for name in plain[2]:
        if name in plain[1]:
            torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-8, msg=name)
        # Compare the updates, not the weights: AdamW's step is ~lr whatever the gradient's size.
        plain_update, fused_update = plain[2][name] - pristine[name], fused[2][name] - pristine[name]
        torch.testing.assert_close(fused_update, plain_update, rtol=1e-3, atol=1e-3 * float(plain_update.abs().max()), msg=name)
    # The comparison has teeth: the two steps changed the weights.
    assert any(not torch.equal(plain[2][name], pristine[name]) for name in plain[2])


def test_euler_step_of_a_compiled_run_stays_eager(editor):
    """The 40 no-grad Euler steps per scene run eagerly: dynamo sees no frame, so nothing compiles.
    (``compile=true`` wraps the student in place and compiles at its first call, which this test never
    makes: compiling even the tiny student takes minutes here.)"""
    from torch._dynamo.utils import counters

    config = default_config("tiny").overridden({"compile": True, "reference_index": 1, "teacher_steps": 2})
    with editor.prepare_distillation(load_scene(SCENES / "face"), Edit("make it snowy"), config) as distillation:
        assert editor.student.network._compiled_call_impl is not None
        assert editor.teacher.noise_unet._orig_mod is editor.teacher.unet
        before = distillation.latents.clone()
        frames = counters["frames"]["total"]
        assert distillation.advance()
        assert counters["frames"]["total"] == frames
        assert not torch.equal(distillation.latents, before)
    assert editor.student.network._compiled_call_impl is None
