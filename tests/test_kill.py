"""``kill -9`` of ``imix2mix collection``: nothing it started survives, and the next run marks the killed run Crashed.

A real collection runs in a subprocess (its own temporary Prefect server and local Ray); the test
waits until it is distilling, kills it with SIGKILL, and waits until every process it had started is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, REPO_ROOT

from imix2mix.orphans import descendants, is_alive

# End to end with real services: deselect with -m 'not slow'; the timeout only guards against hangs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHORT = {"distill_dt": 999, "k_initial": 2, "k": 1, "warmup_steps": 1, "teacher_steps": 1}


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog follows processes through /proc")
def test_kill_9_of_a_collection_leaves_no_server_or_ray_and_the_next_run_marks_it_crashed(
        tmp_path: Path, tmp_root: Path) -> None:
    root = Path(shutil.copytree(EXAMPLES, tmp_path / "photos", ignore=shutil.ignore_patterns("README*")))
    cache = Path(tmp_root) / f"kc-{tmp_path.name[-6:]}"  # short: Ray puts its sockets under it
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))})
    settings = [item for key, value in SHORT.items() for item in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "imix2mix.cli", "collection", "--preset", "tiny", "--cache", str(cache), *settings]
    collection = subprocess.Popen([*command, str(root), "--out", str(tmp_path / "out")], env=env, cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    for line in collection.stdout:
        lines.append(line)
        if "distilling (config" in line:
            break
    else:
        pytest.fail("the collection ended before distilling:\n" + "".join(lines[-40:]))
    # Keep reading, so no process that inherited the pipe blocks on a full one.
    threading.Thread(target=lambda: [lines.append(line) for line in collection.stdout], daemon=True).start()
    started = descendants(collection.pid)
    commands = {pid: _command_line(pid) for pid in started}
    assert any("uvicorn" in text and "prefect.server" in text for text in commands.values()), commands
    assert any("raylet" in text for text in commands.values()), commands
    (marker,) = (cache / "flow-runs").glob("*.json")

    os.kill(collection.pid, signal.SIGKILL)
    collection.wait()
    while alive := {pid: commands[pid] for pid, start in started.items() if is_alive(pid, start)}:
        time.sleep(0.5)  # bounded by the test's timeout; the watchdog stops them within seconds
    assert not alive

    (tmp_path / "empty").mkdir()
    again = subprocess.run([*command, str(tmp_path / "empty"), "--out", str(tmp_path / "out2")], env=env,
                           cwd=REPO_ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"({marker.stem}) was left Running by a killed process; marked Crashed" in again.stdout + again.stderr
    state = subprocess.run(
        [sys.executable, "-c", "import sys; from uuid import UUID; from prefect.client.orchestration import get_client\n"
                               "with get_client(sync_client=True) as client:\n"
                               "    print(client.read_flow_run(UUID(sys.argv[1])).state.type.value)", marker.stem],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert state.stdout.strip().splitlines()[-1] == "CRASHED", state.stdout + state.stderr
