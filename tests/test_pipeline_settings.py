"""What every Ray worker of a pipeline run is told through its environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.distill import worker_env_vars
from tasks.settings import PipelineSettings


def test_workers_keep_compiled_kernels_beside_the_pipeline_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    settings = PipelineSettings(output_root=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert worker_env_vars(settings, None) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "torchinductor")}
    env = worker_env_vars(settings, "http://127.0.0.1:4200/api")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_an_inductor_cache_chosen_by_the_user_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    settings = PipelineSettings(output_root=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert worker_env_vars(settings, None)["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_workers_get_the_memory_profiles_allocator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--memory 24gb sets the allocator in the CLI's process before the workers start; the workers'
    environment carries it (it is read when a worker first initialises CUDA)."""
    from imix2mix.config import apply_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    settings = PipelineSettings(output_root=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in worker_env_vars(settings, None)
    cli_environment: dict[str, str] = {}
    apply_allocator("24gb", cli_environment)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", cli_environment["PYTORCH_CUDA_ALLOC_CONF"])
    assert worker_env_vars(settings, None)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_the_collection_command_gives_a_temporary_prefect_server_time_to_start() -> None:
    from imix2mix.commands.pipeline import EPHEMERAL_SERVER_STARTUP_SECONDS, allow_slow_ephemeral_server

    environ: dict[str, str] = {}
    allow_slow_ephemeral_server(environ)
    assert environ == {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(EPHEMERAL_SERVER_STARTUP_SECONDS)}
    assert EPHEMERAL_SERVER_STARTUP_SECONDS > 20  # Prefect's own default
    mine = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "45"}
    allow_slow_ephemeral_server(mine)
    assert mine == {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "45"}


def test_the_command_line_imports_no_prefect_before_the_timeout_is_set() -> None:
    """The setting is read when Prefect is imported, so building the CLI must not import it."""
    import subprocess
    import sys

    code = "import sys, imix2mix.cli as c; c.build_parser(); print('prefect' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("setting", ["lr=nan", "text_cfg=inf", "seed=-1"])
def test_the_collection_command_refuses_a_bad_setting_before_starting_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str) -> None:
    from imix2mix.cli import main

    (tmp_path / "photos").mkdir()
    code = main(["collection", str(tmp_path / "photos"), "--preset", "tiny", "--out", str(tmp_path / "out"),
                 "--set", setting])
    assert code == 2
    err = capsys.readouterr().err
    assert setting.split("=")[0] in err and "EditConfig" in err
    assert not (tmp_path / "out").exists()


def test_the_temporary_prefect_server_runs_without_telemetry_unless_the_user_says_so() -> None:
    """Its heartbeat printed a 'database is locked' traceback on every collection run."""
    from imix2mix.commands.pipeline import quiet_temporary_server

    environ: dict[str, str] = {}
    quiet_temporary_server(environ)
    assert environ == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    mine = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    quiet_temporary_server(mine)
    assert mine == {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
