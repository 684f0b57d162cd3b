"""Kernel dispatch: each layer runs its fused ops through the kernel set installed on it, torch's
ops unless one was installed.

Installing a set reaches every kernel-using layer of a module and its undo gives each layer its
previous set back (errors included); ``torch.compile`` always traces torch's ops.  Backends
registered here (plain torch functions) show which implementation a layer took, on the CPU, without
Triton.  Which set a run installs is the execution plan's decision (tests/test_accel.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import run_program

from imix2mix.config import KERNEL_OPS
from imix2mix.kernels.dispatch import (
    OPS,
    TORCH,
    TRITON,
    KernelSet,
    UsesKernels,
    install_kernels,
    installed_kernels,
    kernel_backends,
    kernel_set,
    kernels_installed,
    register_kernel_backend,
)
from imix2mix.kernels.geglu import GegluLaunch, geglu_reference
from imix2mix.kernels.group_norm import group_norm_reference
from imix2mix.seva import Seva, SevaConfig
from imix2mix.seva.attention import GEGLU, FeedForward
from imix2mix.seva.layers import GroupNorm32

SEEN_LAUNCHES: list[GegluLaunch] = []


@register_kernel_backend("geglu", "test_doubled", takes_launch=True)
def _doubled_geglu(h: torch.Tensor, *, launch: GegluLaunch) -> torch.Tensor:
    SEEN_LAUNCHES.append(launch)
    return 2 * geglu_reference(h)


@register_kernel_backend("group_norm", "test_never", supports=lambda *args, **kwargs: False)
def _never_group_norm(*args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    raise AssertionError("a backend that supports nothing must not run")


DOUBLED = TORCH.replace(geglu="test_doubled")


def test_layers_run_torch_unless_a_set_is_installed() -> None:
    assert OPS == KERNEL_OPS  # the config's torch-free copy
    assert all(getattr(TORCH, op) == "torch" for op in OPS)
    assert all(getattr(TRITON, op) == "triton" for op in OPS)
    network = Seva(SevaConfig.tiny())
    layers = [m for m in network.modules() if isinstance(m, UsesKernels)]
    kinds = {type(m).__name__ for m in layers}
    assert {"GroupNorm32", "LayerNorm32", "Linear", "GEGLU", "Attention"} <= kinds, kinds
    assert installed_kernels(network) == {TORCH}


def test_install_reaches_every_layer_and_its_undo_gives_back_the_previous_sets() -> None:
    ff = FeedForward(8)
    inner_geglu = ff.net[0]
    undo_outer = install_kernels(inner_geglu, "triton")  # one layer had a set of its own
    assert installed_kernels(ff) == {TRITON, TORCH}
    undo = install_kernels(ff, DOUBLED)
    assert installed_kernels(ff) == {DOUBLED}
    undo()
    assert inner_geglu.kernels is TRITON and ff.net[2].kernels is TORCH
    undo_outer()
    assert installed_kernels(ff) == {TORCH}
    assert "kernels" not in vars(inner_geglu)  # back to the class's default, not a copy of it
    with pytest.raises(RuntimeError, match="capture failed"):
        with kernels_installed(ff, DOUBLED) as chosen:
            assert chosen is DOUBLED and installed_kernels(ff) == {DOUBLED}
            raise RuntimeError("capture failed")
    assert installed_kernels(ff) == {TORCH}


def test_layers_run_the_backend_of_their_set_with_its_launch() -> None:
    torch.manual_seed(0)
    layer = GEGLU(8, 6)
    x = torch.randn(3, 8)
    plain = layer(x)
    launch = GegluLaunch(block_f=16, tile=64)
    SEEN_LAUNCHES.clear()
    with kernels_installed(layer, DOUBLED.replace(geglu_launch=launch)):
        doubled = layer(x)
    torch.testing.assert_close(doubled, 2 * plain, rtol=0, atol=0)
    assert SEEN_LAUNCHES == [launch]
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)
    # another layer, not installed, is untouched
    other = GEGLU(8, 6)
    with kernels_installed(layer, DOUBLED):
        assert other.kernels is TORCH


def test_a_backend_that_cannot_take_the_inputs_falls_back_to_torch() -> None:
    norm = GroupNorm32(4, 8)
    x = torch.randn(2, 8, 3, 3)
    with kernels_installed(norm, TORCH.replace(group_norm="test_never")):
        out = norm(x, silu=True)
    torch.testing.assert_close(out, group_norm_reference(x, norm.weight, norm.bias, 4, norm.eps, silu=True), rtol=0, atol=0)
    # on the CPU without the interpreter, the Triton set computes torch's results, bit for bit
    with kernels_installed(norm, "triton"):
        torch.testing.assert_close(norm(x, silu=True), out, rtol=0, atol=0)


def test_torch_compile_traces_torchs_ops_whatever_is_installed() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = GEGLU(8, 6)
    x = torch.randn(3, 8)
    plain = layer(x)
    with kernels_installed(layer, DOUBLED):
        SEEN_LAUNCHES.clear()
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), plain, rtol=0, atol=0)
        assert SEEN_LAUNCHES == []
        torch.testing.assert_close(layer(x), 2 * plain, rtol=0, atol=0)  # eagerly: the installed set


def test_bad_choices_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown kernel set 'fast'; known: torch, triton"):
        install_kernels(GEGLU(4, 4), "fast")
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
