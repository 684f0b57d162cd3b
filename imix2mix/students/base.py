"""What a student is: the model whose weights score distillation updates, one scene at a time."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Student(Protocol):
    network: torch.nn.Module  # what the execution plan applies to (memory format, compile, graphs)

    @property
    def denoiser(self):
        """x̂0 = D(x, σ, cond, num_frames) with gradients to the trainable parameters."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates (the rest stays frozen)."""

    def reset(self) -> None:
        """Back to the pristine weights, trainable set and training mode (before each scene)."""
