"""Scene folders on fsspec's in-memory file system: remote storage (``memory://``) without a network."""

from __future__ import annotations

from pathlib import Path

import fsspec


def upload_scene(folder: Path, base: str) -> str:
    """Copy every file of ``folder`` to ``memory://<base>/<folder name>/``; returns the root URL ``memory://<base>``.

    The memory file system is one per process: give each test its own ``base`` (e.g. with ``tmp_path.name``).
    """
    fs = fsspec.filesystem("memory")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe(f"{base}/{folder.name}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return f"memory://{base}"
