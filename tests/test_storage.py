"""Output roots and data safety: file modes, naming, atomic publishing, up-front checks, manifests' history,
claims, and output roots on a real S3-compatible server (OpenStack Swift's s3api)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from imix2mix.files import atomic_write_bytes
from imix2mix.manifests import ManifestStore
from imix2mix.storage import staging_dir


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_users_umask(tmp_path: Path, umask_022: None) -> None:
    written = atomic_write_bytes(tmp_path / "run" / "run.json", b"{}")
    assert _mode(written) == 0o644
    staging = staging_dir(tmp_path / "face" / "edit-1234")
    assert _mode(staging) == 0o755
    ManifestStore(tmp_path).upsert("scenes", [])
    assert _mode(tmp_path / "manifests" / "scenes.parquet") == 0o644
    os.umask(0o027)
    assert _mode(atomic_write_bytes(tmp_path / "other.bin", b"x")) == 0o640
