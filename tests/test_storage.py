"""Output roots and data safety: file modes, naming, atomic publishing, up-front checks, manifests' history,
claims, and output roots on a real S3-compatible server (OpenStack Swift's s3api)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import EXAMPLES, REPO_ROOT, SCENES
from swift_s3 import SwiftS3, make_bucket, swift_fixture

from imix2mix.collection import (
    CLAIM_STALE_SECONDS,
    CollectionPlan,
    claim_runs,
    collection_edit_document,
    list_scenes,
    plan_collection,
    release_run,
)
from imix2mix.config import EditConfig
from imix2mix.files import atomic_write_bytes
from imix2mix.manifests import ManifestStore
from imix2mix.storage import OutputRoot, StorageError, check_output_root, open_output_root, staging_dir

FACE = SCENES / "face"


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


# --------------------------------------------------------------------------------------------------
# The output root is checked up front
# --------------------------------------------------------------------------------------------------


def test_check_output_root_creates_a_missing_root_and_refuses_a_file_or_a_full_disk(tmp_path: Path) -> None:
    root = check_output_root(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir() and root.uri == str(tmp_path / "new" / "out")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match=f"{tmp_path / 'file'}: is a file, not a folder"):
        check_output_root(tmp_path / "file" / "out")
    with pytest.raises(StorageError, match=f"{tmp_path / 'file'}: is a file, not a folder"):
        check_output_root(tmp_path / "file")
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StorageError, match=f"{tmp_path}: only .* MiB free; a run needs about"):
        check_output_root(tmp_path, needed_bytes=free + 2**40)


def _cli(args: list[str], env: dict[str, str] | None = None, mount: str | None = None) -> subprocess.CompletedProcess:
    """``imix2mix ARGS`` in a child process; with ``mount``, after that shell mount command in a private mount
    namespace (``unshare -m``: root only, nothing outside the child sees the mount)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    command = [sys.executable, "-m", "imix2mix.cli", *args]
    if mount is not None:
        command = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environment, timeout=600)


def _mounts_unavailable() -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) to mount a read-only folder / a small tmpfs in a private namespace"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True,
                           text=True)
    return f"cannot mount in a private namespace here: {probe.stderr.strip()}" if probe.returncode else None


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error") or "Traceback" in line]


def test_a_bad_output_root_is_one_line_before_models_or_prefect_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    bad = str(tmp_path / "file" / "out")
    # --weights-dir names nothing: had the models started loading, the error would be about the weights.
    edit = _cli(["edit", str(FACE), "-i", "x", "--device", "cpu", "--weights-dir", str(tmp_path / "none"), "--out", bad])
    assert edit.returncode == 2 and _error_lines(edit) == [
        f"error: {tmp_path / 'file'}: is a file, not a folder; the output root {bad} cannot be created there"]
    prefect_home = tmp_path / "prefect-home"
    collection = _cli(["collection", str(EXAMPLES), "--preset", "tiny", "--out", bad],
                      env={"PREFECT_HOME": str(prefect_home)})
    assert collection.returncode == 2 and len(_error_lines(collection)) == 1, collection.stderr
    assert "is a file, not a folder" in collection.stderr
    assert not prefect_home.exists()  # Prefect never started


def test_a_read_only_or_full_output_root_is_one_line(tmp_path: Path) -> None:
    reason = _mounts_unavailable()
    if reason:
        pytest.skip(reason)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    args = ["edit", str(FACE), "-i", "x", "--device", "cpu", "--weights-dir", str(tmp_path / "none")]
    result = _cli([*args, "--out", str(read_only / "out")], mount=f"mount --bind -o ro {read_only} {read_only}")
    assert result.returncode == 2 and _error_lines(result) == [
        f"error: output root {read_only / 'out'}: the file system is read-only (cannot write there)"], result.stderr
    full = tmp_path / "full"
    full.mkdir()
    result = _cli([*args, "--out", str(full)], mount=f"mount -t tmpfs -o size=4m tmpfs {full}")
    assert result.returncode == 2 and len(_error_lines(result)) == 1, result.stderr
    assert f"error: {full}: only 4 MiB free; a run needs about 512 MiB" in result.stderr


# --------------------------------------------------------------------------------------------------
# Manifests keep their history
# --------------------------------------------------------------------------------------------------


def _run(run_id: str, **extra) -> dict:
    return {"run_id": run_id, "scene_id": "face", "edit_id": "e", "instruction": "x", "config_hash": "c",
            "preset": "tiny", "status": "succeeded", "output_dir": f"face/x-{run_id}", **extra}


def _view(run_id: str) -> dict:
    return {"run_id": run_id, "scene_id": "face", "edit_id": "e", "view_index": 0, "output_path": f"face/x-{run_id}/v.png"}


def test_a_truncated_manifest_falls_back_to_its_previous_generation(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    store = ManifestStore(tmp_path)
    store.upsert_many({"runs": [_run("r1")], "views": [_view("r1")]})
    store.upsert_many({"runs": [_run("r2")], "views": [_view("r2")]})
    current = store.path("runs")
    current.write_bytes(current.read_bytes()[: len(current.read_bytes()) // 2])  # truncated, as by a full disk
    assert [row["run_id"] for row in store.read_rows("runs")] == ["r1"]  # the generation before the last write
    assert "reading its previous generation" in caplog.text
    assert [row["run_id"] for row in store.read_rows("views")] == ["r1"]  # no view of a run the table lacks
    store.upsert("runs", [_run("r3")])
    assert sorted(row["run_id"] for row in store.read_rows("runs")) == ["r1", "r3"]
    assert len(list(store.folder.glob("runs.corrupt-*.parquet"))) == 1  # the truncated file is kept aside
    store.upsert("views", [_view("r3")])
    assert sorted(row["run_id"] for row in pq.read_table(store.path("views")).to_pylist()) == ["r1", "r3"]


# --------------------------------------------------------------------------------------------------
# Claims: two batches on one output root
# --------------------------------------------------------------------------------------------------


def _plan(output_root) -> CollectionPlan:
    scenes = list_scenes(EXAMPLES)
    edits = collection_edit_document({"edits": ["make it snowy"]})
    return plan_collection(scenes, edits, EditConfig(), preset="tiny", output_root=output_root, succeeded={})


def test_a_second_batch_skips_what_a_live_batch_claimed_and_takes_over_stale_claims(tmp_path: Path) -> None:
    first = claim_runs(_plan(tmp_path))
    assert len(first.to_run) == len(first.runs) == 4 and all(run.claimed_by is None for run in first.runs)
    claims = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.claim"))
    assert claims == sorted(run.claim for run in first.runs)
    second = claim_runs(_plan(tmp_path))  # the first batch (this process) still holds them
    assert second.to_run == [] and all(run.claimed_by["pid"] == os.getpid() for run in second.runs)
    # A claim of a process that has exited on this host is stale.
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"host": socket.gethostname(), "pid": int(finished.stdout), "at": time.time()}
    # and so is one of another host older than the limit
    old = {"host": "elsewhere", "pid": 1, "at": time.time() - CLAIM_STALE_SECONDS - 60}
    for run, owner in zip(first.runs, (dead, old, dead, old)):
        (tmp_path / run.claim).write_text(json.dumps(owner))
    third = claim_runs(_plan(tmp_path))
    assert len(third.to_run) == 4
    assert all(json.loads((tmp_path / run.claim).read_text())["pid"] == os.getpid() for run in third.runs)
    for run in third.runs:
        release_run(run)
    assert not list(tmp_path.rglob("*.claim"))


# --------------------------------------------------------------------------------------------------
# Output roots on a real S3-compatible server (OpenStack Swift + s3api on 127.0.0.1)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swift(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftS3]:
    yield from swift_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def bucket(swift: SwiftS3) -> str:
    return make_bucket(swift, "imix2mix-tests")


def _s3_root(swift: SwiftS3, url: str) -> OutputRoot:
    return open_output_root(url, **swift.storage_options, skip_instance_cache=True)


def test_run_folders_publish_on_s3_with_a_completion_marker(swift: SwiftS3, bucket: str, tmp_path: Path) -> None:
    root = check_output_root(_s3_root(swift, f"{bucket}/publish"))
    assert root.uri == f"{bucket}/publish" and not root.is_local
    first = root.staging("face/edit-1")
    (first / "view_00.png").write_bytes(b"one")
    (first / "old.png").write_bytes(b"old")
    root.publish(first, "face/edit-1")
    root.discard(first)
    assert root.is_published("face/edit-1") and root.read_bytes("face/edit-1/view_00.png") == b"one"
    second = root.staging("face/edit-1")
    (second / "view_00.png").write_bytes(b"two")
    root.publish(second, "face/edit-1")
    root.discard(second)
    # fsspec's "**" matches zero or more folders, so the listing starts with "face" itself
    assert root.glob("face/**") == ["face", "face/edit-1", "face/edit-1/_COMPLETE", "face/edit-1/view_00.png"]
    assert root.read_bytes("face/edit-1/view_00.png") == b"two"  # no staging prefix, no file of the old run left
    assert not root.is_published("face/edit-2")
    # Swift's s3api has no conditional PUT: exclusive creation falls back to check, write, read back.
    assert root.create_exclusive("face/.edit-1.claim", b"me") and not root.create_exclusive("face/.edit-1.claim", b"you")


def test_manifests_and_claims_on_s3(swift: SwiftS3, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    root = _s3_root(swift, f"{bucket}/manifests-test")
    store = ManifestStore(root)
    store.upsert_many({"runs": [_run("r1")], "views": [_view("r1")]})
    store.upsert_many({"runs": [_run("r2")], "views": [_view("r2")]})
    assert sorted(row["run_id"] for row in store.read_rows("runs")) == ["r1", "r2"]
    data = root.read_bytes("manifests/runs.parquet")
    root.write_bytes("manifests/runs.parquet", data[: len(data) // 2])
    assert [row["run_id"] for row in store.read_rows("runs")] == ["r1"]
    assert [row["run_id"] for row in store.read_rows("views")] == ["r1"]
    store.upsert("runs", [_run("r3")])
    assert sorted(row["run_id"] for row in store.read_rows("runs")) == ["r1", "r3"]
    assert len(root.glob("manifests/runs.corrupt-*.parquet")) == 1
    assert not root.exists("manifests/.lock")  # the lock object is released after each write
    first = claim_runs(_plan(root))
    assert len(first.to_run) == 4 and len(root.glob("*/.*.claim")) == 4
    assert claim_runs(_plan(root)).to_run == []
    for run in first.runs:
        release_run(run)
    assert root.glob("*/.*.claim") == []


def test_cli_edit_publishes_to_s3_with_aws_environment_variables(swift: SwiftS3, bucket: str) -> None:
    result = _cli(["edit", str(FACE), "-i", "make it snowy", "--preset", "tiny", "--device", "cpu", "--no-metrics",
                   "--set", "distill_dt=999", "--set", "k_initial=2", "--set", "k=1", "--set", "warmup_steps=1",
                   "--out", f"{bucket}/cli"], env=swift.environment())
    assert result.returncode == 0, result.stderr
    folder_url = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"{bucket}/cli/face/make-it-snowy-[0-9a-f]{{12}}", folder_url), folder_url
    root = _s3_root(swift, f"{bucket}/cli")
    folder = folder_url.removeprefix(f"{bucket}/cli/")
    files = {path.removeprefix(folder + "/") for path in root.glob(f"{folder}/*")}
    assert {"run.json", "transforms.json", "_COMPLETE", "view_00_full.png", "contact_sheet.png"} <= files
    cameras = json.loads(root.read_bytes(f"{folder}/transforms.json"))
    assert [frame["file_path"] for frame in cameras["frames"]] == [f"view_{i:02d}_full.png" for i in range(4)]
    assert [path for path in root.glob("face/*") if "staging" in path] == []


def test_wrong_credentials_or_an_unreachable_endpoint_is_one_line(swift: SwiftS3, bucket: str) -> None:
    wrong = _cli(["collection", str(EXAMPLES), "--preset", "tiny", "--out", f"{bucket}/x"],
                 env={**swift.environment(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert wrong.returncode == 2 and len(_error_lines(wrong)) == 1, wrong.stderr
    assert f"error: {bucket}/x: access denied" in wrong.stderr and "check the credentials" in wrong.stderr
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    unreachable = _cli(["edit", str(FACE), "-i", "x", "--out", f"{bucket}/x"],
                       env={**swift.environment(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "AWS_MAX_ATTEMPTS": "1"})
    assert unreachable.returncode == 2 and len(_error_lines(unreachable)) == 1, unreachable.stderr
    assert f"error: {bucket}/x: cannot reach the storage" in unreachable.stderr and "AWS_ENDPOINT_URL" in unreachable.stderr
