"""Which implementation each fused op of the models runs: a registry of kernel backends, kernel sets
that pick one backend (and its launch sizes) per op, and their installation on a model.

A layer that has fused ops (``GroupNorm32``, ``LayerNorm32``, ``Linear``, ``GEGLU``, SEVA's
``Attention``) is a :class:`UsesKernels`: it runs each op through its own ``kernels`` attribute
(:meth:`KernelSet.run`), :data:`TORCH` (torch's ops) unless a set was installed on it.  Nothing reads
a global: whoever runs a model installs the set it wants on that model (:func:`install_kernels`,
:func:`kernels_installed`) and removes it afterwards.  In a run that is :func:`imix2mix.accel.execute`,
with the sets the :class:`~imix2mix.accel.ExecutionPlan` chose; benchmarks and tests install theirs.

A backend's ``supports`` check decides per call whether it can take these inputs (layout, dtype,
device, Triton present); where it cannot, and whenever ``torch.compile`` traces (inductor fuses
torch's ops itself and cannot trace a Triton launch of ours), the op's ``torch`` backend runs, which
every op has.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from imix2mix.kernels.adamw import AdamWLaunch
from imix2mix.kernels.geglu import GegluLaunch, fused_geglu_available, geglu, geglu_reference
from imix2mix.kernels.group_norm import (
    GroupNormLaunch,
    fused_group_norm_available,
    group_norm_nhwc,
    group_norm_reference,
)
from imix2mix.kernels.layer_norm import LayerNormLaunch, fused_layer_norm_available, layer_norm_rows
from imix2mix.kernels.linear import ColumnSumLaunch, fused_bias_grad_available
from imix2mix.kernels.linear import linear as bias_grad_linear
from imix2mix.kernels.short_attention import (
    ShortAttentionLaunch,
    short_attention,
    short_attention_available,
    short_attention_reference,
)

# The ops and the call each backend of an op implements (the layers' semantics, see the torch ones):
#   group_norm(x, weight, bias, num_groups, eps, silu=False, shift=None)  GroupNorm32 (+ SiLU, + shift)
#   layer_norm(x, normalized_shape, weight, bias, eps)  LayerNorm; under autocast it may return the
#       autocast dtype (every consumer is a Linear, which would round to it anyway)
#   linear(x, weight, bias)  F.linear, autocast's casts included
#   geglu(h)  value * gelu(gate) of h = [value | gate]
#   short_attention(q, k, v, heads)  self-attention of [B, L, heads * head_dim] projections
OPS = ("group_norm", "layer_norm", "linear", "geglu", "short_attention")
# Each op's launch settings (the field ``<op>_launch`` of a KernelSet).
LAUNCH_TYPES: dict[str, type] = {
    "group_norm": GroupNormLaunch,
    "layer_norm": LayerNormLaunch,
    "linear": ColumnSumLaunch,
    "geglu": GegluLaunch,
    "short_attention": ShortAttentionLaunch,
}


@dataclass(frozen=True)
class KernelBackend:
    """One implementation of an op.  ``fn`` takes the op's arguments, plus ``launch=`` (the kernel
    set's launch settings of that op) when ``takes_launch``; ``supports`` takes the op's arguments and
    says whether ``fn`` can run on them."""

    op: str
    name: str
    fn: Callable[..., Any]
    supports: Callable[..., bool]
    takes_launch: bool


_BACKENDS: dict[str, dict[str, KernelBackend]] = {op: {} for op in OPS}


def register_kernel_backend(
    op: str, name: str, *, supports: Callable[..., bool] | None = None, takes_launch: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as backend ``name`` of ``op`` (replacing one of that name)."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(OPS)}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        _BACKENDS[op][name] = KernelBackend(op, name, fn, supports or (lambda *args, **kwargs: True), takes_launch)
        return fn

    return decorator


def kernel_backends(op: str) -> list[str]:
    """The names of ``op``'s registered backends."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(OPS)}")
    return list(_BACKENDS[op])


@dataclass(frozen=True)
class KernelSet:
    """Which backend each op runs (a name registered with :func:`register_kernel_backend`) and the
    launch settings of each op's kernel (and of the fused AdamW).  Immutable: derive variants with
    :meth:`replace`."""

    group_norm: str = "torch"
    layer_norm: str = "torch"
    linear: str = "torch"
    geglu: str = "torch"
    short_attention: str = "torch"
    group_norm_launch: GroupNormLaunch = GroupNormLaunch()
    layer_norm_launch: LayerNormLaunch = LayerNormLaunch()
    linear_launch: ColumnSumLaunch = ColumnSumLaunch()
    geglu_launch: GegluLaunch = GegluLaunch()
    short_attention_launch: ShortAttentionLaunch = ShortAttentionLaunch()
    # The fused AdamW of the bf16 weight copies (imix2mix.optim.AdamWWithComputeCopies).
    adamw_launch: AdamWLaunch = AdamWLaunch()

    def __post_init__(self) -> None:
        for op in OPS:
            backend = getattr(self, op)
            if backend not in _BACKENDS[op]:
                raise ValueError(f"KernelSet: {op} has no backend {backend!r}; registered: {', '.join(_BACKENDS[op])}")
            launch = getattr(self, f"{op}_launch")
            if not isinstance(launch, LAUNCH_TYPES[op]):
                raise ValueError(f"KernelSet: {op}_launch must be a {LAUNCH_TYPES[op].__name__}, got {launch!r}")

    def replace(self, **changes: Any) -> KernelSet:
        """A copy with ``changes`` (backends by op name, launch settings by ``<op>_launch``)."""
        return dataclasses.replace(self, **changes)

    def backend(self, op: str) -> KernelBackend:
        """The backend chosen for ``op``."""
        return _BACKENDS[op][getattr(self, op)]

    def run(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """``op`` of these arguments through its chosen backend, or through its ``torch`` backend
        where the chosen one does not support them."""
        backend = self.backend(op)
        if backend.name != "torch" and (torch.compiler.is_compiling() or not backend.supports(*args, **kwargs)):
            backend = _BACKENDS[op]["torch"]
        if backend.takes_launch:
            return backend.fn(*args, launch=getattr(self, f"{op}_launch"), **kwargs)
        return backend.fn(*args, **kwargs)


# -- the built-in backends ------------------------------------------------------------------------

def _group_norm_triton_supports(x: torch.Tensor, weight, bias, num_groups: int, *args: Any, **kwargs: Any) -> bool:
    return fused_group_norm_available(x, num_groups)


register_kernel_backend("group_norm", "torch")(group_norm_reference)
register_kernel_backend("group_norm", "triton", supports=_group_norm_triton_supports, takes_launch=True)(
    group_norm_nhwc
)


@register_kernel_backend("layer_norm", "torch")
def _layer_norm_torch(x: torch.Tensor, normalized_shape: tuple[int, ...], weight, bias, eps: float) -> torch.Tensor:
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def _layer_norm_triton_supports(x: torch.Tensor, normalized_shape: tuple[int, ...], *args: Any) -> bool:
    # Only under autocast: there the fused kernel's low-precision output stands for torch's fp32
    # output and the consuming Linear's cast.
    return (
        tuple(normalized_shape) == (x.shape[-1],)
        and torch.is_autocast_enabled(x.device.type)
        and fused_layer_norm_available(x)
    )


@register_kernel_backend("layer_norm", "triton", supports=_layer_norm_triton_supports, takes_launch=True)
def _layer_norm_triton(x, normalized_shape, weight, bias, eps: float, *, launch: LayerNormLaunch) -> torch.Tensor:
    return layer_norm_rows(x, weight, bias, eps, torch.get_autocast_dtype(x.device.type), launch)


register_kernel_backend("linear", "torch")(F.linear)


@register_kernel_backend(
    "linear", "triton", supports=lambda x, weight, bias: fused_bias_grad_available(x, bias), takes_launch=True
)
def _linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, launch: ColumnSumLaunch
) -> torch.Tensor:
    # Autocast's casts by hand: the kernel's autograd function runs outside autocast.
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    with torch.autocast(device_type, enabled=False):
        return bias_grad_linear(x.to(dtype), weight.to(dtype), bias.to(dtype), launch)


register_kernel_backend("geglu", "torch")(geglu_reference)
register_kernel_backend("geglu", "triton", supports=fused_geglu_available, takes_launch=True)(geglu)
register_kernel_backend("short_attention", "torch")(short_attention_reference)
register_kernel_backend("short_attention", "triton", supports=short_attention_available, takes_launch=True)(
    short_attention
)

# -- named kernel sets ----------------------------------------------------------------------------

TORCH = KernelSet()
TRITON = KernelSet(**{op: "triton" for op in OPS})
KERNEL_SETS: dict[str, KernelSet] = {"torch": TORCH, "triton": TRITON}


def kernel_set(choice: KernelSet | str) -> KernelSet:
    """A kernel set given as itself or by name (:data:`KERNEL_SETS`)."""
    if isinstance(choice, KernelSet):
        return choice
    if choice not in KERNEL_SETS:
        raise ValueError(f"unknown kernel set {choice!r}; known: {', '.join(KERNEL_SETS)}")
    return KERNEL_SETS[choice]


class UsesKernels:
    """Mixin of the layers that run fused ops: ``self.kernels.run(op, ...)``.  The class attribute is
    :data:`TORCH`; :func:`install_kernels` sets an instance's own."""

    kernels: KernelSet = TORCH


_UNSET = object()


def install_kernels(module: torch.nn.Module, kernels: KernelSet | str) -> Callable[[], None]:
    """Put ``kernels`` (a set or its name) in force in every :class:`UsesKernels` layer of ``module``
    (itself included); returns the undo, which gives each layer back the set it had."""
    chosen = kernel_set(kernels)
    previous = [(m, m.__dict__.get("kernels", _UNSET)) for m in module.modules() if isinstance(m, UsesKernels)]
    for layer, _ in previous:
        layer.kernels = chosen

    def undo() -> None:
        for layer, old in previous:
            if old is _UNSET:
                layer.__dict__.pop("kernels", None)
            else:
                layer.kernels = old

    return undo


@contextlib.contextmanager
def kernels_installed(module: torch.nn.Module, kernels: KernelSet | str) -> Iterator[KernelSet]:
    """:func:`install_kernels` for the length of the block (undone also when it raises)."""
    undo = install_kernels(module, kernels)
    try:
        yield kernel_set(kernels)
    finally:
        undo()


def installed_kernels(module: torch.nn.Module) -> set[KernelSet]:
    """The kernel sets the :class:`UsesKernels` layers of ``module`` run now."""
    return {m.kernels for m in module.modules() if isinstance(m, UsesKernels)}
