"""Layers take their Triton kernels only inside CUDA-graph captures (or in Triton's interpreter).

Eagerly, each Triton launch costs more Python time than the kernel saves (docs/benchmarks.md), so
``use_triton_kernels`` says no outside :func:`triton_kernels_for_graph_capture`, which the student's
and the teacher's graph captures open around their warm-up and capture.
"""

from __future__ import annotations

import pytest

from imix2mix.kernels.triton_support import interpreter_on, triton_kernels_for_graph_capture, use_triton_kernels


def test_kernels_only_inside_the_capture_context() -> None:
    assert not interpreter_on()  # this process: compiled kernels only, i.e. on CUDA
    assert not use_triton_kernels()
    with triton_kernels_for_graph_capture():
        assert use_triton_kernels()
        with triton_kernels_for_graph_capture():
            assert use_triton_kernels()
        assert use_triton_kernels()  # leaving an inner context keeps the outer one
    assert not use_triton_kernels()


def test_the_context_closes_on_errors() -> None:
    with pytest.raises(RuntimeError, match="capture failed"):
        with triton_kernels_for_graph_capture():
            raise RuntimeError("capture failed")
    assert not use_triton_kernels()
