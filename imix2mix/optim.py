"""The student's optimizers: torch's AdamW and imix2mix's two variants, behind one interface.

Every optimizer :func:`make_optimizer` returns has ``clip_and_step(max_norm) -> norm`` (clip the
gradients' total norm, then step; the norm before clipping as a device scalar) and ``set_lr(lr)``, so
the loop never asks which variant it holds, and ``close()``, which ends what the optimizer changed in
the model (weight copies).

:class:`AdamWWithComputeCopies` (the default on CUDA): torch's AdamW update on fp32 master weights,
whose chosen parameters compute from bf16 copies written by the update itself.  Same numerics as
torch's fused AdamW under bf16 autocast.

:class:`AdamWLowPrecisionStates` (the lean mode's): AdamW whose moment estimates are stored in a
low-precision dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from imix2mix.config import COPY_OPTIMIZERS
from imix2mix.kernels.adamw import (
    ALIGNMENT_BYTES, DEFAULT_LAUNCH, AdamWLaunch, ChunkPlan, adamw_update, is_dense, join_fp32, moment_seed, split_fp32,
    square_sums, stochastic_round_bf16,
)


class ClipAndStep:
    """The loop's optimizer interface, for optimizers that clip with ``clip_grad_norm_`` and then step."""

    param_groups: list[dict]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    def clip_and_step(self, max_norm: float | None) -> torch.Tensor:
        params = [p for group in self.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm)
        self.step()
        return norm

    def close(self) -> None:
        """Nothing to undo: the parameters were never changed in kind."""


class AdamW(ClipAndStep, torch.optim.AdamW):
    """torch's AdamW (``fused``/``foreach`` as torch's) with the loop's interface."""


def matrix_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights and biases of ``module``'s Linear and Conv layers: the parameters autocast rounds
    to its dtype at every use (norms and embeddings compute in fp32)."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return [p for m in module.modules() if isinstance(m, layers) for p in m.parameters(recurse=False)]


def make_optimizer(
    params: list[torch.nn.Parameter],
    name: str,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    compute_copies: list[torch.nn.Parameter] = (),
    launch: AdamWLaunch = DEFAULT_LAUNCH,
    split_masters: bool = False,
) -> "AdamW | AdamWLowPrecisionStates | AdamWWithComputeCopies":
    """The optimizer called ``name`` (``EditConfig.runtime.optimizer``); ``compute_copies`` (only with
    :data:`COPY_OPTIMIZERS`): the parameters that compute from bf16 copies (:class:`AdamWWithComputeCopies`,
    whose kernels take ``launch``; its moments are bf16 for ``adamw_bf16_states``, with the rounding
    scheme of :class:`AdamWLowPrecisionStates`; ``split_masters``: each copied parameter's fp32 master
    kept as its copy plus an int16 residual)."""
    hyper = adamw_defaults(lr, betas, eps, weight_decay)
    if compute_copies:
        if name not in COPY_OPTIMIZERS:
            raise ValueError(f"bf16 weight copies need one of {', '.join(COPY_OPTIMIZERS)} (got {name})")
        return AdamWWithComputeCopies(
            params, **hyper, compute_copies=compute_copies, compute_dtype=torch.bfloat16, launch=launch,
            state_dtype=torch.bfloat16 if name == "adamw_bf16_states" else torch.float32, split_masters=split_masters,
        )
    if name == "adamw_bf16_states":
        return AdamWLowPrecisionStates(params, **hyper)
    variant = {"adamw": {}, "adamw_fused": {"fused": True}, "adamw_foreach": {"foreach": True}}[name]
    return AdamW(params, **hyper, **variant)


def adamw_defaults(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict:
    """The param-group defaults of an AdamW, checked as torch's AdamW checks them."""
    if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"invalid AdamW hyper-parameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def parameter_streams(param_groups: list[dict]) -> dict[int, int]:
    """Each parameter's position among an optimizer's parameters (group by group): the stream number
    of its bf16 moments' random bits, the same in both AdamW variants."""
    return {id(p): number for number, p in enumerate(p for group in param_groups for p in group["params"])}


class AdamWLowPrecisionStates(ClipAndStep, torch.optim.Optimizer):
    """Same update rule as ``torch.optim.AdamW`` (decoupled weight decay, bias-corrected moments), but
    ``exp_avg`` and ``exp_avg_sq`` live in ``state_dtype`` (bfloat16 by default): half the optimizer
    memory of fp32 AdamW (5 GB instead of 10 GB for SEVA's 1.26 B parameters).  **This changes the
    numerics**, by one named rounding: each moment update is computed in fp32 from the stored bf16
    moment widened exactly, this step's parameter update uses those fp32 moments, and the stored moment
    is them rounded to bf16 **stochastically** (8 bits of mantissa; the upper neighbour with
    probability the remainder's fraction of an ulp, from a counter-based hash of the element, the
    tensor, the moment and the step: :func:`imix2mix.kernels.adamw.stochastic_round_bf16`).  Rounding
    to nearest would freeze ``exp_avg_sq``, whose per-step change at β₂ = 0.999 is under half an ulp
    (the kernel module's docstring says why).  No error feedback.  Parameters stay fp32.  The bf16
    weight copies' fused pass (:class:`AdamWWithComputeCopies` with ``state_dtype=torch.bfloat16``)
    rounds the same way, with the same random bits: a tensor's bits depend on its position among the
    optimizer's parameters, not on the device or the chunking (the fp32 values rounded can differ in
    their last bit: ``lerp`` here, a multiply-add there).

    The update runs over chunks of parameters with ``torch._foreach_*`` kernels, so the fp32 working
    copies of the moments exist for one chunk at a time, never for the whole model.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_dtype: torch.dtype = torch.bfloat16,
        chunk_numel: int = 64 * 2**20,
    ):
        super().__init__(params, adamw_defaults(lr, betas, eps, weight_decay))
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AdamWLowPrecisionStates: moments are fp32 or bf16 (got {state_dtype})")
        self.state_dtype = state_dtype
        self.chunk_numel = chunk_numel
        self.streams = parameter_streams(self.param_groups)

    def _chunks(self, params: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
        chunk: list[torch.Tensor] = []
        size = 0
        for p in params:
            chunk.append(p)
            size += p.numel()
            if size >= self.chunk_numel:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for chunk in self._chunks(params):
                for p in chunk:
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["step"] += 1
                # One step count per chunk: every parameter of a group is stepped together.
                step = self.state[chunk[0]]["step"]
                bias1, bias2 = 1 - beta1**step, 1 - beta2**step
                grads = [p.grad.float() for p in chunk]
                exp_avg = [self.state[p]["exp_avg"].float() for p in chunk]
                exp_avg_sq = [self.state[p]["exp_avg_sq"].float() for p in chunk]
                torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sq, beta2)
                torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
                for p, m, v in zip(chunk, exp_avg, exp_avg_sq):
                    if self.state_dtype == torch.bfloat16:
                        stream = self.streams[id(p)]
                        m, v = (stochastic_round_bf16(x, moment_seed(step, stream, j)) for j, x in enumerate((m, v)))
                    self.state[p]["exp_avg"].copy_(m)
                    self.state[p]["exp_avg_sq"].copy_(v)
                torch._foreach_mul_(chunk, 1 - lr * wd)
                denominator = torch._foreach_sqrt(exp_avg_sq)
                torch._foreach_div_(denominator, bias2**0.5)
                torch._foreach_add_(denominator, eps)
                torch._foreach_addcdiv_(chunk, exp_avg, denominator, value=-lr / bias1)
        return loss


# torch.nn.utils.clip_grad_norm_'s guard against a zero norm.
CLIP_EPS = 1e-6


class AdamWWithComputeCopies(ClipAndStep, torch.optim.Optimizer):
    """torch's AdamW (decoupled weight decay, bias-corrected moments, fp32 master weights and
    moments, or bf16 moments with ``state_dtype``) with gradient-norm clipping folded in, where the parameters in ``compute_copies`` hold a
    ``compute_dtype`` copy of their master weight between steps.  With ``split_masters`` (bf16 copies
    only) a copied parameter's master is not a separate fp32 tensor but the copy plus an int16 residual
    of the bits (:func:`imix2mix.kernels.adamw.split_fp32`): the same fp32 number, rebuilt in the
    update, in 2 bytes instead of 4.

    Under autocast a matrix weight is rounded to bf16 at every use and its gradient, computed in bf16,
    is widened to fp32; here the module computes with the persistent copy (autocast leaves it alone)
    and its gradient stays bf16.  Rounding the master once per step to the copy is what autocast's
    per-use cast computed, and widening a bf16 gradient is exact, so the forward, the backward and the
    update are those of torch's fused AdamW under autocast; only the clip norm's summation order and
    fused multiply-adds in the update differ (docs/benchmarks.md).  The update is one Triton pass per
    kind of tensor (:mod:`imix2mix.kernels.adamw`): CUDA, or CPU under Triton's interpreter.

    Lifecycle: construction swaps each copied parameter's ``.data`` for its copy (the same Parameter
    objects, so modules and captured CUDA graphs see them) and keeps the fp32 tensor as the master;
    :meth:`release` puts the masters back.  Parameters without a gradient in a step are skipped, as
    torch's optimizers do.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        compute_copies: Iterable[torch.nn.Parameter] = (),
        compute_dtype: torch.dtype = torch.bfloat16,
        launch: AdamWLaunch = DEFAULT_LAUNCH,
        state_dtype: torch.dtype = torch.float32,
        split_masters: bool = False,
    ):
        super().__init__(params, adamw_defaults(lr, betas, eps, weight_decay))
        self.launch = launch  # the kernels' chunk and block sizes
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AdamWWithComputeCopies: moments are fp32 or bf16 (got {state_dtype})")
        if split_masters and compute_dtype != torch.bfloat16:
            raise ValueError(f"AdamWWithComputeCopies: split masters need bf16 copies (got {compute_dtype})")
        self.split_masters = split_masters
        self.state_dtype = state_dtype  # the moments'; bf16: rounded as AdamWLowPrecisionStates rounds
        self.streams = parameter_streams(self.param_groups)  # the bf16 moments' random bits per tensor
        copied = {id(p) for p in compute_copies}
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"AdamWWithComputeCopies: parameters must be fp32 masters (got {p.dtype}, shape {tuple(p.shape)})")
                p.grad = None
                if not is_dense(p) or p.data_ptr() % ALIGNMENT_BYTES:
                    p.data = p.data.clone(memory_format=torch.contiguous_format)  # the kernel's layout needs
                state = self.state[p]
                state.update(step=0, master=p.data)  # moments at the first step, as torch's AdamW
                if id(p) in copied and split_masters:
                    state["copy"], state["master"] = split_fp32(p.data)  # the fp32 tensor is freed
                    p.data = state["copy"]
                elif id(p) in copied:
                    state["copy"] = p.data.to(compute_dtype)  # the same strides (preserve_format)
                    p.data = state["copy"]
        # Launch plans, keyed by (group, gradient dtype, copied?, the tensors); a plan's gradient
        # addresses are refreshed when the gradients move (they stay put under CUDA graphs).
        self._plans: dict[tuple, tuple[ChunkPlan, tuple[int, ...]]] = {}
        self.released = False

    def _plan(self, key: tuple, params: list[torch.nn.Parameter]) -> ChunkPlan:
        states = [self.state[p] for p in params]
        for state in states:
            # Allocated lazily: the student's CUDA-graph capture runs between construction and the
            # first step, and the memory its warm-up passes freed is then reused here, as by torch's AdamW.
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(state["master"], dtype=self.state_dtype)
                state["exp_avg_sq"] = torch.zeros_like(state["master"], dtype=self.state_dtype)
        for p, state in zip(params, states):  # a gradient the kernel cannot read in place: copy it once
            grad, master = p.grad, state["master"]
            if grad.stride() != master.stride() or grad.data_ptr() % ALIGNMENT_BYTES:
                p.grad = torch.empty_like(master, dtype=grad.dtype).copy_(grad)
        grads = [p.grad for p in params]
        addresses = tuple(g.data_ptr() for g in grads)
        cached = self._plans.get(key)
        if cached is None:
            copies = [s["copy"] for s in states] if "copy" in states[0] else None
            plan = ChunkPlan.build(
                grads, [s["master"] for s in states], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], copies,
                self.launch, streams=[self.streams[id(p)] for p in params],
            )
        else:
            plan, previous = cached
            if previous != addresses:
                plan.set_grad_addresses(grads)
        self._plans[key] = (plan, addresses)
        return plan

    @torch.no_grad()
    def clip_and_step(self, max_norm: float | None) -> torch.Tensor:
        """Clip the gradients' total 2-norm to ``max_norm`` (None: no clipping) and take one AdamW
        step, without a host sync.  Returns the norm before clipping (a device scalar), as
        ``torch.nn.utils.clip_grad_norm_`` does."""
        if self.released:
            raise RuntimeError("AdamWWithComputeCopies: step after release()")
        launches = []
        for number, group in enumerate(self.param_groups):
            kinds: dict[tuple, list[torch.nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    kinds.setdefault((number, p.grad.dtype, state["master"].dtype, "copy" in state, state["step"]), []).append(p)
            for (*kind, step), params in kinds.items():
                launches.append((group, step, params, self._plan((*kind, tuple(id(p) for p in params)), params)))
        if not launches:
            return torch.zeros((), device=self._device())
        norm = torch.cat([square_sums(plan) for *_, plan in launches]).sum().sqrt()
        if max_norm is None:
            clip = torch.ones((), dtype=torch.float32, device=norm.device)
        else:
            clip = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        for group, step, params, plan in launches:
            beta1, beta2 = group["betas"]
            adamw_update(
                plan, clip, lr=group["lr"], weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                eps=group["eps"], step=step + 1,
            )
            for p in params:
                self.state[p]["step"] = step + 1
        return norm

    def step(self, closure=None):  # type: ignore[override]
        """``torch.optim.Optimizer.step``: one unclipped step (:meth:`clip_and_step` clips too)."""
        loss = closure() if closure is not None else None
        self.clip_and_step(None)
        return loss

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    @torch.no_grad()
    def release(self) -> None:
        """Give the copied parameters their fp32 masters back (the trained values); the copies and
        the moments go with this optimizer.  A split master is joined after its moments are freed, so
        the fp32 weights never coexist with all the moments."""
        for state_p, state in self.state.items():
            if "copy" in state:
                state_p.grad = None
                if state["master"].dtype == torch.int16:
                    state.pop("exp_avg", None)
                    state.pop("exp_avg_sq", None)
                    state["master"] = join_fp32(state.pop("copy"), state["master"])
                state_p.data = state["master"]
        self.released = True

    def close(self) -> None:
        """:meth:`release`, once."""
        if not self.released:
            self.release()

    def master(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 master weight behind ``p`` (a split one joined: a new tensor)."""
        state = self.state[p]
        if state["master"].dtype == torch.int16:
            return join_fp32(state["copy"], state["master"])
        return state["master"]
