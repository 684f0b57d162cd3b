"""Storage event → deployment → flow run, on a real local Prefect server with a real process worker.

The test starts ``prefect server``, registers ``prefect.yaml`` with ``deployments/setup_pool.sh``,
starts ``prefect worker``, marks a scene complete and runs ``imix2mix watch --once``: the server's
trigger must start an ``edit-scene`` run that edits the scene.  Every process it starts is stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import EXAMPLES, REPO_ROOT
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from imix2mix.manifests import RUNS, ManifestStore

# End to end with real services: deselect with -m 'not slow'; the timeout only guards against hangs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHORT = {"distill_dt": 999, "k_initial": 2, "k": 1, "warmup_steps": 1, "teacher_steps": 1}
BIN = Path(sys.executable).parent
WAIT_FOR_RUN_S = 400  # an upper bound for slow, shared CI boxes, not a performance assertion
SERVER_START_S = 300  # likewise (a loaded 2-core box has taken over a minute to set up this module)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen, signals: tuple[int, ...]) -> None:
    """Signal the whole process group (the worker's flow runs and their Ray included), then make sure."""
    for number in signals:
        if process.poll() is not None:
            break
        os.killpg(process.pid, number)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class Site:
    env: dict[str, str]
    api_url: str
    inbox: Path
    output_root: Path
    logs: Path

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_root: Path) -> Iterator[Site]:
    base = tmp_root / "events"
    inbox = base / "inbox"
    inbox.mkdir(parents=True)
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "IMIX2MIX_COLLECTION": str(inbox),
        "IMIX2MIX_OUTPUT": str(base / "out"),
        "IMIX2MIX_PRESET": "tiny",
        "IMIX2MIX_CACHE": str(tmp_root / "ev-cache"),  # short: Ray puts sockets under it
    }
    logs = base / "logs"
    logs.mkdir()
    server_env = {key: value for key, value in env.items() if key != "PREFECT_API_URL"}
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    worker = None
    try:
        _wait_until_healthy(api_url, server)
        setup = subprocess.run(["bash", "deployments/setup_pool.sh"], env=env, cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=300)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "imix2mix-process", "--name", "test-worker"],
            env=env, cwd=REPO_ROOT, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield Site(env, api_url, inbox, base / "out", logs)
    finally:
        if worker is not None:
            _stop(worker, (signal.SIGINT, signal.SIGINT))  # the first SIGINT only asks the worker to finish
        _stop(server, (signal.SIGTERM,))


def _wait_until_healthy(api_url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail("prefect server did not become healthy")


def _wait_for_final_run(deployment_id) -> object:  # noqa: ANN001
    deadline = time.monotonic() + WAIT_FOR_RUN_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            final = [run for run in runs if run.state is not None and run.state.is_final()]
            if final:
                return final
            time.sleep(1)
    pytest.fail("no edit-scene run finished in time")


def test_prefect_yaml_deploys_the_nightly_schedule_and_the_event_trigger(site: Site) -> None:
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("edit-collection/edit-collection-nightly")
        on_upload = client.read_deployment_by_name("edit-scene/edit-scene-on-upload")
        automations = client.read_automations_by_name("edit-scene-on-upload__automation_1")
    assert [schedule.schedule.cron for schedule in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["root"] == str(site.inbox) and nightly.work_pool_name == "imix2mix-process"
    assert on_upload.parameters["output_root"] == str(site.output_root)
    (automation,) = automations
    assert automation.trigger.expect == {"imix2mix.scene.ready"}


def test_a_scene_ready_event_starts_an_edit_scene_run_that_succeeds(site: Site) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("edit-scene/edit-scene-on-upload")
        # As an operator would in the UI: the shortest tiny schedule for every upload.
        client.update_deployment(deployment.id, DeploymentUpdate(
            parameters={**deployment.parameters, "config_overrides": SHORT, "workers": 1}))
    shutil.copytree(EXAMPLES / "face", site.inbox / "face")
    shutil.copytree(EXAMPLES / "person-small", site.inbox / "uploading")  # no marker, just written
    for path in (site.inbox / "uploading").rglob("*"):
        path.touch()
    (site.inbox / "face" / "_READY").touch()
    state = site.inbox.parent / "watch-state.json"
    watch = [str(BIN / "imix2mix"), "watch", str(site.inbox), "--once", "--state", str(state), "--quiet", "3600"]
    # The API unreachable first: the watcher says so, fails, and remembers nothing.
    unreachable = subprocess.run(watch, env={**site.env, "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"},
                                 cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert unreachable.returncode != 0 and "did not accept the event for" in unreachable.stderr
    assert "not announced (face)" in unreachable.stderr and not state.exists()
    watcher = site.cli(*watch)  # the next try announces it
    assert watcher.returncode == 0, watcher.stderr
    assert "announced 1 scene(s)" in watcher.stdout

    (run,) = _wait_for_final_run(deployment.id)
    worker_log = (site.logs / "worker.log").read_text()
    assert run.state.is_completed(), f"{run.state}\n{worker_log[-4000:]}"
    assert run.parameters["scene_uri"] == str(site.inbox / "face")
    assert run.parameters["root"] == str(site.inbox)
    runs = ManifestStore(site.output_root).read_rows(RUNS)
    assert [(row["scene_id"], row["status"], row["flow_run_id"]) for row in runs] == [
        ("face", "succeeded", str(run.id))]
    assert (site.output_root / runs[0]["output_dir"] / "contact_sheet.png").is_file()

    again = site.cli(*watch)
    assert "announced 0 scene(s)" in again.stdout  # same content never twice; "uploading" is not quiet yet
