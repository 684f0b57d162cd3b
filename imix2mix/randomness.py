"""The random draws of one run, from one seed, with no global RNG state."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RunRandomness:
    """All random streams of one run, derived from one seed (no global RNG).

    One seed fixes the reference choice, the reference edit's sampler, the initial noise and every t, κ
    and ε draw of the loop, so the same seed on the same CPU gives identical images.
    """

    seed: int
    device: torch.device

    def __post_init__(self) -> None:
        self.timesteps = np.random.default_rng(self.seed)  # teacher t
        self.initial_noise = torch.Generator("cpu").manual_seed(self.seed)  # drawn on CPU like SEVA's sampler
        self.key_views = torch.Generator("cpu").manual_seed(self.seed + 1)  # κ: host-side, no device sync
        self.sds_noise = torch.Generator(self.device).manual_seed(self.seed + 2)  # ε of the perturbation
        self.reference_edit = torch.Generator(self.device).manual_seed(self.seed)

    def reference_choice(self, num_views: int) -> int:
        """The official ``random.seed(seed); random.choice(frame_indices)``, on a private Random."""
        return random.Random(self.seed).choice(range(num_views))

    def key_view(self, num_views: int) -> int:
        return int(torch.randint(num_views, (1,), generator=self.key_views))
