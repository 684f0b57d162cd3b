"""How bf16 AdamW moments drift from fp32 ones, by rounding scheme: AdamW's displacement on synthetic
gradients, fp32 moments against bf16 moments rounded to nearest and stochastically (the scheme of
``adamw_bf16_states``, :func:`imix2mix.kernels.adamw.stochastic_round_bf16`, with its real bits).

Each of ``--elements`` parameters gets a gradient stream with its own scale (log-normal, σ = 2), a
constant mean of 0.3 scale and a slow modulation: ``g_t = s·(ε_t·(1 + 0.5 sin(t/50)) + 0.3)``, the
same draws for every scheme.  Reported after each of ``--steps``: ‖Σ Δθ_scheme − Σ Δθ_fp32‖ / ‖Σ Δθ_fp32‖
(Δθ the update before the learning rate).  No model, CPU only: the rounding alone, without the loop's
amplification that ``loop_drift.py`` measures on the GPU.

    python benchmarks/moment_rounding.py                     # 220 and 2150 steps (the drift run's and the schedule's)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from imix2mix.kernels.adamw import moment_seed, stochastic_round_bf16  # noqa: E402

SCHEMES = ("nearest", "stochastic")


def displacement_errors(elements: int, steps: list[int], beta1: float = 0.9, beta2: float = 0.999,
                        eps: float = 1e-8) -> dict[str, dict[int, float]]:
    """{scheme: {step: relative displacement error against fp32 moments}}."""
    scale = torch.exp(torch.randn(elements, generator=torch.Generator().manual_seed(0)) * 2)
    store = {
        "fp32": lambda x, step, moment: x,
        "nearest": lambda x, step, moment: x.to(torch.bfloat16).float(),
        "stochastic": lambda x, step, moment: stochastic_round_bf16(x, moment_seed(step, 0, moment)).float(),
    }
    displacement = {}
    errors: dict[str, dict[int, float]] = {name: {} for name in SCHEMES}
    for name, rounded in store.items():
        draws = torch.Generator().manual_seed(1)
        m, v, total = torch.zeros(elements), torch.zeros(elements), torch.zeros(elements)
        for t in range(1, max(steps) + 1):
            g = scale * (torch.randn(elements, generator=draws) * (1 + 0.5 * torch.sin(torch.tensor(t / 50.0))) + 0.3)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            total += (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            m, v = rounded(m, t, 0), rounded(v, t, 1)
            if t in steps:
                if name == "fp32":
                    displacement[t] = total.clone()
                else:
                    errors[name][t] = float((total - displacement[t]).norm() / displacement[t].norm())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=200_000)
    parser.add_argument("--steps", type=int, nargs="+", default=[220, 2150])
    args = parser.parse_args()
    errors = displacement_errors(args.elements, sorted(args.steps))
    print(f"{'steps':>6} " + " ".join(f"{name:>11}" for name in SCHEMES))
    for step in sorted(args.steps):
        print(f"{step:>6} " + " ".join(f"{errors[name][step]:>10.2%} " for name in SCHEMES))


if __name__ == "__main__":
    main()
