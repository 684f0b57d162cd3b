"""Flow runs whose process was killed: marked Crashed by the next run, as far as the API allows.

A flow run killed with ``kill -9`` (or by the OOM killer) cannot report its end, so the API shows it
Running forever.  While a flow run works, a small file in ``cache_dir/flow-runs/`` names it and its
process; the next flow run that starts with the same cache finds the files of processes that no longer
exist and sets those runs Crashed.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from imix2mix.files import atomic_write_text
from imix2mix.orphans import is_alive, process_start_time

def _markers(cache_dir: Path) -> Path:
    return cache_dir / "flow-runs"


def mark_killed_runs_crashed(cache_dir: Path) -> list[str]:
    """Set Crashed the unfinished flow runs whose process (on this host) is gone; returns their ids."""
    logger = get_run_logger()
    crashed = []
    for marker in sorted(_markers(cache_dir).glob("*.json")):
        try:
            owner = json.loads(marker.read_text(encoding="utf-8"))
            flow_run_id = UUID(marker.stem)
        except (OSError, ValueError):
            marker.unlink(missing_ok=True)
            continue
        if (owner.get("host") != socket.gethostname() or owner.get("start_time") is None  # (not Linux: cannot tell)
                or is_alive(owner["pid"], owner["start_time"])):
            continue
        try:
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(flow_run_id)
                if flow_run.state is not None and not flow_run.state.is_final():
                    message = f"the process running it (pid {owner['pid']}) ended without reporting; it was killed"
                    client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                    logger.warning("flow run %s (%s) was left %s by a killed process; marked Crashed",
                                   flow_run.name, flow_run_id, flow_run.state.name)
                    crashed.append(str(flow_run_id))
        except ObjectNotFound:
            pass  # recorded on another Prefect API (or deleted): nothing to mark here
        except Exception as exc:  # noqa: BLE001 (the API may be unreachable: try again next time)
            logger.warning("could not mark flow run %s crashed: %s", flow_run_id, exc)
            continue
        marker.unlink(missing_ok=True)
    return crashed


@contextmanager
def crash_detection(cache_dir: Path, flow_run_id: str | None) -> Iterator[None]:
    """Mark earlier killed flow runs Crashed, then record this one while it runs."""
    if flow_run_id is None:
        yield
        return
    mark_killed_runs_crashed(cache_dir)
    marker = _markers(cache_dir) / f"{flow_run_id}.json"
    pid = os.getpid()
    atomic_write_text(marker, json.dumps({"pid": pid, "start_time": process_start_time(pid),
                                          "host": socket.gethostname()}))
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)
