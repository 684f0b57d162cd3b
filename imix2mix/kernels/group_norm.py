"""Fused GroupNorm (+ optional SiLU) for channels-last (NHWC) 4-D tensors, in Triton, with backward.

Why this exists: the SEVA student's convolutions run fastest on NHWC activations, but torch has no
NHWC CUDA kernel for GroupNorm, so cuDNN transposes around every conv, and ``GroupNorm32`` under
bf16 autocast casts each activation bf16 -> fp32 -> bf16 around every norm.  These kernels read the
low-precision tensor where it lies, do all the math in fp32, and write the low-precision result once.

Semantics are those of :func:`group_norm_reference` (``GroupNorm32`` followed by SiLU in a ResBlock):
fp32 statistics and affine, rounded to ``x.dtype``; SiLU applied to the *rounded* tensor and rounded
again; gradients equal to that reference's autograd (``dx`` in ``x.dtype``, weight/bias grads fp32).

Optional ``shift`` ([N, C], ``x.dtype``): the norm's input is ``x + shift[:, :, None, None]`` (torch's
add: fp32, rounded to ``x.dtype``), formed in registers by every kernel that loads x (the ResBlock's
timestep-embedding add, which would otherwise be one more pass over the activation through torch's
slow channels-last broadcast, plus a reduction of its gradient over H, W in the backward).  Its
gradient, the sum of dx over H, W, comes from per-chunk partial sums written by the dx kernel.

Layout: a channels-last ``[N, C, H, W]`` tensor is, in memory, a row-major ``[N, HW, C]`` matrix.
The element-wise kernels run on grids ``(N, row chunks, channel blocks)``; a program walks its rows
in ``[BLOCK_HW, BLOCK_C]`` tiles, contiguous along C (coalesced); sizes: :class:`GroupNormLaunch`.
Per-(n, group) reductions go through small ``[N, chunks, C]`` fp32 buffers of per-column partial
results, finished by a tiny per-group kernel (channels per group need not be a power of two: each
column looks its group up).

Forward: chunk statistics (one read of x) -> group mean/rstd -> normalise (read x, write y).
Backward: per-column sums of g and g*x_hat (read x, dy) -> per-group coefficients and dweight/dbias
-> dx (read x, dy, write dx; with a shift, also partial sums of dx per column).  Six launches in all
(with a shift, a seventh: torch's sum of those partials), no host synchronisation, buffer shapes fixed
by the input's shape: the whole forward + backward can be captured in a CUDA graph.

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
class GroupNormLaunch:
    """Tile and grid sizes of the GroupNorm kernels, picked on an H100 (torch 2.11, Triton 3.6) over
    the SEVA shapes (N = 5; C x HW = 320 x 5184 ... 2560 x 81), bf16, timing each kernel alone.
    Block sizes must be powers of two (``tl.arange``)."""

    # 64 channels of bf16 are one 128-byte line per row, and every SEVA width (320 ... 2560) is a
    # multiple of 64, so no lanes are masked off at full size.
    block_c: int = 64
    # The reducing kernels (statistics, backward sums) keep two [block_hw, block_c] fp32 accumulators
    # live: 16 rows leaves registers for more programs per SM (~20% faster than 32 for the backward sums).
    reduce_block_hw: int = 16
    # The applying kernels (normalise, dx) keep no accumulators: 32 rows, more bytes in flight per step.
    apply_block_hw: int = 32
    # Upper bound on the rows one program walks: long enough to amortise the per-program setup and
    # keep the partial buffers small at 72 x 72 latents.
    max_rows: int = 256
    # A grid's row chunks are halved (down to its block_hw) until it has at least this many programs,
    # so the small-HW, wide-C levels still spread over the 132 SMs of an H100 (4 or 8 per SM).
    reduce_min_programs: int = 528
    apply_min_programs: int = 1056
    # 2 warps beat 4 and 8 for every element-wise kernel here (by 5-20%), at these tile sizes.
    num_warps: int = 2
    # Elements per tile in the per-group finishing kernels: their inputs are a few KB, so they are
    # latency-bound, and one tile should cover all of a group's row chunks in one step where it can;
    # with 4 warps they ran 25-45% faster than with 2.
    finish_tile: int = 2048
    finish_warps: int = 4


DEFAULT_LAUNCH = GroupNormLaunch()


if _HAS_TRITON:

    from imix2mix.kernels.triton_support import round_to_kind as _round_to_kind

    @triton.jit
    def _program_tile(HW, C, ROWS, BLOCK_C: tl.constexpr):
        """This program's sample n, row chunk, columns (with their mask), the sample's offset in
        memory and the chunk's rows [row0, row_end), on an (N, row chunks, channel blocks) grid."""
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        row0 = chunk * ROWS
        return n, chunk, cols, cols < C, n.to(tl.int64) * HW * C, row0, tl.minimum(row0 + ROWS, HW)

    @triton.jit
    def _load_shift(shift_ptr, n, C, cols, col_mask, HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
        """Sample n's row of the shift (fp32); zeros, never added, without one."""
        x_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_SHIFT:
            x_shift = tl.load(shift_ptr + n * C + cols, mask=col_mask, other=0.0).to(tl.float32)
        return x_shift

    @triton.jit
    def _load_input(x_ptr, offs, mask, x_shift, HAS_SHIFT: tl.constexpr, KIND: tl.constexpr):
        """The norm's input at ``offs`` in fp32: x, plus the shift rounded as torch's add rounds it."""
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            x = _round_to_kind(x + x_shift[None, :], KIND)
        return x

    @triton.jit
    def _column_affine(n, cols, col_mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, CG, G):
        """Per column of sample n: its group's index, mean and rstd, the weight, and the affine folded
        into one scale and offset (as torch's GroupNorm kernels fold it)."""
        grp = n * G + cols // CG
        mu = tl.load(mean_ptr + grp, mask=col_mask, other=0.0)
        rs = tl.load(rstd_ptr + grp, mask=col_mask, other=0.0)
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        scale = rs * w
        return grp, mu, rs, w, scale, b - mu * scale

    @triton.jit
    def _through_silu(g, x, scale, offset, SILU: tl.constexpr, KIND: tl.constexpr):
        """The gradient g of the output taken back through the SiLU, if any: the forward's expression
        for y, so y is bit-identical to what SiLU saw there; the reference's SiLU backward runs on
        the rounded tensor and rounds its result."""
        if SILU:
            y = _round_to_kind(x * scale[None, :] + offset[None, :], KIND)
            s = tl.sigmoid(y)
            g = _round_to_kind(g * s * (1.0 + y * (1.0 - s)), KIND)
        return g

    @triton.jit
    def _chunk_stats_kernel(
        x_ptr,
        shift_ptr,
        cmean_ptr,
        cm2_ptr,
        HW,
        C,
        ROWS,
        HAS_SHIFT: tl.constexpr,
        KIND: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Per (chunk, column): mean and sum of squared deviations of x over the chunk's rows.

        One pass over x with sums shifted by the chunk's first row (a sample of the same column, so
        within a few standard deviations of its mean): the classic shifted-data variance, which does
        not cancel like E[x^2] - E[x]^2 does for activations with a large mean.  With HAS_SHIFT, x
        is ``round(x + shift[n])`` throughout, the first row's sample included.
        """
        n, chunk, cols, col_mask, base, row0, row_end = _program_tile(HW, C, ROWS, BLOCK_C)
        x_shift = _load_shift(shift_ptr, n, C, cols, col_mask, HAS_SHIFT, BLOCK_C)
        pivot = tl.load(x_ptr + base + row0 * C + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            pivot = _round_to_kind(pivot + x_shift, KIND)
        acc_s = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        acc_q = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        for r in range(row0, row_end, BLOCK_HW):
            rows = r + tl.arange(0, BLOCK_HW)
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            offs = base + rows[:, None] * C + cols[None, :]
            x = _load_input(x_ptr, offs, mask, x_shift, HAS_SHIFT, KIND)
            d = tl.where(mask, x - pivot[None, :], 0.0)
            acc_s += d
            acc_q += d * d
        count = (row_end - row0).to(tl.float32)
        s = tl.sum(acc_s, axis=0)
        q = tl.sum(acc_q, axis=0)
        out = (n * tl.num_programs(1) + chunk) * C + cols
        tl.store(cmean_ptr + out, pivot + s / count, mask=col_mask)
        tl.store(cm2_ptr + out, q - s * (s / count), mask=col_mask)

    @triton.jit
    def _group_stats_kernel(
        cmean_ptr,
        cm2_ptr,
        mean_ptr,
        rstd_ptr,
        HW,
        C,
        CG,
        G,
        ROWS,
        n_chunks,
        count,
        eps,
        BLOCK_K: tl.constexpr,
        BLOCK_CG: tl.constexpr,
    ):
        """Per (n, group): mean and rstd from the chunk statistics, combined exactly (Chan et al.):
        M2 = sum over (chunk, column) of [M2_kc + n_k * (mean_kc - mean)^2]."""
        n = tl.program_id(0)
        grp = tl.program_id(1)
        lane = tl.arange(0, BLOCK_CG)
        cols = grp * CG + lane
        col_mask = lane < CG
        acc = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
        for k0 in range(0, n_chunks, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = (ks < n_chunks)[:, None] & col_mask[None, :]
            rows_k = tl.minimum(ROWS, HW - ks * ROWS).to(tl.float32)
            offs = (n * n_chunks + ks)[:, None] * C + cols[None, :]
            cm = tl.load(cmean_ptr + offs, mask=mask, other=0.0)
            acc += tl.where(mask, cm * rows_k[:, None], 0.0)
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        acc = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
        for k0 in range(0, n_chunks, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = (ks < n_chunks)[:, None] & col_mask[None, :]
            rows_k = tl.minimum(ROWS, HW - ks * ROWS).to(tl.float32)
            offs = (n * n_chunks + ks)[:, None] * C + cols[None, :]
            cm = tl.load(cmean_ptr + offs, mask=mask, other=0.0)
            m2 = tl.load(cm2_ptr + offs, mask=mask, other=0.0)
            d = cm - mean
            acc += tl.where(mask, m2 + rows_k[:, None] * d * d, 0.0)
        # Biased variance, clamped like torch's (rounding can leave a tiny negative M2).
        var = tl.maximum(tl.sum(tl.sum(acc, axis=1), axis=0) / count, 0.0)
        tl.store(mean_ptr + n * G + grp, mean)
        tl.store(rstd_ptr + n * G + grp, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _normalize_kernel(
        x_ptr,
        shift_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        HW,
        C,
        CG,
        G,
        ROWS,
        SILU: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        KIND: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        n, chunk, cols, col_mask, base, row0, row_end = _program_tile(HW, C, ROWS, BLOCK_C)
        grp, mu, rs, w, scale, offset = _column_affine(n, cols, col_mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, CG, G)
        x_shift = _load_shift(shift_ptr, n, C, cols, col_mask, HAS_SHIFT, BLOCK_C)
        for r in range(row0, row_end, BLOCK_HW):
            rows = r + tl.arange(0, BLOCK_HW)
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            offs = base + rows[:, None] * C + cols[None, :]
            x = _load_input(x_ptr, offs, mask, x_shift, HAS_SHIFT, KIND)
            y = _round_to_kind(x * scale[None, :] + offset[None, :], KIND)
            if SILU:
                y = _round_to_kind(y * tl.sigmoid(y), KIND)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_sums_kernel(
        x_ptr,
        shift_ptr,
        dy_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        s1_ptr,
        s2_ptr,
        HW,
        C,
        CG,
        G,
        ROWS,
        SILU: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        KIND: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Per-column partial sums of g and g * x_hat, g being the gradient w.r.t. the norm's output."""
        n, chunk, cols, col_mask, base, row0, row_end = _program_tile(HW, C, ROWS, BLOCK_C)
        grp, mu, rs, w, scale, offset = _column_affine(n, cols, col_mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, CG, G)
        x_shift = _load_shift(shift_ptr, n, C, cols, col_mask, HAS_SHIFT, BLOCK_C)
        acc1 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        for r in range(row0, row_end, BLOCK_HW):
            rows = r + tl.arange(0, BLOCK_HW)
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            offs = base + rows[:, None] * C + cols[None, :]
            x = _load_input(x_ptr, offs, mask, x_shift, HAS_SHIFT, KIND)
            g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(mask, _through_silu(g, x, scale, offset, SILU, KIND), 0.0)
            x_hat = (x - mu[None, :]) * rs[None, :]
            acc1 += g
            acc2 += g * x_hat
        out = (n * tl.num_programs(1) + chunk) * C + cols
        tl.store(s1_ptr + out, tl.sum(acc1, axis=0), mask=col_mask)
        tl.store(s2_ptr + out, tl.sum(acc2, axis=0), mask=col_mask)

    @triton.jit
    def _backward_group_kernel(
        s1_ptr,
        s2_ptr,
        w_ptr,
        a_ptr,
        b_ptr,
        dw_ptr,
        db_ptr,
        N,
        C,
        CG,
        G,
        n_chunks,
        count,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_CG: tl.constexpr,
    ):
        """Per group: A[n] = mean of g*w and B[n] = mean of g*w*x_hat over (HW, group channels), and
        the group's slice of dweight = sum of g*x_hat and dbias = sum of g over (N, HW).

        The [N, chunks, C] buffers are walked as N * chunks rows at once (not one n after another:
        this kernel is latency-bound), and the per-n sums are split out with a one-hot mask.
        """
        grp = tl.program_id(0)
        lane = tl.arange(0, BLOCK_CG)
        cols = grp * CG + lane
        col_mask = lane < CG
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        ns = tl.arange(0, BLOCK_N)
        total_rows = N * n_chunks
        dw = tl.zeros([BLOCK_CG], dtype=tl.float32)
        db = tl.zeros([BLOCK_CG], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, total_rows, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            mask = (rs < total_rows)[:, None] & col_mask[None, :]
            offs = rs[:, None] * C + cols[None, :]
            t1 = tl.load(s1_ptr + offs, mask=mask, other=0.0)
            t2 = tl.load(s2_ptr + offs, mask=mask, other=0.0)
            db += tl.sum(t1, axis=0)
            dw += tl.sum(t2, axis=0)
            row1 = tl.sum(t1 * w[None, :], axis=1)
            row2 = tl.sum(t2 * w[None, :], axis=1)
            owner = (rs // n_chunks)[None, :] == ns[:, None]
            acc_a += tl.sum(tl.where(owner, row1[None, :], 0.0), axis=1)
            acc_b += tl.sum(tl.where(owner, row2[None, :], 0.0), axis=1)
        n_mask = ns < N
        tl.store(a_ptr + ns * G + grp, acc_a / count, mask=n_mask)
        tl.store(b_ptr + ns * G + grp, acc_b / count, mask=n_mask)
        tl.store(dw_ptr + cols, dw, mask=col_mask)
        tl.store(db_ptr + cols, db, mask=col_mask)

    @triton.jit
    def _backward_dx_kernel(
        x_ptr,
        shift_ptr,
        dy_ptr,
        dx_ptr,
        dshift_ptr,
        w_ptr,
        b_ptr,
        mean_ptr,
        rstd_ptr,
        a_ptr,
        bcoef_ptr,
        HW,
        C,
        CG,
        G,
        ROWS,
        SILU: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        KIND: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """dx = rstd * (g * w - A - x_hat * B), A and B being per-(n, group) means of g*w and g*w*x_hat.

        With HAS_SHIFT, also the per-(n, chunk, column) sums of the rounded dx (the shift's gradient
        is their sum over chunks: autograd's sum over H, W of dx as rounded to x.dtype)."""
        n, chunk, cols, col_mask, base, row0, row_end = _program_tile(HW, C, ROWS, BLOCK_C)
        grp, mu, rs, w, scale, offset = _column_affine(n, cols, col_mask, mean_ptr, rstd_ptr, w_ptr, b_ptr, CG, G)
        x_shift = _load_shift(shift_ptr, n, C, cols, col_mask, HAS_SHIFT, BLOCK_C)
        coef_a = tl.load(a_ptr + grp, mask=col_mask, other=0.0)
        coef_b = tl.load(bcoef_ptr + grp, mask=col_mask, other=0.0)
        if HAS_SHIFT:
            acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        for r in range(row0, row_end, BLOCK_HW):
            rows = r + tl.arange(0, BLOCK_HW)
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            offs = base + rows[:, None] * C + cols[None, :]
            x = _load_input(x_ptr, offs, mask, x_shift, HAS_SHIFT, KIND)
            g = _through_silu(tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32), x, scale, offset, SILU, KIND)
            x_hat = (x - mu[None, :]) * rs[None, :]
            dx = rs[None, :] * (g * w[None, :] - coef_a[None, :] - x_hat * coef_b[None, :])
            dx = _round_to_kind(dx, KIND)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_SHIFT:
                acc += tl.where(mask, dx, 0.0)
        if HAS_SHIFT:
            out = (n * tl.num_programs(1) + chunk) * C + cols
            tl.store(dshift_ptr + out, tl.sum(acc, axis=0), mask=col_mask)


def fused_group_norm_available(x: torch.Tensor, num_groups: int) -> bool:
    """Whether :func:`group_norm_nhwc` can run on ``x`` (else use torch's GroupNorm).

    Beyond the layout, it also requires a float32/float16/bfloat16 ``x`` (the kernels compute in
    fp32, which would lose precision on float64) and fewer than 2**31 elements per sample.
    """
    if not _HAS_TRITON:
        return False
    if x.dim() != 4 or x.dtype not in _DTYPE_KIND:
        return False
    if num_groups <= 0 or x.shape[1] % num_groups != 0:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    # Offsets within one sample are int32 in the kernels.
    if x.shape[1] * x.shape[2] * x.shape[3] >= 2**31:
        return False
    return bool(x.is_cuda or _interpreter_on())


def _finish_blocks(rows: int, cg: int, launch: GroupNormLaunch, per_row: int = 1) -> tuple[int, int]:
    """Tile (rows, BLOCK_CG) of (buffer rows, group channels) for the per-group kernels: all rows in
    one step where ``launch.finish_tile`` allows.  ``per_row``: extra elements a row costs (a one-hot
    column)."""
    block_cg = triton.next_power_of_2(cg)
    budget = max(launch.finish_tile // (block_cg + per_row), 1)
    block_rows = min(triton.next_power_of_2(rows), 1 << (budget.bit_length() - 1))  # tl.arange: 2**k
    return max(block_rows, 2), block_cg


def _launch_grid(
    n: int, hw: int, c: int, block_hw: int, min_programs: int, launch: GroupNormLaunch
) -> tuple[int, tuple[int, int, int]]:
    """Rows per program and the grid (N, row chunks, channel blocks) of an element-wise kernel:
    ``launch.max_rows`` rows, halved while the grid has fewer than ``min_programs`` programs.  A
    function of the shape alone, so a captured CUDA graph stays valid."""
    c_blocks = triton.cdiv(c, launch.block_c)
    rows = launch.max_rows
    while rows > block_hw and n * triton.cdiv(hw, rows) * c_blocks < min_programs:
        rows //= 2
    rows = max(rows, block_hw)
    return rows, (n, triton.cdiv(hw, rows), c_blocks)


def _reduce_grid(n: int, hw: int, c: int, launch: GroupNormLaunch) -> tuple[int, tuple[int, int, int]]:
    return _launch_grid(n, hw, c, launch.reduce_block_hw, launch.reduce_min_programs, launch)


def _apply_grid(n: int, hw: int, c: int, launch: GroupNormLaunch) -> tuple[int, tuple[int, int, int]]:
    return _launch_grid(n, hw, c, launch.apply_block_hw, launch.apply_min_programs, launch)


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        num_groups: int,
        eps: float,
        silu: bool,
        shift: torch.Tensor | None,
        launch: GroupNormLaunch,
    ) -> torch.Tensor:
        n, c, h, w_ = x.shape
        hw = h * w_
        g = num_groups
        cg = c // g
        x = x.contiguous(memory_format=torch.channels_last)
        weight_t = torch.ones(c, device=x.device, dtype=torch.float32) if weight is None else weight.contiguous()
        bias_t = torch.zeros(c, device=x.device, dtype=torch.float32) if bias is None else bias.contiguous()
        kind = _DTYPE_KIND[x.dtype]
        has_shift = shift is not None
        if has_shift:
            shift = shift.contiguous()
        shift_arg = shift if has_shift else x  # an unread placeholder pointer without a shift
        rows, grid = _reduce_grid(n, hw, c, launch)
        n_chunks = grid[1]
        chunk_mean = torch.empty((n, n_chunks, c), device=x.device, dtype=torch.float32)
        chunk_m2 = torch.empty_like(chunk_mean)
        _chunk_stats_kernel[grid](
            x, shift_arg, chunk_mean, chunk_m2, hw, c, rows,
            HAS_SHIFT=has_shift, KIND=kind, BLOCK_HW=launch.reduce_block_hw, BLOCK_C=launch.block_c,
            num_warps=launch.num_warps,
        )  # fmt: skip
        mean = torch.empty((n, g), device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_k, block_cg = _finish_blocks(n_chunks, cg, launch)
        _group_stats_kernel[(n, g)](
            chunk_mean, chunk_m2, mean, rstd, hw, c, cg, g, rows, n_chunks, float(hw * cg), float(eps),
            BLOCK_K=block_k, BLOCK_CG=block_cg, num_warps=launch.finish_warps,
        )  # fmt: skip

        y = torch.empty_like(x, memory_format=torch.channels_last)
        rows, grid = _apply_grid(n, hw, c, launch)
        _normalize_kernel[grid](
            x, shift_arg, y, weight_t, bias_t, mean, rstd, hw, c, cg, g, rows,
            SILU=silu, HAS_SHIFT=has_shift, KIND=kind, BLOCK_HW=launch.apply_block_hw, BLOCK_C=launch.block_c,
            num_warps=launch.num_warps,
        )  # fmt: skip

        ctx.save_for_backward(x, weight_t, bias_t, mean, rstd, shift)
        ctx.num_groups = g
        ctx.silu = silu
        ctx.launch = launch
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight_t, bias_t, mean, rstd, shift = ctx.saved_tensors
        launch: GroupNormLaunch = ctx.launch
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        has_shift = shift is not None
        need_dshift = has_shift and ctx.needs_input_grad[6]
        shift_arg = shift if has_shift else x  # an unread placeholder pointer without a shift
        n, c, h, w_ = x.shape
        hw = h * w_
        g = ctx.num_groups
        cg = c // g
        kind = _DTYPE_KIND[x.dtype]
        rows, grid = _reduce_grid(n, hw, c, launch)
        n_chunks = grid[1]
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)

        s1 = torch.empty((n, n_chunks, c), device=x.device, dtype=torch.float32)
        s2 = torch.empty_like(s1)
        _backward_sums_kernel[grid](
            x, shift_arg, dy, weight_t, bias_t, mean, rstd, s1, s2, hw, c, cg, g, rows,
            SILU=ctx.silu, HAS_SHIFT=has_shift, KIND=kind, BLOCK_HW=launch.reduce_block_hw,
            BLOCK_C=launch.block_c, num_warps=launch.num_warps,
        )  # fmt: skip
        coef_a = torch.empty((n, g), device=x.device, dtype=torch.float32)
        coef_b = torch.empty_like(coef_a)
        dweight = torch.empty(c, device=x.device, dtype=torch.float32)
        dbias = torch.empty_like(dweight)
        block_n = max(triton.next_power_of_2(n), 2)
        block_r, block_cg = _finish_blocks(n * n_chunks, cg, launch, per_row=block_n)
        _backward_group_kernel[(g,)](
            s1, s2, weight_t, coef_a, coef_b, dweight, dbias, n, c, cg, g, n_chunks, float(hw * cg),
            BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_CG=block_cg, num_warps=launch.finish_warps,
        )  # fmt: skip
        dweight = dweight.to(weight_t.dtype) if need_dw else None
        dbias = dbias.to(bias_t.dtype) if need_db else None

        dx = dshift = None
        if need_dx or need_dshift:  # the shift's gradient is summed from dx
            dx = torch.empty_like(x, memory_format=torch.channels_last)
            rows, grid = _apply_grid(n, hw, c, launch)
            # Per-(n, row chunk, column) sums of dx; without a shift, an unwritten placeholder.
            partial = torch.empty((n, grid[1], c), device=x.device, dtype=torch.float32) if has_shift else dx
            _backward_dx_kernel[grid](
                x, shift_arg, dy, dx, partial, weight_t, bias_t, mean, rstd, coef_a, coef_b, hw, c, cg, g, rows,
                SILU=ctx.silu, HAS_SHIFT=has_shift, KIND=kind, BLOCK_HW=launch.apply_block_hw,
                BLOCK_C=launch.block_c, num_warps=launch.num_warps,
            )  # fmt: skip
            if need_dshift:
                dshift = partial.sum(1).to(shift.dtype)
            if not need_dx:
                dx = None
        return dx, dweight, dbias, None, None, None, dshift, None


def group_norm_nhwc(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool = False,
    shift: torch.Tensor | None = None,
    launch: GroupNormLaunch = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a channels-last 4-D ``x`` (plus ``shift[:, :, None, None]``, if given)
    with the semantics of :func:`group_norm_reference`.

    Autograd-capable; ``weight`` / ``bias`` may be None (ones / zeros, no gradient); ``shift``, if
    given, is ``[N, C]`` of ``x.dtype`` and gets its gradient.  Returns a channels-last tensor of
    ``x.dtype``.  ``launch``: tile and grid sizes (the numbers do not depend on them beyond the
    summation order).  Check :func:`fused_group_norm_available` first.
    """
    if not _HAS_TRITON:
        raise RuntimeError("group_norm_nhwc needs Triton, which failed to import")
    if not fused_group_norm_available(x, num_groups):
        raise ValueError(
            "group_norm_nhwc needs a 4-D channels-last fp32/fp16/bf16 tensor with C divisible by "
            f"num_groups on a CUDA device (or the Triton interpreter); got shape {tuple(x.shape)}, "
            f"dtype {x.dtype}, device {x.device}, num_groups {num_groups}"
        )
    if shift is not None and (
        tuple(shift.shape) != tuple(x.shape[:2]) or shift.dtype != x.dtype or shift.device != x.device
    ):
        raise ValueError(
            f"group_norm_nhwc's shift must be [N, C] = {tuple(x.shape[:2])} of {x.dtype} on {x.device}; "
            f"got shape {tuple(shift.shape)}, dtype {shift.dtype}, device {shift.device}"
        )
    return _GroupNormNHWC.apply(x, weight, bias, num_groups, float(eps), bool(silu), shift, launch)


def group_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool = False,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The semantics the fused kernel implements: if ``shift`` ([N, C], ``x.dtype``) is given, first
    ``x + shift[:, :, None, None]`` (torch's add in ``x.dtype``); then ``GroupNorm32`` (fp32 statistics
    and affine, rounded to ``x.dtype``), then, if ``silu``, SiLU on that rounded tensor (computed in fp32
    by torch, rounded).  Half-precision parameters (the fp16 teacher's) are used at fp32, as torch's
    fp16 GroupNorm does."""
    if shift is not None:
        x = x + shift[:, :, None, None]
    weight, bias = (None if p is None else p.float() for p in (weight, bias))  # .float() of fp32: the same tensor
    y = F.group_norm(x.float(), num_groups, weight, bias, eps).to(x.dtype)
    return F.silu(y) if silu else y
