"""Fused LayerNorm over the last dimension with a low-precision output, in Triton, with backward.

Why this exists: in the SEVA student under bf16 autocast, every ``nn.LayerNorm(C)`` (fp32 weight and
bias) receives a bf16 activation; autocast casts it to fp32, the norm writes an fp32 tensor, and the
``nn.Linear`` that consumes it casts that back to bf16.  This kernel reads the bf16 rows where they
lie, does all the math in fp32, and writes the ``out_dtype`` result once (half the bytes of the fp32
tensor, and no separate cast).

Semantics are those of :func:`layer_norm_reference`: ``F.layer_norm`` of ``x.float()`` with fp32
parameters, rounded to ``out_dtype``; gradients equal to that reference's autograd (``dx`` in
``x.dtype``, weight/bias grads in the parameters' dtype, i.e. fp32 for the student's fp32 ones).

Layout: ``x`` is viewed as a row-major ``[rows, C]`` matrix.  One row (C <= 8192) fits in one
program's registers: a program loads a ``[BLOCK_ROWS, BLOCK_C]`` tile (``BLOCK_C`` the next power of
two >= C, lanes beyond C masked off) and normalises each row in registers (two-pass variance: the
mean first, then the sum of squared deviations, so a large common mean does not cancel digits).

Forward: one launch, one tile per program; it also writes per-row fp32 mean and rstd.
Backward: one launch; a program walks a chunk of rows in tiles, writes dx, and per-column partial
sums of dy * x_hat (dweight) and dy (dbias) over its chunk to ``[programs, C]`` fp32 buffers, which
one torch ``sum(0)`` each reduces on the device.  No host synchronisation, buffer shapes fixed by the
input's shape: forward + backward can be captured in a CUDA graph.

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

# Widest row handled: one row must fit in one program's registers (8192 fp32 = 64 per thread at 4 warps).
MAX_C = 8192


@dataclass(frozen=True)
class LayerNormLaunch:
    """Tile and grid sizes of the LayerNorm kernels (powers of two where they size a tile)."""

    # Elements per forward tile (BLOCK_ROWS = fwd_tile // BLOCK_C rows, at least 1): 8 / 4 / 2 rows at
    # C = 320 / 640 / 1280, about 32 fp32 registers per live tile per thread at 4 warps.  Not tuned.
    fwd_tile: int = 4096
    # The backward keeps x, dy, x_hat and w * dy of a tile live at once: half the forward's tile.
    bwd_tile: int = 2048
    # Upper bound on the rows one backward program walks (in tiles): long enough to amortise its
    # setup and keep the [programs, C] partial buffers a small fraction of x's size.
    bwd_max_rows: int = 64
    # Backward chunks are halved (down to one tile) until the grid has at least this many programs,
    # so the 1620-row levels still spread over the 132 SMs of an H100.
    bwd_min_programs: int = 528
    # 4 warps for tiles of up to 4096 elements, 8 beyond (a single wide row), to bound registers per
    # thread.
    num_warps: int = 4
    wide_num_warps: int = 8


DEFAULT_LAUNCH = LayerNormLaunch()


if _HAS_TRITON:

    from imix2mix.kernels.triton_support import round_to_kind as _round_to_kind

    @triton.jit
    def _ln_forward_kernel(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        R,
        C,
        eps,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        KIND: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_mask = rows < R
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * C + cols[None, :]  # int32: rows * C < 2**31 (checked on the host)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(mask, x - mean[:, None], 0.0)
        # Biased variance (as layer_norm), from the deviations: no E[x^2] - E[x]^2 cancellation.
        var = tl.sum(d * d, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        y = d * rstd[:, None]
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = y * w[None, :]
        if HAS_B:
            b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = y + b[None, :]
        y = _round_to_kind(y, KIND)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    @triton.jit
    def _ln_backward_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        w_ptr,
        mean_ptr,
        rstd_ptr,
        pdw_ptr,
        pdb_ptr,
        R,
        C,
        ROWS,
        HAS_W: tl.constexpr,
        NEED_DX: tl.constexpr,
        NEED_DW: tl.constexpr,
        NEED_DB: tl.constexpr,
        KIND: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) per row, g = dy * w; and this program's
        per-column partial sums of dy * x_hat and dy over its ROWS rows."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < C
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
        row0 = pid * ROWS
        row_end = tl.minimum(row0 + ROWS, R)
        for r in range(row0, row_end, BLOCK_ROWS):
            rows = r + tl.arange(0, BLOCK_ROWS)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows[:, None] * C + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mu = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rs = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            x_hat = tl.where(mask, (x - mu[:, None]) * rs[:, None], 0.0)
            if NEED_DX:
                if HAS_W:
                    g = dy * w[None, :]
                else:
                    g = dy
                coef_a = tl.sum(g, axis=1) / C
                coef_b = tl.sum(g * x_hat, axis=1) / C
                dx = rs[:, None] * (g - coef_a[:, None] - x_hat * coef_b[:, None])
                dx = _round_to_kind(dx, KIND)
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if NEED_DW:
                acc_dw += tl.sum(dy * x_hat, axis=0)
            if NEED_DB:
                acc_db += tl.sum(dy, axis=0)
        if NEED_DW:
            tl.store(pdw_ptr + pid * C + cols, acc_dw, mask=col_mask)
        if NEED_DB:
            tl.store(pdb_ptr + pid * C + cols, acc_db, mask=col_mask)


def fused_layer_norm_available(x: torch.Tensor) -> bool:
    """Whether :func:`layer_norm_rows` can run on ``x`` (else use :func:`layer_norm_reference`).

    Requires Triton, a CUDA ``x`` (or the interpreter), a float32/float16/bfloat16 dtype (the kernels
    compute in fp32, which would lose precision on float64), a contiguous ``x`` (viewed as
    ``[rows, C]`` without a copy), 1 <= C <= 8192 and rows * C < 2**31 (int32 offsets), non-empty.
    """
    if not _HAS_TRITON:
        return False
    if x.dim() < 1 or x.dtype not in _DTYPE_KIND:
        return False
    if not x.is_contiguous() or x.stride(-1) != 1:
        return False
    c = x.shape[-1]
    if c < 1 or c > MAX_C or x.numel() == 0 or x.numel() >= 2**31:
        return False
    return bool(x.is_cuda or _interpreter_on())


def _block_rows(c: int, tile: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_C) of a tile of about ``tile`` elements covering whole rows of width ``c``."""
    block_c = triton.next_power_of_2(c)
    return max(tile // block_c, 1), block_c  # both powers of two: tile is one


def _num_warps(block_rows: int, block_c: int, launch: LayerNormLaunch) -> int:
    return launch.num_warps if block_rows * block_c <= 4096 else launch.wide_num_warps


def _backward_grid(r: int, block_rows: int, launch: LayerNormLaunch) -> tuple[int, int]:
    """Rows per backward program (a multiple of ``block_rows``) and the number of programs: up to
    ``launch.bwd_max_rows`` rows, halved while the grid has fewer than ``launch.bwd_min_programs``
    programs.  A function of the shape alone, so a captured CUDA graph stays valid."""
    rows = max(launch.bwd_max_rows, block_rows)
    while rows > block_rows and triton.cdiv(r, rows) < launch.bwd_min_programs:
        rows //= 2
    rows = max(rows, block_rows)
    return rows, triton.cdiv(r, rows)


class _LayerNormRows(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        out_dtype: torch.dtype,
        launch: LayerNormLaunch,
    ) -> torch.Tensor:
        c = x.shape[-1]
        r = x.numel() // c  # x is contiguous: the kernels read it as a row-major [rows, C] matrix
        weight_t = None if weight is None else weight.contiguous()
        bias_t = None if bias is None else bias.contiguous()
        y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
        mean = torch.empty(r, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_rows, block_c = _block_rows(c, launch.fwd_tile)
        # Absent parameters: any pointer will do (HAS_W / HAS_B = False never read it).
        _ln_forward_kernel[(triton.cdiv(r, block_rows),)](
            x, y, x if weight_t is None else weight_t, x if bias_t is None else bias_t, mean, rstd,
            r, c, float(eps),
            HAS_W=weight_t is not None, HAS_B=bias_t is not None, KIND=_DTYPE_KIND[out_dtype],
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=_num_warps(block_rows, block_c, launch),
        )  # fmt: skip
        ctx.save_for_backward(x, weight_t, mean, rstd)
        ctx.out_dtype = out_dtype
        ctx.launch = launch
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight_t, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_dw = need_dw and weight_t is not None
        need_db = need_db and ctx.bias_dtype is not None
        c = x.shape[-1]
        r = x.numel() // c
        dy = dy.to(ctx.out_dtype).contiguous()  # the kernel reads it as a row-major [rows, C] matrix
        block_rows, block_c = _block_rows(c, ctx.launch.bwd_tile)
        rows, programs = _backward_grid(r, block_rows, ctx.launch)
        dx = torch.empty_like(x) if need_dx else None
        pdw = torch.empty((programs, c), device=x.device, dtype=torch.float32) if need_dw else None
        pdb = torch.empty((programs, c), device=x.device, dtype=torch.float32) if need_db else None
        if need_dx or need_dw or need_db:
            _ln_backward_kernel[(programs,)](
                x, dy, x if dx is None else dx, x if weight_t is None else weight_t, mean, rstd,
                mean if pdw is None else pdw, mean if pdb is None else pdb, r, c, rows,
                HAS_W=weight_t is not None, NEED_DX=bool(need_dx), NEED_DW=bool(need_dw),
                NEED_DB=bool(need_db), KIND=_DTYPE_KIND[x.dtype],
                BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=_num_warps(block_rows, block_c, ctx.launch),
            )  # fmt: skip
        dweight = pdw.sum(0).to(weight_t.dtype) if need_dw else None
        dbias = pdb.sum(0).to(ctx.bias_dtype) if need_db else None
        return dx, dweight, dbias, None, None, None


def layer_norm_rows(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    launch: LayerNormLaunch = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` with the semantics of :func:`layer_norm_reference`.

    Autograd-capable; ``weight`` / ``bias`` ([C], fp32 or half) may be None (no affine, no gradient).
    Returns a contiguous tensor of ``x``'s shape and ``out_dtype``.  ``launch``: tile and grid sizes.
    Check :func:`fused_layer_norm_available` first.
    """
    if not _HAS_TRITON:
        raise RuntimeError("layer_norm_rows needs Triton, which failed to import")
    if not fused_layer_norm_available(x):
        raise ValueError(
            "layer_norm_rows needs a non-empty contiguous fp32/fp16/bf16 tensor with at most "
            f"{MAX_C} channels and fewer than 2**31 elements on a CUDA device (or the Triton "
            f"interpreter); got shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}, "
            f"strides {x.stride()}"
        )
    if out_dtype not in _DTYPE_KIND:
        raise ValueError(f"layer_norm_rows: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    c = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (c,) or p.dtype not in _DTYPE_KIND or p.device != x.device):
            raise ValueError(
                f"layer_norm_rows: {name} must be a float [{c}] tensor on {x.device}; "
                f"got shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device}"
            )
    return _LayerNormRows.apply(x, weight, bias, float(eps), out_dtype, launch)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The semantics the fused kernel implements: ``nn.LayerNorm(C)`` under bf16 autocast followed by
    the consuming ``nn.Linear``'s cast: fp32 statistics and affine on ``x.float()``, rounded to
    ``out_dtype``.  Half-precision parameters are used at fp32."""
    weight, bias = (None if p is None else p.float() for p in (weight, bias))  # .float() of fp32: the same tensor
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps).to(out_dtype)
