"""The ``gpu``-marked tests are run on the GPU machine with ``python -m pytest -m gpu tests``; its
image has torch, Triton, transformers and diffusers but not the pipeline's Prefect, Ray and pycolmap.
In a child process where those three cannot be imported, that command collects the GPU tests (only
them, without errors), and what their fixtures import lazily imports."""

from __future__ import annotations

from kernel_checks import run_program


def test_gpu_tests_collect_without_prefect_ray_or_pycolmap(tmp_path) -> None:
    out = run_program("gpu_collection", folder=tmp_path)
    assert out["exit_code"] == 0, out
    ids = [nodeid for nodeid, _ in out["items"]]
    assert any("test_gpu_kernels.py::" in i for i in ids) and any("test_gpu_cuda_graphs.py::" in i for i in ids), ids
    assert all(gpu for _, gpu in out["items"]), out["items"]
    assert out["lazy_imports"] == dict.fromkeys(("benchmarks.bench_edit", "imix2mix.presets", "imix2mix.editor")), out
