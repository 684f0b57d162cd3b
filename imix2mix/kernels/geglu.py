"""Fused GEGLU gate, ``value * gelu(gate)`` of a projection ``h = [value | gate]``, in Triton, with backward.

Why this exists: torch runs the gate as separate kernels on strided halves of ``h`` (``chunk`` returns
views whose rows are 2F apart, so they take torch's slow non-vectorised elementwise path): GELU and
the product forward; in backward two products, GELU's backward and a ``cat`` of the two half
gradients.  The whole-iteration profile of the student put that chain at about 14 ms per iteration on
an H100.  Here the forward reads ``h`` once and writes the output once; the backward reads ``h`` and
the output's gradient once and writes ``dh`` once.  Autograd also keeps only ``h`` (torch's chain
keeps ``h`` and the GELU output).

Semantics are exactly those of :func:`geglu_reference` in ``h``'s dtype, each torch op's rounding
reproduced: ``g = round(gelu(gate))`` and ``out = round(value * g)`` forward (fp32 math inside each
op, as torch's half-precision kernels do); backward ``dvalue = round(dout * g)``, ``dg = round(dout *
value)``, ``dgate = round(dg * (cdf(gate) + gate * pdf(gate)))``.  GELU is the exact (erf) one.

Layout: ``h`` is viewed as a row-major ``[rows, 2F]`` matrix; a program handles a ``[BLOCK_ROWS,
BLOCK_F]`` tile of the ``[rows, F]`` output and the matching tiles of both halves.  No host
synchronisation and shapes fixed by the input: forward + backward can be captured in a CUDA graph.

Triton is optional and, on CPU, interpreted: see :mod:`imix2mix.kernels.triton_support`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imix2mix.kernels.triton_support import DTYPE_KIND as _DTYPE_KIND
from imix2mix.kernels.triton_support import HAS_TRITON as _HAS_TRITON
from imix2mix.kernels.triton_support import interpreter_on as _interpreter_on
from imix2mix.kernels.triton_support import tl, triton


@dataclass(frozen=True)
class GegluLaunch:
    """Tile sizes of the GEGLU kernels: 8 rows of 256 columns.  On an H100 at the 72² level
    (25920 × 2·1280, fwd + bwd, kernel time): 0.32 ms, against 0.37 with 512 × 8 and 0.41–0.47 with
    8192-element tiles at 8 warps; torch's ops 0.71 ms; the memory floor 0.18 ms."""

    # Output columns per tile (capped at F's next power of two); a power of two.
    block_f: int = 256
    # Elements per tile (rows = tile // columns); a power of two.
    tile: int = 2048
    num_warps: int = 4


DEFAULT_LAUNCH = GegluLaunch()

if _HAS_TRITON:

    from imix2mix.kernels.triton_support import round_to_kind as _round_to_kind

    @triton.jit
    def _tile_offsets(R, F, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """Offsets of this program's tile in the [R, F] output and in the value half of [R, 2F] h."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (rows < R)[:, None] & (cols < F)[None, :]
        # int64 rows: R * 2F may pass 2**31 at large view counts.
        out_offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        h_offs = rows[:, None].to(tl.int64) * (2 * F) + cols[None, :]
        return out_offs, h_offs, mask

    @triton.jit
    def _gelu_rounded(gate, KIND: tl.constexpr):
        """torch's exact GELU of a half-precision tensor: fp32 math, rounded to the tensor's dtype."""
        return _round_to_kind(0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)), KIND)

    @triton.jit
    def _geglu_forward_kernel(
        h_ptr, out_ptr, R, F, KIND: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
    ):
        out_offs, h_offs, mask = _tile_offsets(R, F, BLOCK_ROWS, BLOCK_COLS)
        value = tl.load(h_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(h_ptr + h_offs + F, mask=mask, other=0.0).to(tl.float32)
        out = _round_to_kind(value * _gelu_rounded(gate, KIND), KIND)
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_backward_kernel(
        h_ptr, dout_ptr, dh_ptr, R, F, KIND: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
    ):
        out_offs, h_offs, mask = _tile_offsets(R, F, BLOCK_ROWS, BLOCK_COLS)
        value = tl.load(h_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(h_ptr + h_offs + F, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
        dvalue = _round_to_kind(dout * _gelu_rounded(gate, KIND), KIND)
        dg = _round_to_kind(dout * value, KIND)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327  # 1 / sqrt(2 pi)
        dgate = _round_to_kind(dg * (cdf + gate * pdf), KIND)
        tl.store(dh_ptr + h_offs, dvalue.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + h_offs + F, dgate.to(dh_ptr.dtype.element_ty), mask=mask)


def fused_geglu_available(h: torch.Tensor) -> bool:
    """Whether :func:`geglu` can run on ``h`` (else use :func:`geglu_reference`).

    Requires Triton, a CUDA ``h`` (or the interpreter), a float16/bfloat16/float32 dtype, a contiguous
    ``h`` (viewed as ``[rows, 2F]`` without a copy) with an even, non-zero last dimension.
    """
    if not _HAS_TRITON or h.dim() < 1 or h.dtype not in _DTYPE_KIND:
        return False
    if not h.is_contiguous() or h.numel() == 0 or h.shape[-1] % 2:
        return False
    return bool(h.is_cuda or _interpreter_on())


def _launch_shape(r: int, f: int, launch: GegluLaunch) -> tuple[tuple[int, int], int, int]:
    block_cols = min(launch.block_f, triton.next_power_of_2(f))
    block_rows = max(launch.tile // block_cols, 1)
    return (triton.cdiv(r, block_rows), triton.cdiv(f, block_cols)), block_rows, block_cols


class _Geglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, launch: GegluLaunch) -> torch.Tensor:  # type: ignore[override]
        f = h.shape[-1] // 2
        r = h.numel() // h.shape[-1]
        out = torch.empty((*h.shape[:-1], f), device=h.device, dtype=h.dtype)
        grid, block_rows, block_cols = _launch_shape(r, f, launch)
        _geglu_forward_kernel[grid](
            h, out, r, f, KIND=_DTYPE_KIND[h.dtype], BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=launch.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(h)
        ctx.launch = launch
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (h,) = ctx.saved_tensors
        f = h.shape[-1] // 2
        r = h.numel() // h.shape[-1]
        dout = dout.to(h.dtype).contiguous()  # read as a row-major [rows, F] matrix
        dh = torch.empty_like(h)
        grid, block_rows, block_cols = _launch_shape(r, f, ctx.launch)
        _geglu_backward_kernel[grid](
            h, dout, dh, r, f, KIND=_DTYPE_KIND[h.dtype], BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=ctx.launch.num_warps,
        )  # fmt: skip
        return dh, None


def geglu(h: torch.Tensor, launch: GegluLaunch = DEFAULT_LAUNCH) -> torch.Tensor:
    """``value * gelu(gate)`` for ``value, gate = h.chunk(2, -1)``, with the semantics of
    :func:`geglu_reference`, in one kernel per pass.  Autograd-capable; returns a contiguous tensor
    of ``h``'s dtype.  ``launch``: tile sizes.  Check :func:`fused_geglu_available` first."""
    if not fused_geglu_available(h):
        raise ValueError(
            "geglu needs Triton and a non-empty contiguous fp32/fp16/bf16 tensor with an even last "
            f"dimension on a CUDA device (or the Triton interpreter); got shape {tuple(h.shape)}, "
            f"dtype {h.dtype}, device {h.device}, strides {h.stride()}"
        )
    return _Geglu.apply(h, launch)


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """The GEGLU gate as torch computes it: exact GELU of the second half times the first half."""
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)
