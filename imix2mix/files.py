"""Atomic file writes: a temporary file in the target's folder, fsynced, renamed over the target.

A reader (or a crash) never sees a half-written file.  Temporary files and folders get the modes a
plain ``open``/``mkdir`` would give them under the user's umask (``tempfile`` makes them private,
0600/0700, which would keep another user or a web server from reading the outputs).  Standard
library only, so the light pipeline helpers (collection, watching) can use it without loading numpy
or Pillow.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc; elsewhere it is set
    and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_file(folder: Path, name: str) -> tuple[int, Path]:
    """An open descriptor and path of a new hidden temporary file in ``folder``, mode 0666 & ~umask."""
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.fchmod(handle, 0o666 & ~current_umask())
    return handle, Path(temporary)


def temporary_folder(folder: Path, prefix: str) -> Path:
    """A new empty folder in ``folder`` (created with its parents), mode 0777 & ~umask."""
    folder.mkdir(parents=True, exist_ok=True)
    created = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    created.chmod(0o777 & ~current_umask())
    return created


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` (creating its folder) via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = temporary_file(path.parent, path.name)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
