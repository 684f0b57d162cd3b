"""A quiet start: no notices a user can do nothing about, every default in ``--help``, sane CPU threads."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from imix2mix.cli import build_parser
from imix2mix.commands.edit import cpu_threads
from imix2mix.errors import ConfigError


def _commands() -> dict:
    parser = build_parser()
    return next(action for action in parser._actions if action.dest == "command").choices


def test_help_shows_every_default() -> None:
    commands = _commands()
    for command in ("edit", "preview", "collection"):
        assert "(default: full)" in " ".join(commands[command].format_help().split()), command
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text, name
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                formatter = parser._get_formatter()
                assert "default" in formatter._expand_help(action) if action.help else False, (name, action.dest)


def test_cpu_threads_default_to_half_the_cpus_and_can_be_chosen() -> None:
    assert cpu_threads(None, {}, 2) == 1
    assert cpu_threads(None, {}, 16) == 8
    assert cpu_threads(None, {}, 1) == 1
    assert cpu_threads(None, {"OMP_NUM_THREADS": "3"}, 16) == 3
    assert cpu_threads(4, {"OMP_NUM_THREADS": "3"}, 16) == 4
    with pytest.raises(ConfigError, match="--threads must be ≥ 1"):
        cpu_threads(0, {}, 2)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key not in env or env[key] is not None}
    environ.update({key: value for key, value in env.items() if value is not None})
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=environ)


def test_the_engine_imports_without_the_torchvision_notice() -> None:
    quiet = _run("from imix2mix.logs import quiet_third_party_notices as q; q(); import imix2mix.presets")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "requires torchvision" not in quiet.stderr
    if importlib.util.find_spec("torchvision") is None:  # the notice this filter is for exists here
        assert "requires torchvision" in _run("import imix2mix.presets").stderr


@pytest.mark.slow
def test_a_local_ray_cluster_prints_no_auth_notice_and_writes_no_token_file(tmp_path: Path) -> None:
    code = (
        "import ray\n"
        "from pathlib import Path\n"
        "from tasks.workers import RaySettings, connect_ray\n"
        f"connect_ray(RaySettings(temp_dir=Path({str(tmp_path / 'ray')!r}), num_cpus=1))\n"
        "print('answer', ray.get(ray.remote(lambda: 41 + 1).remote()))\n"
        "ray.shutdown()\n"
    )
    result = _run(code, HOME=str(tmp_path / "home"), RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "answer 42" in result.stdout
    assert "Token authentication" not in result.stderr
    assert not (tmp_path / "home" / ".ray" / "auth_token").exists()
