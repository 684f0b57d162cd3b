"""A real S3-compatible server for the tests: OpenStack Swift (Debian's packages) with its ``s3api``
middleware, single node, one replica, tempauth, memcached, every port on 127.0.0.1.

``.ci/run`` installs the packages (``swift swift-proxy swift-object swift-container swift-account
memcached``); where they are missing, :func:`swift_unavailable` says why and the tests that need the
server are skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Swift's own Python (Debian's python3-swift lives in the system interpreter, not in the venv).
SYSTEM_PYTHON = "/usr/bin/python3"
ACCESS_KEY = "test:tester"  # tempauth user ``tester`` of account ``test``
SECRET_KEY = "testing"
_SERVERS = ("account", "container", "object")
START_TIMEOUT_SECONDS = 300  # a limit on a dead server only: the fixture returns as soon as it answers


def swift_unavailable() -> str | None:
    """Why the Swift server cannot run here, or None when it can."""
    missing = [tool for tool in ("memcached", "swift-ring-builder", "swift-proxy-server", "swift-object-server",
                                 "swift-container-server", "swift-account-server") if shutil.which(tool) is None]
    if missing:
        return (f"OpenStack Swift is not installed ({', '.join(missing)} missing): "
                "apt-get install swift swift-proxy swift-object swift-container swift-account memcached")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import swift.common.middleware.s3api"], capture_output=True, text=True)
    if probe.returncode:
        return f"Swift's s3api middleware cannot be imported: {probe.stderr.strip()[-300:]}"
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return "s3fs is not installed in this Python (pip install -e '.[dev]')"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_COMMON = """[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
devices = {devices}
mount_check = false
swift_dir = {etc}
log_name = {name}
log_level = WARNING
log_address = {log_address}
"""

_STORAGE = _COMMON + """
[pipeline:main]
pipeline = {name}-server

[app:{name}-server]
use = egg:swift#{name}

[{name}-replicator]
[{name}-updater]
[{name}-auditor]
"""

_PROXY = _COMMON + """
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:s3api]
use = egg:swift#s3api
location = us-east-1
s3_acl = false

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = {secret} .admin

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcached_port}

[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
"""


@dataclass
class SwiftS3:
    """A running single-node Swift with s3api; ``endpoint`` is its S3 URL (http://127.0.0.1:PORT)."""

    folder: Path
    endpoint: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options that reach this server."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint,
                                                                            "region_name": "us-east-1"}}

    def environment(self) -> dict[str, str]:
        """The environment variables with which any AWS client (s3fs, boto) reaches this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> "SwiftS3":
        etc, devices, logs = self.folder / "etc", self.folder / "devices", self.folder / "logs"
        for folder in (etc, devices / "d1", logs):
            folder.mkdir(parents=True, exist_ok=True)
        # Swift logs to syslog; a UDP port nobody listens on swallows it (no /dev/log in containers).
        log_address = "/dev/log" if os.path.exists("/dev/log") else str(logs / "no-syslog")
        ports = {name: _free_port() for name in (*_SERVERS, "proxy", "memcached")}
        for name in _SERVERS:
            builder = str(etc / f"{name}.builder")
            for command in (["create", "6", "1", "0"], ["add", f"r1z1-127.0.0.1:{ports[name]}/d1", "100"],
                            ["rebalance"]):
                done = subprocess.run(["swift-ring-builder", builder, *command], capture_output=True, text=True)
                if done.returncode not in (0, 1):  # 1 = warnings (e.g. "balance is not perfect")
                    raise RuntimeError(f"swift-ring-builder {command[0]} failed: {done.stdout}{done.stderr}")
            (etc / f"{name}-server.conf").write_text(_STORAGE.format(
                port=ports[name], devices=devices, etc=etc, name=name, log_address=log_address))
        (etc / "proxy-server.conf").write_text(_PROXY.format(
            port=ports["proxy"], devices=devices, etc=etc, name="proxy", log_address=log_address, secret=SECRET_KEY,
            memcached_port=ports["memcached"]))
        self._spawn(["memcached", "-l", "127.0.0.1", "-p", str(ports["memcached"]), "-U", "0", "-u", "root"
                     if os.geteuid() == 0 else os.environ.get("USER", "nobody")], logs / "memcached.log")
        for name in _SERVERS:
            self._spawn([SYSTEM_PYTHON, shutil.which(f"swift-{name}-server"), str(etc / f"{name}-server.conf")],
                        logs / f"{name}.log")
        self._spawn([SYSTEM_PYTHON, shutil.which("swift-proxy-server"), str(etc / "proxy-server.conf")],
                    logs / "proxy.log")
        self.endpoint = f"http://127.0.0.1:{ports['proxy']}"
        self._wait_healthy(logs)
        return self

    def _spawn(self, command: list[str], log: Path) -> None:
        with open(log, "ab") as stream:
            self.processes.append(subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def _wait_healthy(self, logs: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            dead = [process.args for process in self.processes if process.poll() is not None]
            if dead:
                self.stop()
                raise RuntimeError(f"Swift did not start: {dead} exited; logs in {logs}:\n" + "".join(
                    path.read_text(errors="replace")[-2000:] for path in sorted(logs.glob("*.log"))))
            try:
                with urllib.request.urlopen(f"{self.endpoint}/healthcheck", timeout=5) as response:
                    if response.status == 200 and self._storage_answers():
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Swift did not answer within {START_TIMEOUT_SECONDS} s; logs in {logs}")
            time.sleep(0.2)

    def _storage_answers(self) -> bool:
        """The proxy answers before the storage servers listen: probe each server's port."""
        for process in self.processes[1:-1]:
            conf = Path(process.args[-1]).read_text()
            port = int(conf.split("bind_port = ")[1].split()[0])
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                return False
        return True

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def make_bucket(server: SwiftS3, name: str) -> str:
    """Create bucket ``name`` (a Swift container) and return ``s3://name``."""
    import s3fs

    fs = s3fs.S3FileSystem(**server.storage_options, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


if __name__ == "__main__":  # manual check: python tests/swift_s3.py
    import tempfile

    reason = swift_unavailable()
    if reason:
        sys.exit(reason)
    server = SwiftS3(Path(tempfile.mkdtemp(prefix="swift-"))).start()
    try:
        print("up at", server.endpoint, make_bucket(server, "probe"))
    finally:
        server.stop()


def swift_fixture(tmp_path_factory) -> Iterator[SwiftS3]:
    """Body of the test modules' ``swift`` fixture: a running server, or a skip saying why it cannot run."""
    import pytest

    reason = swift_unavailable()
    if reason:
        pytest.skip(reason)
    server = SwiftS3(tmp_path_factory.mktemp("swift")).start()
    try:
        yield server
    finally:
        server.stop()
