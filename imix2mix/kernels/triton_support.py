"""What the package's Triton kernels share: the guarded import, the output-dtype kinds and their rounding.

Triton is optional (CPU-only installs and macOS have none): this module imports without it and says
so in :data:`HAS_TRITON`.  On CPU the kernels run only under Triton's interpreter, which must be on
(``TRITON_INTERPRET=1``) before this module is first imported: Triton decides at decoration time
whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 (a broken Triton install must not break importing the model code)
    triton = None
    tl = None
    HAS_TRITON = False

# Whether the kernels were built for the interpreter (fixed when they are decorated).
KERNELS_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

# How a kernel rounds its fp32 results to the output dtype (a constexpr).
KIND_FP32, KIND_FP16, KIND_BF16 = 0, 1, 2
DTYPE_KIND = {torch.float32: KIND_FP32, torch.float16: KIND_FP16, torch.bfloat16: KIND_BF16}


def interpreter_on() -> bool:
    """Whether kernels may run on CPU tensors (built for, and still in, interpreter mode)."""
    return KERNELS_INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: Triton, and CUDA (or the interpreter on CPU)."""
    return HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreter_on()))


if HAS_TRITON:

    @triton.jit
    def round_to_kind(v, KIND: tl.constexpr):
        """fp32 ``v`` rounded to the output dtype (round to nearest even), returned as fp32."""
        if KIND == 2:
            # bf16 rounding by integer arithmetic: the Triton interpreter truncates on fp32 -> bf16
            # casts, so doing it by hand gives torch's RTNE on CPU and GPU alike; the later cast to
            # bf16 is then exact.  NaNs pass through untouched (the carry could turn them to inf).
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            bits = (bits >> 16) << 16
            return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
        elif KIND == 1:
            return v.to(tl.float16).to(tl.float32)
        else:
            return v
