"""AdamW over fp32 master weights in one Triton pass that also writes the low-precision copies the
model computes with; and, before it, the gradients' squared norm for clipping (no host sync).

Why this exists: under bf16 autocast every matrix weight of the student is cast fp32 → bf16 at each
use, and each of its gradients bf16 → fp32 on the way back.  On SEVA (1.26 B parameters) that is
about 2,000 cast kernels and 15 GB of memory traffic per iteration, before torch's fused AdamW reads
the fp32 gradients again.  Keeping the bf16 copy between iterations, written by the optimizer's own
pass, removes both casts; the gradients stay in bf16, the values autocast computed before widening
them (exactly) to fp32.  The update is torch's fused AdamW's, in fp32, on fp32 master weights and
moments: ``p ← p − lr·wd·p``, ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
``p ← p − (lr/(1−β₁ᵗ))·m / (√v/√(1−β₂ᵗ) + ε)``, with ``g`` the gradient times the clip coefficient;
square root and divisions IEEE-rounded as in torch's CUDA kernel.  The moments may instead be kept in
bf16 (``adamw_bf16_states``, the 24gb memory profile): each is read and widened to fp32, updated and
used for this step's update in fp32, and stored **stochastically rounded** to bf16, the scheme of
:class:`imix2mix.optim.AdamWLowPrecisionStates`.

Stochastic rounding, and why: with β₂ = 0.999 a step changes ``v`` by about 0.1 % of itself, less
than half a bf16 ulp (2⁻⁹ ≈ 0.2 %), so rounding to nearest would store ``v`` unchanged: it could
only ratchet up on large gradients and never decay, and the step sizes drift from fp32 AdamW's over
a 2,150-iteration run.  Rounding up with probability equal to the remainder's fraction of an ulp
keeps every stored moment unbiased.  The random bits are a counter-based hash, not a generator's
state, so a run is reproducible and the torch reference :func:`stochastic_round_bf16` computes the
same bits: for storage element ``i`` of the tensor numbered ``stream`` (its position in the
optimizer's parameters), moment ``j`` (0: ``m``, 1: ``v``) at step ``t``, the 16 bits added below
the bf16 mantissa are the low half of ``h(i ⊕ h(h(2·stream + j) + (t·φ mod 2³¹)))``, with ``h`` the
``lowbias32`` integer hash (:func:`hash32`) and φ = 0x9E3779B9 (2³² / golden ratio, so consecutive
steps land far apart); all arithmetic modulo 2³².  ``t·φ mod 2³¹`` is computed on the host: under
2³¹ it is a 32-bit kernel argument whatever Triton specializes it to, and adds as unsigned.

Split masters (``split_master_weights``, the 24gb memory profile): a copied tensor's fp32 master may be
kept as two halves instead of a separate fp32 tensor beside its copy: the copy itself (the master
rounded to nearest even, which is what the model computes with anyway) and an int16 **residual**, the
master's bits minus the copy's (:func:`split_fp32`, :func:`join_fp32`).  The master is the same fp32
number, rebuilt exactly in the kernel, so the update is unchanged; 2 bytes per parameter instead of 4
(2.35 GiB less on SEVA).  One exception: a master exactly halfway between two bf16 values that
rounds down would need a residual of +2¹⁵, one more than int16 holds; it is stored one fp32 ulp
smaller (still rounding to the same copy): about one element in 65,536 when the masters are first
split, and per step.

Layout: each tensor is cut into chunks of ``AdamWLaunch.chunk`` elements of its storage.  The master, its moments,
its copy and its gradient are dense with the same strides, so storage element ``i`` is the same
parameter entry in all five.  A chunk table gives each program its tensor and chunk; the tensors'
addresses sit in an int64 table (:class:`ChunkPlan`), so one launch covers every tensor of a kind.
Full chunks load without masks; addresses are 16-byte aligned (checked on the host) and rounded so
in the kernel, which lets Triton use vector loads.  Shapes depend on the parameters alone.

Triton is optional and, on CPU, interpreted: see :mod:`imix2mix.kernels.triton_support`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imix2mix.kernels.triton_support import DTYPE_KIND as _DTYPE_KIND
from imix2mix.kernels.triton_support import HAS_TRITON as _HAS_TRITON
from imix2mix.kernels.triton_support import tl, triton, triton_runs_on


@dataclass(frozen=True)
class AdamWLaunch:
    """Chunk and block sizes of the AdamW kernels (powers of two; ``chunk`` a multiple of ``block``).
    Not tuned."""

    # Elements per program: 1.26 B parameters make about 40k programs.
    chunk: int = 32768
    # Elements per loop step: 8 fp32 per thread at 4 warps (two 16-byte loads per tensor).
    block: int = 1024
    num_warps: int = 4


DEFAULT_LAUNCH = AdamWLaunch()
ALIGNMENT_BYTES = 16
NO_COPY = -1  # the copy kind of tensors that have no low-precision copy (they compute in fp32)
# lowbias32 (C. Wellons, "Prospecting for hash functions", 2018): two multiply-xorshift rounds whose
# constants were searched for the lowest avalanche bias of any 32-bit hash of that shape.
HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
STEP_STRIDE = 0x9E3779B9  # φ = 2^32 / golden ratio: step t's seed input is t·φ mod 2^31 (STEP_KEY_MASK)
STEP_KEY_MASK = 2**31 - 1
LOW_HALF = 0xFFFF  # the 16 fp32 mantissa bits below a bf16's: a random amount of them is added
# The master kinds: an fp32 tensor (KIND_FP32 = 0), or split into the bf16 copy and an int16 residual.
MASTER_SPLIT = 3
# The largest residual int16 holds: the master bits minus the copy's lie in [-2^15, 2^15].
RESIDUAL_MAX = 2**15 - 1

# Rows of ChunkPlan.addresses.
GRAD, MASTER, EXP_AVG, EXP_AVG_SQ, COPY = range(5)

if _HAS_TRITON:

    from imix2mix.kernels.triton_support import round_to_kind as _round_to_kind

    @triton.jit
    def _pointer(address, KIND: tl.constexpr):
        """A 16-byte-aligned address as a typed pointer; the rounding (a no-op: the host checked the
        alignment) tells Triton's alignment analysis so."""
        address = (address // 16) * 16
        if KIND == 3:  # MASTER_SPLIT: the int16 residuals
            return address.to(tl.pointer_type(tl.int16))
        elif KIND == 2:
            return address.to(tl.pointer_type(tl.bfloat16))
        elif KIND == 1:
            return address.to(tl.pointer_type(tl.float16))
        else:
            return address.to(tl.pointer_type(tl.float32))

    @triton.jit
    def _hash32(x):
        """lowbias32 of uint32 ``x`` (:func:`hash32` is its torch reference)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D  # HASH_MULTIPLIERS
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _moment_seed(stream, step_key, MOMENT: tl.constexpr):
        """The seed of one tensor's moment at one step (:func:`moment_seed`); ``step_key`` is
        t·φ mod 2³¹ from the host (an int32, or a constexpr where Triton specializes it)."""
        key = _hash32(stream.to(tl.uint32) * 2 + MOMENT)
        return _hash32(key + step_key)  # uint32 + int32: uint32, modulo 2^32

    @triton.jit
    def _stochastic_round_bf16(v, index, seed):
        """fp32 ``v`` rounded to bf16 stochastically (returned as fp32 with the low half zero, so the
        store's cast is exact); NaNs pass through, as in ``round_to_kind``."""
        noise = _hash32(index.to(tl.uint32) ^ seed) & 0xFFFF  # LOW_HALF
        bits = (v.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))

    @triton.jit
    def _square_sum_kernel(
        chunk_tensor_ptr, chunk_index_ptr, numel_ptr, grad_address_ptr, partial_ptr,
        GRAD_KIND: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        tensor = tl.load(chunk_tensor_ptr + program)
        start = tl.load(chunk_index_ptr + program).to(tl.int64) * CHUNK
        numel = tl.load(numel_ptr + tensor)
        grad = _pointer(tl.load(grad_address_ptr + tensor), GRAD_KIND)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if start + CHUNK <= numel:
            for offset in range(0, CHUNK, BLOCK):
                g = tl.load(grad + start + offset + tl.arange(0, BLOCK)).to(tl.float32)
                acc += g * g
        else:
            for offset in range(0, CHUNK, BLOCK):
                index = start + offset + tl.arange(0, BLOCK)
                g = tl.load(grad + index, mask=index < numel, other=0.0).to(tl.float32)
                acc += g * g
        tl.store(partial_ptr + program, tl.sum(acc, axis=0))

    @triton.jit
    def _adamw_block(
        grad, master, exp_avg, exp_avg_sq, copy, index, mask, clip,
        lr, weight_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, seed_m, seed_v,
        COPY_KIND: tl.constexpr, MOMENT_KIND: tl.constexpr, MASTER_KIND: tl.constexpr,
    ):
        g = tl.load(grad + index, mask=mask).to(tl.float32) * clip
        if MASTER_KIND == 0:
            p = tl.load(master + index, mask=mask)
        else:  # split: the copy's bits (widening bf16 is exact: the low half is zero) plus the residual
            high = tl.load(copy + index, mask=mask).to(tl.float32).to(tl.uint32, bitcast=True)
            low = tl.load(master + index, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
            p = (high + low).to(tl.float32, bitcast=True)  # modulo 2^32: a negative residual subtracts
        m = tl.load(exp_avg + index, mask=mask).to(tl.float32)
        v = tl.load(exp_avg_sq + index, mask=mask).to(tl.float32)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        denominator = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denominator)
        if MASTER_KIND == 0:
            tl.store(master + index, p, mask=mask)
        else:
            rounded = _round_to_kind(p, 2)
            # Same sign, so the difference of the bit patterns is the difference of the magnitudes' bits.
            residual = p.to(tl.int32, bitcast=True) - rounded.to(tl.int32, bitcast=True)
            tl.store(master + index, tl.minimum(residual, 32767).to(tl.int16), mask=mask)  # RESIDUAL_MAX
        if MOMENT_KIND == 0:
            tl.store(exp_avg + index, m, mask=mask)
            tl.store(exp_avg_sq + index, v, mask=mask)
        else:  # bf16 moments: this step used the fp32 values; what is kept is them rounded stochastically
            tl.store(exp_avg + index, _stochastic_round_bf16(m, index, seed_m), mask=mask)
            tl.store(exp_avg_sq + index, _stochastic_round_bf16(v, index, seed_v), mask=mask)
        if COPY_KIND >= 0:
            tl.store(copy + index, _round_to_kind(p, COPY_KIND), mask=mask)  # exact: already rounded

    @triton.jit
    def _adamw_kernel(
        chunk_tensor_ptr, chunk_index_ptr, numel_ptr, address_ptr, stream_ptr, num_tensors, clip_ptr,
        lr, weight_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, step_key,
        GRAD_KIND: tl.constexpr, COPY_KIND: tl.constexpr, MOMENT_KIND: tl.constexpr, MASTER_KIND: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        tensor = tl.load(chunk_tensor_ptr + program)
        start = tl.load(chunk_index_ptr + program).to(tl.int64) * CHUNK
        numel = tl.load(numel_ptr + tensor)
        grad = _pointer(tl.load(address_ptr + tensor), GRAD_KIND)
        master = _pointer(tl.load(address_ptr + num_tensors + tensor), MASTER_KIND)
        exp_avg = _pointer(tl.load(address_ptr + 2 * num_tensors + tensor), MOMENT_KIND)
        exp_avg_sq = _pointer(tl.load(address_ptr + 3 * num_tensors + tensor), MOMENT_KIND)
        copy = _pointer(tl.load(address_ptr + 4 * num_tensors + tensor), COPY_KIND)
        clip = tl.load(clip_ptr)
        seed_m, seed_v = 0, 0
        if MOMENT_KIND != 0:
            stream = tl.load(stream_ptr + tensor)
            seed_m = _moment_seed(stream, step_key, 0)
            seed_v = _moment_seed(stream, step_key, 1)
        if start + CHUNK <= numel:
            for offset in range(0, CHUNK, BLOCK):
                _adamw_block(
                    grad, master, exp_avg, exp_avg_sq, copy, start + offset + tl.arange(0, BLOCK), None, clip,
                    lr, weight_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, seed_m, seed_v,
                    COPY_KIND, MOMENT_KIND, MASTER_KIND,
                )
        else:
            for offset in range(0, CHUNK, BLOCK):
                index = start + offset + tl.arange(0, BLOCK)
                _adamw_block(
                    grad, master, exp_avg, exp_avg_sq, copy, index, index < numel, clip,
                    lr, weight_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, seed_m, seed_v,
                    COPY_KIND, MOMENT_KIND, MASTER_KIND,
                )


def split_fp32(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``master`` → (its bf16 copy, rounded to nearest even; the int16 residual of the bits):
    the torch reference of the kernel's split store (exact ties that round down keep a residual of
    :data:`RESIDUAL_MAX`, one fp32 ulp short).  Strides are kept."""
    copy = master.to(torch.bfloat16)  # a dense tensor's strides, exactly (preserve_format)
    residual = torch.empty_like(master, dtype=torch.int16)  # likewise, where arithmetic might not be
    # (size-1 dims of a channels-last weight: any stride is dense, and an op may pick another one)
    residual.copy_((master.view(torch.int32) - copy.float().view(torch.int32)).clamp_(max=RESIDUAL_MAX))
    return copy, residual


def join_fp32(copy: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The fp32 master of a split one (the torch reference of the kernel's load)."""
    master = torch.empty_like(copy, dtype=torch.float32)  # the copy's strides
    master.view(torch.int32).copy_(copy.float().view(torch.int32) + residual.to(torch.int32))
    return master


MASK32 = 2**32 - 1


def _times_mod32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x · constant`` modulo 2³² for int64 ``x`` in [0, 2³²), without int64 overflow: the constant
    in 16-bit halves."""
    low, high = constant & LOW_HALF, constant >> 16
    return (x * low + (((x * high) & LOW_HALF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of each element of int64 ``x`` (taken modulo 2³²): the kernel's random bits, in torch."""
    first, second = HASH_MULTIPLIERS
    x = x & MASK32
    x = _times_mod32(x ^ (x >> 16), first)
    x = _times_mod32(x ^ (x >> 15), second)
    return x ^ (x >> 16)


def step_key(step: int) -> int:
    """Step ``step``'s input to the moments' seeds, t·φ mod 2³¹ (the kernel's ``step_key`` argument)."""
    return (step * STEP_STRIDE) & STEP_KEY_MASK


def moment_seed(step: int, stream: int, moment: int) -> int:
    """The seed of moment ``moment`` (0: ``exp_avg``, 1: ``exp_avg_sq``) of the tensor numbered
    ``stream`` at AdamW step ``step`` (module docstring)."""
    key = int(hash32(torch.tensor(2 * stream + moment)))
    return int(hash32(torch.tensor((key + step_key(step)) & MASK32)))


def stochastic_round_bf16(v: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 ``v`` (dense, any strides) rounded to bf16 with the kernel's random bits for ``seed``: the
    torch reference of its bf16 moment store.  Each result is one of the two bf16 neighbours of its
    input, the upper one with probability the remainder's fraction of an ulp."""
    if not is_dense(v) or v.dtype != torch.float32:
        raise ValueError(f"stochastic_round_bf16: needs a dense fp32 tensor (got {v.dtype}, strides {v.stride()})")
    index = torch.empty_like(v, dtype=torch.int64)  # storage element numbers, in v's layout
    index.as_strided((v.numel(),), (1,)).copy_(torch.arange(v.numel(), device=v.device))  # no host copy on CUDA
    noise = hash32(index ^ seed) & LOW_HALF
    bits = (v.view(torch.int32).to(torch.int64) & MASK32) + noise
    bits = bits & 0xFFFF0000  # modulo 2^32, as the kernel's uint32
    rounded = (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)  # the sign bit back to int32's
    return torch.where(torch.isnan(v), v, rounded).to(torch.bfloat16)


def fused_adamw_available(device: torch.device) -> bool:
    """Whether :func:`square_sums` and :func:`adamw_update` can run on ``device``: Triton, and CUDA
    (or the interpreter on CPU)."""
    return triton_runs_on(device)


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span without gaps or overlaps (any dim order)."""
    return torch.empty_like(t).stride() == t.stride()


@dataclass
class ChunkPlan:
    """One launch's worth of tensors of one kind (gradient dtype, copy dtype): which tensor and chunk
    each program handles, the tensors' sizes and their five addresses (rows GRAD … COPY; 0 where a
    tensor has no copy)."""

    chunk_tensor: torch.Tensor  # [chunks] int32
    chunk_index: torch.Tensor  # [chunks] int32, the chunk's number within its tensor
    numel: torch.Tensor  # [tensors] int64
    addresses: torch.Tensor  # [5, tensors] int64
    streams: torch.Tensor  # [tensors] int32, each tensor's number in the optimizer (its random bits)
    grad_kind: int
    copy_kind: int
    moment_kind: int  # fp32, or bf16 moments (rounded stochastically on store)
    master_kind: int  # fp32 masters, or MASTER_SPLIT: int16 residuals beside bf16 copies
    partial: torch.Tensor  # [chunks] fp32, the gradient's squared sums per chunk
    launch: AdamWLaunch  # its chunk size laid the chunks out

    @staticmethod
    def build(
        grads: list[torch.Tensor],
        masters: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        copies: list[torch.Tensor] | None,
        launch: AdamWLaunch = DEFAULT_LAUNCH,
        streams: list[int] | None = None,
    ) -> "ChunkPlan":
        """Check that the tensors line up (same shape and strides, dense, aligned, the right dtypes)
        and lay out their chunks of ``launch.chunk`` elements.  ``copies`` None: the tensors compute
        in fp32.  ``masters`` are fp32, or int16 residuals of split masters (then ``copies`` are bf16).
        ``streams``: each tensor's number for the bf16 moments' random bits (default 0, 1, …)."""
        if not grads:
            raise ValueError("ChunkPlan needs at least one tensor")
        device = masters[0].device
        grad_dtype = grads[0].dtype
        copy_dtype = copies[0].dtype if copies else None
        columns = list(zip(grads, masters, exp_avgs, exp_avg_sqs, copies or [None] * len(grads)))
        for number, (grad, *states, copy) in enumerate(columns):
            tensors = [grad, *states] + ([copy] if copy is not None else [])
            problems = []
            if any(t.shape != grad.shape or t.stride() != grad.stride() or t.device != device for t in tensors):
                problems.append("shapes, strides or devices differ")
            if not is_dense(grad):
                problems.append("not dense")
            if any(t.data_ptr() % ALIGNMENT_BYTES for t in tensors):
                problems.append(f"not {ALIGNMENT_BYTES}-byte aligned")
            if grad.dtype != grad_dtype or (copy is not None and copy.dtype != copy_dtype):
                problems.append("dtypes differ from the first tensor's")
            master, exp_avg, exp_avg_sq = states
            if master.dtype not in (torch.float32, torch.int16) or master.dtype != masters[0].dtype:
                problems.append("master weights must be fp32, or all int16 residuals")
            elif master.dtype == torch.int16 and (copy is None or copy.dtype != torch.bfloat16):
                problems.append("split masters' residuals need bf16 copies")
            if exp_avg.dtype != exp_avgs[0].dtype or exp_avg_sq.dtype != exp_avg.dtype:
                problems.append("the moments' dtypes differ")
            if exp_avg.dtype not in (torch.float32, torch.bfloat16):
                problems.append("moments must be fp32 or bf16")
            if problems:
                raise ValueError(f"ChunkPlan: tensor {number} of shape {tuple(grad.shape)}: {'; '.join(problems)}")
        numel = [g.numel() for g in grads]
        chunks_per_tensor = [-(-n // launch.chunk) for n in numel]
        chunk_tensor = torch.repeat_interleave(torch.arange(len(grads), dtype=torch.int32), torch.tensor(chunks_per_tensor))
        chunk_index = torch.cat([torch.arange(c, dtype=torch.int32) for c in chunks_per_tensor])
        addresses = [[t.data_ptr() for t in row] for row in (grads, masters, exp_avgs, exp_avg_sqs)]
        addresses.append([c.data_ptr() for c in copies] if copies else [0] * len(grads))
        return ChunkPlan(
            chunk_tensor=chunk_tensor.to(device),
            chunk_index=chunk_index.to(device),
            numel=torch.tensor(numel, dtype=torch.int64, device=device),
            addresses=torch.tensor(addresses, dtype=torch.int64, device=device),
            streams=torch.tensor(list(range(len(grads))) if streams is None else streams, dtype=torch.int32, device=device),
            grad_kind=_DTYPE_KIND[grad_dtype],
            copy_kind=NO_COPY if copy_dtype is None else _DTYPE_KIND[copy_dtype],
            moment_kind=_DTYPE_KIND[exp_avgs[0].dtype],
            master_kind=MASTER_SPLIT if masters[0].dtype == torch.int16 else _DTYPE_KIND[torch.float32],
            partial=torch.empty(len(chunk_tensor), dtype=torch.float32, device=device),
            launch=launch,
        )

    @property
    def num_tensors(self) -> int:
        return self.numel.numel()

    def set_grad_addresses(self, grads: list[torch.Tensor]) -> None:
        """Point the plan at new gradient tensors (same shapes, strides and dtype as built with)."""
        addresses = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        if self.addresses.is_cuda:
            addresses = addresses.pin_memory()  # an asynchronous copy: no host sync in the loop
        self.addresses[GRAD].copy_(addresses, non_blocking=True)


def square_sums(plan: ChunkPlan) -> torch.Tensor:
    """The gradients' squared sums per chunk (fp32; ``plan.partial``, overwritten)."""
    if not len(plan.partial):
        return plan.partial
    _square_sum_kernel[(len(plan.partial),)](
        plan.chunk_tensor, plan.chunk_index, plan.numel, plan.addresses[GRAD], plan.partial,
        GRAD_KIND=plan.grad_kind, CHUNK=plan.launch.chunk, BLOCK=plan.launch.block, num_warps=plan.launch.num_warps,
    )
    return plan.partial


def adamw_update(
    plan: ChunkPlan,
    clip: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> None:
    """One AdamW step of every tensor in ``plan`` (all at step number ``step`` ≥ 1), the gradients
    first multiplied by ``clip`` (a one-element fp32 tensor on the device, so that clipping needs no
    host sync); writes masters, moments and copies in place."""
    if step < 1:
        raise ValueError(f"adamw_update: step must be ≥ 1 (got {step})")
    if not len(plan.partial):
        return
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    _adamw_kernel[(len(plan.partial),)](
        plan.chunk_tensor, plan.chunk_index, plan.numel, plan.addresses, plan.streams, plan.num_tensors, clip,
        lr, weight_decay, beta1, beta2, eps, lr / bias_correction1, bias_correction2**0.5, step_key(step),
        GRAD_KIND=plan.grad_kind, COPY_KIND=plan.copy_kind, MOMENT_KIND=plan.moment_kind, MASTER_KIND=plan.master_kind,
        CHUNK=plan.launch.chunk, BLOCK=plan.launch.block, num_warps=plan.launch.num_warps,
    )
