"""Self-attention over very short sequences (SEVA's time-mix: one sequence of T views per pixel), in
Triton, with backward.

Why this exists: the time-mix blocks attend over T = 5 frames at each of 25920 (72²·5/5 …) spatial
positions.  The flash / cuDNN kernels tile queries and keys by 64–128, so a 5-token sequence fills
under a tenth of each tile, and the whole-iteration profile showed about 10 ms per iteration in these
calls on an H100 (forward about 0.4 ms, backward about 0.7 ms per 72² layer) for a few MB of data.
Here one program handles a few (sequence, head) pairs entirely in registers: it reads q, k and v once
and writes the output once; the backward reads q, k, v, the output and its gradient once and writes
dq, dk, dv once.  It also reads and writes the projections' ``[B, L, heads·head_dim]`` layout
directly, so the head transposes around the attention call go away too.

Numerics: the scores, the softmax and both products run in fp32 on the (bf16/fp16) inputs; only the
outputs are rounded.  That is at least as accurate as the flash kernels (which round the
probabilities to bf16 before the second product); the tests compare with attention computed in fp32.

Forward: an online softmax over the L keys (a static loop), per-row log-sum-exp saved for backward.
Backward: per key j, ``p = exp(s - lse)``, ``dv_j = Σ_i p_i do_i``, ``ds = p (do·v_j - Σ do·o)``,
``dq += ds k_j``, ``dk_j = Σ_i ds_i q_i`` (times the scale).

Triton is optional and, on CPU, interpreted: see :mod:`imix2mix.kernels.triton_support`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imix2mix.kernels.triton_support import DTYPE_KIND as _DTYPE_KIND
from imix2mix.kernels.triton_support import HAS_TRITON as _HAS_TRITON
from imix2mix.kernels.triton_support import interpreter_on as _interpreter_on
from imix2mix.kernels.triton_support import tl, triton

# Longest sequence and widest head handled (a program keeps BLOCK_B × L × head_dim fp32 values of
# several tensors in registers).
MAX_LEN = 16
MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class ShortAttentionLaunch:
    """Sequences per program and warps of the short-attention kernels."""

    # 16 × 8 (L = 5 padded) × 64 = 8192 fp32 per live tensor at 4 warps.  On an H100 at the 72² level
    # (fwd + bwd, kernel time): 0.72 ms with 4, 0.29 with 8, 0.16 with 16 (0.38 with 16 at 8 warps);
    # SDPA with its head transposes 1.15 ms; the memory floor 0.05 ms.  A power of two.
    block_b: int = 16
    num_warps: int = 4


DEFAULT_LAUNCH = ShortAttentionLaunch()

if _HAS_TRITON:

    from imix2mix.kernels.triton_support import round_to_kind as _round_to_kind

    @triton.jit
    def _rows(B, H, L: tl.constexpr, D: tl.constexpr, LP: tl.constexpr, DP: tl.constexpr, BLOCK_B: tl.constexpr):
        """This program's sequences and head: [BLOCK_B, LP, DP] offsets and mask of its rows in the
        [B, L, H·D] layout, the [BLOCK_B, DP] offsets of key 0 and their mask, and the [BLOCK_B, LP]
        offsets into the [B, H, L] log-sum-exp buffer."""
        seqs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        head = tl.program_id(1)
        pos = tl.arange(0, LP)
        dims = tl.arange(0, DP)
        seq_ok = seqs < B
        dim_ok = dims < D
        seq_base = seqs.to(tl.int64) * (L * H * D) + head * D
        offs = seq_base[:, None, None] + pos[None, :, None] * (H * D) + dims[None, None, :]
        mask = seq_ok[:, None, None] & (pos < L)[None, :, None] & dim_ok[None, None, :]
        key_offs = seq_base[:, None] + dims[None, :]
        key_mask = seq_ok[:, None] & dim_ok[None, :]
        lse_offs = (seqs.to(tl.int64) * H + head)[:, None] * L + pos[None, :]
        lse_mask = seq_ok[:, None] & (pos < L)[None, :]
        return offs, mask, key_offs, key_mask, lse_offs, lse_mask

    @triton.jit
    def _short_attention_forward(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, B, H, scale,
        L: tl.constexpr, D: tl.constexpr, LP: tl.constexpr, DP: tl.constexpr,
        BLOCK_B: tl.constexpr, KIND: tl.constexpr,
    ):  # fmt: skip
        offs, mask, key_offs, key_mask, lse_offs, lse_mask = _rows(B, H, L, D, LP, DP, BLOCK_B)
        q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
        m = tl.full([BLOCK_B, LP], float("-inf"), tl.float32)
        denominator = tl.zeros([BLOCK_B, LP], tl.float32)
        acc = tl.zeros([BLOCK_B, LP, DP], tl.float32)
        for j in tl.static_range(L):
            k_j = tl.load(k_ptr + key_offs + j * H * D, mask=key_mask, other=0.0).to(tl.float32)
            v_j = tl.load(v_ptr + key_offs + j * H * D, mask=key_mask, other=0.0).to(tl.float32)
            s = tl.sum(q * k_j[:, None, :], axis=2)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            denominator = denominator * alpha + p
            acc = acc * alpha[:, :, None] + p[:, :, None] * v_j[:, None, :]
            m = m_new
        o = _round_to_kind(acc / denominator[:, :, None], KIND)
        tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(lse_ptr + lse_offs, m + tl.log(denominator), mask=lse_mask)

    @triton.jit
    def _short_attention_backward(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, B, H, scale,
        L: tl.constexpr, D: tl.constexpr, LP: tl.constexpr, DP: tl.constexpr,
        BLOCK_B: tl.constexpr, KIND: tl.constexpr,
    ):  # fmt: skip
        offs, mask, key_offs, key_mask, lse_offs, lse_mask = _rows(B, H, L, D, LP, DP, BLOCK_B)
        q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        delta = tl.sum(do * o, axis=2)  # [BLOCK_B, LP]: Σ_j p_j (do · v_j)
        lse = tl.load(lse_ptr + lse_offs, mask=lse_mask, other=0.0)
        dq = tl.zeros([BLOCK_B, LP, DP], tl.float32)
        for j in tl.static_range(L):
            k_j = tl.load(k_ptr + key_offs + j * H * D, mask=key_mask, other=0.0).to(tl.float32)
            v_j = tl.load(v_ptr + key_offs + j * H * D, mask=key_mask, other=0.0).to(tl.float32)
            s = tl.sum(q * k_j[:, None, :], axis=2) * scale
            p = tl.where(lse_mask, tl.exp(s - lse), 0.0)  # padded query rows take no part
            dv_j = tl.sum(p[:, :, None] * do, axis=1)
            ds = p * (tl.sum(do * v_j[:, None, :], axis=2) - delta)
            dq += ds[:, :, None] * k_j[:, None, :]
            dk_j = tl.sum(ds[:, :, None] * q, axis=1) * scale
            tl.store(dk_ptr + key_offs + j * H * D, _round_to_kind(dk_j, KIND).to(dk_ptr.dtype.element_ty), mask=key_mask)
            tl.store(dv_ptr + key_offs + j * H * D, _round_to_kind(dv_j, KIND).to(dv_ptr.dtype.element_ty), mask=key_mask)
        tl.store(dq_ptr + offs, _round_to_kind(dq * scale, KIND).to(dq_ptr.dtype.element_ty), mask=mask)


def short_attention_available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether :func:`short_attention` can run (else use SDPA): Triton, CUDA tensors (or the
    interpreter), one fp32/fp16/bf16 dtype, self-attention shapes ``[B, L, heads·head_dim]`` alike
    and contiguous, 1 <= L <= MAX_LEN and head_dim <= MAX_HEAD_DIM."""
    if not _HAS_TRITON or q.dim() != 3 or q.dtype not in _DTYPE_KIND:
        return False
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        return False
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()) or q.numel() == 0:
        return False
    width = q.shape[-1]
    if heads < 1 or width % heads or width // heads > MAX_HEAD_DIM or q.shape[1] > MAX_LEN:
        return False
    return bool(q.is_cuda or _interpreter_on())


def _launch(q: torch.Tensor, heads: int, launch: ShortAttentionLaunch) -> tuple[tuple[int, int], dict]:
    batch, length, width = q.shape
    head_dim = width // heads
    meta = dict(
        L=length, D=head_dim, LP=max(triton.next_power_of_2(length), 2), DP=triton.next_power_of_2(head_dim),
        BLOCK_B=launch.block_b, KIND=_DTYPE_KIND[q.dtype], num_warps=launch.num_warps,
    )  # fmt: skip
    return (triton.cdiv(batch, launch.block_b), heads), meta


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, launch: ShortAttentionLaunch) -> torch.Tensor:  # type: ignore[override]
        batch, length, width = q.shape
        scale = 1.0 / math.sqrt(width // heads)
        o = torch.empty_like(q)
        lse = torch.empty((batch, heads, length), device=q.device, dtype=torch.float32)
        grid, meta = _launch(q, heads, launch)
        _short_attention_forward[grid](q, k, v, o, lse, batch, heads, scale, **meta)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.heads, ctx.scale, ctx.launch = heads, scale, launch
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        do = do.to(q.dtype).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grid, meta = _launch(q, ctx.heads, ctx.launch)
        _short_attention_backward[grid](q, k, v, o, do, lse, dq, dk, dv, q.shape[0], ctx.heads, ctx.scale, **meta)
        return dq, dk, dv, None, None


def short_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, launch: ShortAttentionLaunch = DEFAULT_LAUNCH
) -> torch.Tensor:
    """Multi-head self-attention (softmax scale ``head_dim ** -0.5``) of ``[B, L, heads·head_dim]``
    projections, returned in the same layout; the semantics of :func:`short_attention_reference`
    computed in fp32.  Autograd-capable; ``launch``: sequences per program.  Check :func:`short_attention_available` first."""
    if not short_attention_available(q, k, v, heads):
        raise ValueError(
            f"short_attention needs Triton and contiguous [B, L <= {MAX_LEN}, heads·head_dim <= "
            f"{MAX_HEAD_DIM}] q, k, v of one fp32/fp16/bf16 dtype on a CUDA device (or the Triton "
            f"interpreter); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, heads "
            f"{heads}, dtype {q.dtype}, device {q.device}"
        )
    return _ShortAttention.apply(q, k, v, heads, launch)


def short_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same function through SDPA: ``[B, L, heads·head_dim]`` in and out."""
    batch, length, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, heads, width // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(batch, length, width)
