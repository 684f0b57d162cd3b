"""Kernel dispatch: the kernel set in force, chosen by :func:`use_kernels` only, is what the layers run.

Outside any context the layers run torch's ops; a context puts a set in force and gives the outer one
back on exit (errors included); graph captures ask for Triton without overriding a caller's choice;
``torch.compile`` always traces torch's ops.  Backends registered here (plain torch functions) show
which implementation a layer took, on the CPU, without Triton.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import run_program

from imix2mix.kernels.dispatch import (
    OPS,
    TORCH,
    TRITON,
    KernelSet,
    active_kernels,
    kernel_backends,
    kernel_set,
    register_kernel_backend,
    use_kernels,
)
from imix2mix.kernels.geglu import GegluLaunch, geglu_reference
from imix2mix.kernels.group_norm import group_norm_reference
from imix2mix.seva.attention import GEGLU
from imix2mix.seva.layers import GroupNorm32

SEEN_LAUNCHES: list[GegluLaunch] = []


@register_kernel_backend("geglu", "test_doubled", takes_launch=True)
def _doubled_geglu(h: torch.Tensor, *, launch: GegluLaunch) -> torch.Tensor:
    SEEN_LAUNCHES.append(launch)
    return 2 * geglu_reference(h)


@register_kernel_backend("group_norm", "test_never", supports=lambda *args, **kwargs: False)
def _never_group_norm(*args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    raise AssertionError("a backend that supports nothing must not run")


def test_outside_any_context_the_layers_run_torch() -> None:
    assert active_kernels() is TORCH
    assert all(getattr(TORCH, op) == "torch" for op in OPS)
    assert all(getattr(TRITON, op) == "triton" for op in OPS)


def test_use_kernels_nests_and_restores_on_exit_and_on_errors() -> None:
    doubled = TORCH.replace(geglu="test_doubled")
    with use_kernels("triton") as chosen:
        assert chosen is TRITON and active_kernels() is TRITON
        with use_kernels(doubled):
            assert active_kernels() is doubled
        assert active_kernels() is TRITON  # leaving an inner context gives the outer one back
    assert active_kernels() is TORCH
    with pytest.raises(RuntimeError, match="capture failed"):
        with use_kernels(doubled):
            raise RuntimeError("capture failed")
    assert active_kernels() is TORCH


def test_graph_captures_keep_a_set_the_caller_chose() -> None:
    # what the student's and the teacher's graph captures open: Triton, unless chosen outside
    with use_kernels("triton", unless_chosen=True):
        assert active_kernels() is TRITON
    with use_kernels("torch"):
        with use_kernels("triton", unless_chosen=True):
            assert active_kernels() is TORCH
    assert active_kernels() is TORCH


def test_layers_run_the_backend_of_the_set_in_force_with_its_launch() -> None:
    torch.manual_seed(0)
    layer = GEGLU(8, 6)
    x = torch.randn(3, 8)
    plain = layer(x)
    launch = GegluLaunch(block_f=16, tile=64)
    SEEN_LAUNCHES.clear()
    with use_kernels(TORCH.replace(geglu="test_doubled", geglu_launch=launch)):
        doubled = layer(x)
    torch.testing.assert_close(doubled, 2 * plain, rtol=0, atol=0)
    assert SEEN_LAUNCHES == [launch]
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)


def test_a_backend_that_cannot_take_the_inputs_falls_back_to_torch() -> None:
    norm = GroupNorm32(4, 8)
    x = torch.randn(2, 8, 3, 3)
    with use_kernels(TORCH.replace(group_norm="test_never")):
        out = norm(x, silu=True)
    torch.testing.assert_close(out, group_norm_reference(x, norm.weight, norm.bias, 4, norm.eps, silu=True), rtol=0, atol=0)
    # on the CPU without the interpreter, the Triton set computes torch's results, bit for bit
    with use_kernels("triton"):
        torch.testing.assert_close(norm(x, silu=True), out, rtol=0, atol=0)


def test_torch_compile_traces_torchs_ops_whatever_is_in_force() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + (0.0 if active_kernels() is TORCH else 1.0), backend="eager", fullgraph=True)
    with use_kernels("triton"):
        assert active_kernels() is TRITON
        assert float(compiled(torch.zeros(1))) == 0.0


def test_bad_choices_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown kernel set 'fast'; known: torch, triton"):
        with use_kernels("fast"):
            pass
    with pytest.raises(ValueError, match="geglu has no backend 'cuda'"):
        KernelSet(geglu="cuda")
    with pytest.raises(ValueError, match="geglu_launch must be a GegluLaunch"):
        TORCH.replace(geglu_launch=object())
    with pytest.raises(ValueError, match="unknown kernel op 'softmax'"):
        register_kernel_backend("softmax", "torch")
    assert kernel_set(TRITON) is TRITON and kernel_set("torch") is TORCH
    assert {"torch", "triton"} <= set(kernel_backends("short_attention"))
    with pytest.raises(AttributeError):
        TRITON.geglu = "torch"  # frozen: a set is changed by deriving a new one


def test_kernel_modules_and_layers_work_without_triton(tmp_path) -> None:
    out = run_program("no_triton", folder=tmp_path)
    assert out == {
        "available": dict.fromkeys(("group_norm", "layer_norm", "linear", "geglu", "short_attention", "adamw"), False),
        "raises": {"group_norm": "RuntimeError", "layer_norm": "RuntimeError", "geglu": "ValueError"},
        "layer_falls_back": True,
        "library_imports_prefect_or_ray": False,
        "cpu_without_interpreter_available": False,
    }
