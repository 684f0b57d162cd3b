"""Processes that must not outlive the command that started them.

``imix2mix collection`` starts a temporary Prefect API server and a local Ray cluster as child
processes.  They stop when the command exits, but not when it is killed (``kill -9``, the OOM killer):
then they would run on for good.  :func:`start_watchdog` starts a small separate process that keeps
a list of the command's descendants (Linux ``/proc``) and, once the command is gone, stops those
still running: SIGTERM, then SIGKILL after a grace period.  Standard library only.

``python -m imix2mix.orphans PID START_TIME`` runs the watchdog for process PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

POLL_SECONDS = 1.0
GRACE_SECONDS = 10.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[1]), int(fields[19])


def process_start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, names one process even after pid reuse."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def is_alive(pid: int, start_time: int | None) -> bool:
    return start_time is not None and process_start_time(pid) == start_time


def descendants(*roots: int) -> dict[int, int]:
    """Every live descendant of the ``roots`` processes: pid → start time."""
    stats = {int(entry): stat for entry in os.listdir("/proc") if entry.isdigit()
             if (stat := _stat(int(entry))) is not None}
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _) in stats.items():
        children[parent].append(pid)
    found: dict[int, int] = {}
    stack = list(roots)
    while stack:
        for child in children[stack.pop()]:
            if child not in found:
                found[child] = stats[child][1]
                stack.append(child)
    return found


def stop_processes(processes: dict[int, int], grace_seconds: float = GRACE_SECONDS) -> None:
    """SIGTERM each process still alive (the same one: same start time), SIGKILL those left after the grace period."""
    for number in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in processes.items():
            if is_alive(pid, start):
                try:
                    os.kill(pid, number)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_seconds
        while any(is_alive(pid, start) for pid, start in processes.items()) and time.monotonic() < deadline:
            time.sleep(0.2)


def watch(pid: int, start_time: int, poll_seconds: float = POLL_SECONDS) -> None:
    """Follow ``pid``'s descendants until it is gone, then stop them (and what they started meanwhile)."""
    me = os.getpid()
    known: dict[int, int] = {}
    while is_alive(pid, start_time):
        known = {p: s for p, s in {**known, **descendants(pid)}.items() if p != me and is_alive(p, s)}
        time.sleep(poll_seconds)
    # Orphans are re-parented, so what the known processes started since the last scan is found from them.
    known.update({p: s for p, s in descendants(*known).items() if p != me})
    stop_processes(known)


def start_watchdog() -> subprocess.Popen | None:
    """Start the watchdog of this process (Linux; elsewhere None).  It runs in its own session, so a
    signal to this command's process group does not stop it before it has cleaned up."""
    start = process_start_time(os.getpid()) if sys.platform.startswith("linux") else None
    if start is None:
        return None
    return subprocess.Popen([sys.executable, "-m", "imix2mix.orphans", str(os.getpid()), str(start)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
