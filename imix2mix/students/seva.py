"""SEVA as the student, with full fine-tuning: every parameter is trained, and reset per scene."""

from __future__ import annotations

import torch

from imix2mix.seva import Seva
from imix2mix.seva.schedule import SevaDenoiser, SevaSchedule


class SevaStudent:
    """SEVA's network, its EDM denoiser and its pristine weights.

    The pristine copy lives in host memory (pinned on CUDA, so the per-scene copy back is fast);
    :meth:`reset` copies it back in place, so parameter objects (and anything holding them) stay valid.
    """

    def __init__(self, network: Seva, device: torch.device | str = "cpu", schedule: SevaSchedule | None = None):
        self.device = torch.device(device)
        self.network = network.to(self.device)
        self.schedule = schedule or SevaSchedule()
        self.denoiser = SevaDenoiser(self.network, self.schedule)
        pin = self.device.type == "cuda"
        self.pristine = {
            name: (value.detach().to("cpu", copy=True).pin_memory() if pin else value.detach().to("cpu", copy=True))
            for name, value in self.network.state_dict().items()
        }

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.parameters())

    @torch.no_grad()
    def reset(self) -> None:
        for name, value in self.network.state_dict().items():
            value.copy_(self.pristine[name], non_blocking=True)
        self.network.requires_grad_(False)
        for parameter in self.trainable_parameters():
            parameter.requires_grad_(True)
        self.network.train()
