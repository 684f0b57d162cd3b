"""What every Ray worker of a pipeline run is told through its environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.distill import worker_env_vars
from tasks.settings import PipelineSettings


def test_workers_keep_compiled_kernels_beside_the_pipeline_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    settings = PipelineSettings(output_root=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert worker_env_vars(settings, None) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "torchinductor")}
    env = worker_env_vars(settings, "http://127.0.0.1:4200/api")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_an_inductor_cache_chosen_by_the_user_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    settings = PipelineSettings(output_root=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert worker_env_vars(settings, None)["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
