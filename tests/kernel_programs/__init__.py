"""Programs that run the Triton kernels in Triton's interpreter, one child process each.

``TRITON_INTERPRET=1`` has to be set before Triton is imported (Triton decides at decoration time
whether a kernel is compiled or interpreted), and the test process may have imported Triton
already, so each program runs in a fresh Python (:func:`kernel_checks.run_program`): it computes the
kernels' and the references' results and saves them with ``torch.save`` to the path given as its
last argument; the comparisons and their tolerances live in the test modules.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from imix2mix.kernels.dispatch import KernelSet


def counted_triton(op: str) -> tuple[KernelSet, list[dict]]:
    """The Triton kernel set with ``op`` through a ``counted`` backend (its Triton kernel, registered
    under that name, recording each call's first argument's shape and keyword arguments): the set,
    and the list of calls."""
    # Imported here: a program may hide Triton before the kernel modules are first imported.
    from imix2mix.kernels.dispatch import TRITON, register_kernel_backend

    calls: list[dict] = []
    triton = TRITON.backend(op)

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append({"shape": tuple(args[0].shape), **{k: v for k, v in kwargs.items() if k != "launch"}})
        return triton.fn(*args, **kwargs)

    register_kernel_backend(op, "counted", supports=triton.supports, takes_launch=True)(counted)
    return TRITON.replace(**{op: "counted"}), calls


def run_main(main: Callable[..., dict]) -> None:
    """``main(*arguments)`` with the command line's arguments but the last, whose results go to the
    path given last."""
    *arguments, out_path = sys.argv[1:]
    torch.save(main(*arguments), out_path)
