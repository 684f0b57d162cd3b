"""Session-wide settings for the test suite (shared by every test module; do not add fixtures here
that only one area needs: keep those in that area's own test module or helper file)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before anything imports torch, prefect or huggingface_hub.  Processes started by the tests that
# import this module (Ray workers unpickling test code) reuse the session's folder instead of
# leaving folders of their own behind; the session removes it at the end.
_OWNS_TMP = "IMIX2MIX_TESTS_TMP" not in os.environ
if _OWNS_TMP:
    os.environ["IMIX2MIX_TESTS_TMP"] = tempfile.mkdtemp(prefix="imix2mix-tests-")
_TMP = Path(os.environ["IMIX2MIX_TESTS_TMP"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(_TMP / "hf"))
os.environ.setdefault("PREFECT_HOME", str(_TMP / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect waits 20 s (the test harness 30 s) for a temporary API server; on a loaded 2-core machine
# its start (imports, database migrations) has taken longer, and every flow test then errored.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import zlib  # noqa: F401,E402  (pycolmap must never be the first to load zlib; see imix2mix/poses.py)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; a developer checkout has ../shared too.
SHARED = Path(os.environ.get("IMIX2MIX_SHARED", REPO_ROOT.parent / "shared"))
PARITY = SHARED / "parity"
SCENES = SHARED / "scenes"
EXAMPLES = REPO_ROOT / "examples"

if str(PARITY) not in sys.path:
    sys.path.insert(0, str(PARITY))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared fixtures not found at {SHARED} (set IMIX2MIX_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def tmp_root() -> Path:
    return _TMP


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Session fixtures (Prefect servers, Ray) are torn down by now.
    if _OWNS_TMP:
        shutil.rmtree(_TMP, ignore_errors=True)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A GPU run (``-m gpu``, ``-m "gpu and not slow"``) collects only the GPU test modules,
    ``tests/test_gpu_*.py``: the GPU machine has the engine's packages but not the pipeline's (Prefect,
    Ray, pycolmap), which other test modules import."""
    markexpr = config.getoption("markexpr", "") or ""
    gpu_run = "gpu" in markexpr and "not gpu" not in markexpr
    if gpu_run and collection_path.suffix == ".py" and not collection_path.name.startswith("test_gpu_"):
        return True
    return None
