"""What ``python -m pytest -m gpu tests`` collects on a machine without Prefect, Ray and pycolmap (the
GPU machine's image), and whether what the GPU tests import lazily imports without them
(tests/test_device_tests_collect.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from kernel_programs import run_main

TESTS = Path(__file__).resolve().parents[1]
MISSING = ("prefect", "ray", "pycolmap")


class _Collected:
    def __init__(self) -> None:
        self.items: list[tuple[str, bool]] = []

    def pytest_collection_finish(self, session) -> None:  # noqa: ANN001
        self.items = [(item.nodeid, item.get_closest_marker("gpu") is not None) for item in session.items]


def main() -> dict:
    for name in MISSING:
        sys.modules[name] = None  # `import name` raises ImportError, as where it is not installed
    import pytest

    collected = _Collected()
    code = pytest.main(["-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", str(TESTS)], plugins=[collected])
    lazy = {}
    for module in ("benchmarks.bench_edit", "imix2mix.presets", "imix2mix.editor"):  # the fixtures' imports
        try:
            importlib.import_module(module)
            lazy[module] = None
        except ImportError as error:
            lazy[module] = str(error)
    return {"exit_code": int(code), "items": collected.items, "lazy_imports": lazy}


if __name__ == "__main__":
    run_main(main)
