"""CUDA-graph replay of the student's training step (forward and backward)."""

from __future__ import annotations

import contextlib
import gc

import torch


class _StudentWithFrameCount(torch.nn.Module):
    """The student with ``num_frames`` bound, so a CUDA-graph capture sees tensor arguments only."""

    def __init__(self, network: torch.nn.Module, num_frames: int):
        super().__init__()
        self.network = network
        self.num_frames = num_frames

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.network(x, t, y, dense, num_frames=self.num_frames)


class GraphedStudent(torch.nn.Module):
    """The student's forward and backward captured once per scene as CUDA graphs
    (``torch.cuda.make_graphed_callables``) and replayed every iteration.

    Inputs are copied into static buffers, so shapes are fixed per scene; one forward may be in
    flight before its backward (the single-step Tweedie query).  Gradients still accumulate into the
    network's ``.grad`` for the optimizer.
    """

    def __init__(self, network: torch.nn.Module, cond, num_frames: int, latent_size: int, autocast: contextlib.AbstractContextManager) -> None:
        super().__init__()
        device = cond.concat.device
        sample = (
            torch.randn(num_frames, 4 + cond.concat.shape[1], latent_size, latent_size, device=device),
            torch.full((num_frames,), 500, dtype=torch.long, device=device),
            cond.crossattn.detach().clone(),
            cond.dense_vector.detach().clone(),
        )
        for parameter in network.parameters():  # an earlier scene's gradients: free their memory first
            parameter.grad = None
        with autocast:  # the layers' kernel sets are the plan's (imix2mix.accel.execute installed them)
            # allow_unused_input: q, k and norm2 of the single-token cross-attentions get no gradient
            self.graphed = torch.cuda.make_graphed_callables(
                _StudentWithFrameCount(network, num_frames), sample, allow_unused_input=True
            )
        for parameter in network.parameters():  # the warm-up passes left gradients behind
            parameter.grad = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, dense: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        if self.graphed is None:
            raise RuntimeError("GraphedStudent: replayed after release()")
        return self.graphed(x, t, y, dense)

    def release(self) -> None:
        """Drop the captured graphs (their private memory pools and static buffers).  They sit in a
        reference cycle (make_graphed_callables defines an autograd Function class per capture, and a
        class is always in one), so the memory returns at the next cyclic collection:
        :func:`release_cuda_memory`."""
        self.graphed = None


def release_cuda_memory(device: torch.device) -> None:
    """Collect what only the cyclic collector frees (released CUDA graphs, above), drop cuBLAS's
    workspaces and return the allocator's cached blocks to the driver, so that what runs next (a
    decode, the next scene, another process on the card) has the memory.  Nothing to do off CUDA.

    The workspaces: cuBLAS keeps one per (handle, stream) pair for the life of the process, and
    make_graphed_callables warms up on a new stream at every capture, so each run's captures left
    about 96 MiB allocated behind them (measured on an H100: +0.096 GiB per warm-worker run).  They
    are recreated on the next matrix product that needs one (torch's inductor clears them the same
    way around its graph recordings)."""
    if device.type == "cuda":
        gc.collect()
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private; in torch 2.x
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
