"""Hand-written GPU kernels (Triton) for hot spots that torch has no fast path for.

Every kernel module imports Triton behind a guard and exposes an ``*_available`` predicate, so the
package imports (and callers fall back to torch) on machines without Triton or without a GPU.
:mod:`imix2mix.kernels.dispatch` says which implementation each layer's op runs: the kernel set
installed on the layer (by :func:`imix2mix.accel.execute`, as the execution plan chose).
"""
