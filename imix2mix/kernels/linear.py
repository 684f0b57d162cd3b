"""``F.linear`` whose backward sums the bias gradient with a Triton column-sum kernel.

Why this exists: autograd's backward of a biased linear layer reduces the output gradient over its
rows (``grad.sum(0)``) with torch's generic reduction kernel, which on the student's tall, narrow
gradients (25920 × 2560 and the like) ran at roughly a quarter of the H100's memory bandwidth: the
bias-gradient reductions took 7.7 ms of the iteration for about 2 ms worth of bytes.  The forward is
``F.linear`` itself and the two matrix products of the backward are the ones autograd runs, so only
the bias gradient's summation order changes (fp32 accumulation either way, rounded once to the
bias's dtype).

The column sum: programs tile the ``[rows, C]`` gradient into column slabs and row chunks
(:class:`ColumnSumLaunch`); each program adds its chunk in fp32 and writes one row of a ``[chunks, C]`` fp32 partial
buffer, which one torch ``sum(0)`` reduces.  Shapes depend on the input's shape alone (CUDA graphs).

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
class ColumnSumLaunch:
    """Tile and grid sizes of the column-sum kernel.  Not tuned beyond the tile."""

    # A tile is block_rows × block_c (4096 elements, 16 bf16 per thread at 4 warps, 16-byte loads);
    # both powers of two.
    block_c: int = 128
    block_rows: int = 32
    # Row chunks per column slab: enough programs to fill the GPU (4 per SM on an H100), but at least
    # min_chunk_rows rows each so that the partial buffer stays small.
    min_programs: int = 528
    min_chunk_rows: int = 256
    num_warps: int = 4


DEFAULT_LAUNCH = ColumnSumLaunch()

if _HAS_TRITON:

    @triton.jit
    def _column_sum_kernel(
        g_ptr, partial_ptr, R, C, CHUNK_ROWS, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        chunk = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        acc = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
        row0 = chunk * CHUNK_ROWS
        row_end = tl.minimum(row0 + CHUNK_ROWS, R)
        for r in range(row0, row_end, BLOCK_ROWS):
            rows = r + tl.arange(0, BLOCK_ROWS)
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            offs = rows[:, None].to(tl.int64) * C + cols[None, :]
            acc += tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + chunk * C + cols, tl.sum(acc, axis=0), mask=col_mask)


def fused_bias_grad_available(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear` can run (else use ``F.linear``): Triton, a bias, CUDA tensors (or the
    interpreter), fp32/fp16/bf16, and a non-empty input of at least one dimension."""
    if not _HAS_TRITON or bias is None or x.dim() < 1 or x.numel() == 0:
        return False
    if x.dtype not in _DTYPE_KIND:
        return False
    return bool(x.is_cuda or _interpreter_on())


def column_sum(g: torch.Tensor, out_dtype: torch.dtype, launch: ColumnSumLaunch = DEFAULT_LAUNCH) -> torch.Tensor:
    """``g.sum(0)`` of a 2-D tensor, accumulated in fp32 and rounded to ``out_dtype``."""
    g = g.contiguous()
    r, c = g.shape
    slabs = triton.cdiv(c, launch.block_c)
    chunk_rows = max(launch.min_chunk_rows, triton.cdiv(r, max(launch.min_programs // slabs, 1)))
    chunk_rows = triton.cdiv(chunk_rows, launch.block_rows) * launch.block_rows
    chunks = max(triton.cdiv(r, chunk_rows), 1)
    partial = torch.empty((chunks, c), device=g.device, dtype=torch.float32)
    _column_sum_kernel[(chunks, slabs)](
        g, partial, r, c, chunk_rows, BLOCK_ROWS=launch.block_rows, BLOCK_C=launch.block_c,
        num_warps=launch.num_warps,
    )
    return partial.sum(0).to(out_dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, launch: ColumnSumLaunch) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype
        ctx.launch = launch
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_rows = grad.reshape(-1, grad.shape[-1])
        dx = grad.matmul(weight) if need_x else None
        dw = grad_rows.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        db = column_sum(grad_rows, ctx.bias_dtype, ctx.launch) if need_b else None
        return dx, dw, db, None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, launch: ColumnSumLaunch = DEFAULT_LAUNCH
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (inputs already in one dtype, outside autocast), with the bias
    gradient summed by :func:`column_sum`.  Check :func:`fused_bias_grad_available` first."""
    if not fused_bias_grad_available(x, bias):
        raise ValueError(
            "linear needs Triton, a bias and a non-empty fp32/fp16/bf16 input on a CUDA device (or the "
            f"Triton interpreter); got shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
        )
    if not (x.dtype == weight.dtype == bias.dtype):
        raise ValueError(f"linear: x, weight and bias must share a dtype; got {x.dtype}, {weight.dtype}, {bias.dtype}")
    return _Linear.apply(x, weight, bias, launch)
