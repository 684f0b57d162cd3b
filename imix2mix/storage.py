"""Output roots: where runs publish their folders and the manifests live — a local folder or any fsspec
URL (``s3://bucket/prefix``, ``gs://…``, ``memory://…``).

A run writes its files into a local *staging* folder, then :meth:`OutputRoot.publish` makes them the
run's folder in one step as far as the store allows:

- **local**: the staging folder sits beside the final one and is swapped in with ``os.replace``;
  the previous folder stays whole until the new one is complete.
- **object stores** (no rename): the files are uploaded under a hidden staging prefix beside the
  final folder first (a failed upload leaves the published folder untouched), then the previous
  folder's completion marker ``_COMPLETE`` is removed, the files are copied into place inside the
  store, files of the previous run that the new one lacks are deleted, and ``_COMPLETE`` is written
  last.  A folder without ``_COMPLETE`` is not a result (:meth:`OutputRoot.is_published`).

Claims (:meth:`OutputRoot.create_exclusive`) are files created only if absent: ``O_EXCL`` locally;
on object stores a conditional PUT (``If-None-Match: *``) where the store supports it, else a
check, write and read-back of an owner token, which closes all but a short race window.

Errors reaching the store (refused credentials, missing bucket, unreachable endpoint) become one
:class:`StorageError` line naming the URL.  fsspec only; no numpy, Prefect or Ray.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from imix2mix.errors import ImixError
from imix2mix.files import atomic_write_bytes, temporary_file, temporary_folder

COMPLETE_MARKER = "_COMPLETE"  # written last into a run folder published on an object store
# Free space an output root needs before a run starts: one run's images, contact sheet and
# run.json (a 32-view scene of 12-megapixel photos writes about 400 MB of PNGs).
RUN_OUTPUT_BYTES = 512 * 1024**2

T = TypeVar("T")


class StorageError(ImixError):
    """An output root cannot be used (missing, read-only, full, unreachable, credentials refused)."""


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def is_url(text: str) -> bool:
    return "://" in text


def describe_storage_error(where: str, exc: BaseException) -> str:
    """One line saying what went wrong reaching ``where`` and what to check."""
    if isinstance(exc, PermissionError):
        return (f"{where}: access denied ({exc}); check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or the storage options)" if is_url(where) else f"{where}: permission denied")
    if isinstance(exc, FileNotFoundError):
        return f"{where}: the bucket or folder does not exist ({exc})"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"{where}: no space left on the device"
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return f"{where}: the file system is read-only"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    unreachable = isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) or any(
        word in cls.__name__ for cls in type(exc).__mro__ for word in ("Connect", "Timeout"))
    if is_url(where) and unreachable:
        return (f"{where}: cannot reach the storage ({type(exc).__name__}: {detail}); check the endpoint "
                "(AWS_ENDPOINT_URL or the storage options) and the network")
    if is_url(where):
        return f"{where}: the storage refused the request ({type(exc).__name__}: {detail})"
    return f"{where}: {type(exc).__name__}: {detail}"


@contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """Turn any error of the store (auth, network, missing bucket) into one :class:`StorageError` line."""
    try:
        yield
    except ImixError:
        raise
    except Exception as exc:  # botocore, aiohttp and gcsfs errors share no base class but Exception
        raise StorageError(describe_storage_error(where, exc)) from exc


@dataclass(frozen=True)
class OutputRoot:
    """An output root opened through fsspec.  ``uri`` is what users see (an absolute local path or a
    URL); ``path`` is fsspec's path; paths called *relative* are ``/``-separated, under the root."""

    uri: str
    fs: fsspec.AbstractFileSystem = field(compare=False, repr=False)
    path: str

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def fs_path(self, relative: str = "") -> str:
        return posixpath.join(self.path, relative) if relative else self.path

    def uri_of(self, relative: str = "") -> str:
        """The user-facing location of ``relative`` (a local path, or a URL)."""
        path = self.fs_path(relative)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def local_path(self, relative: str = "") -> Path:
        """``relative`` as a local path; only for local roots."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local folder")
        return Path(self.fs_path(relative))

    def _call(self, where: str, action: Callable[[], T]) -> T:
        with storage_errors(self.uri_of(where)):
            return action()

    # ---------------------------------------------------------------- files

    def exists(self, relative: str) -> bool:
        if not self.is_local:
            self.fs.invalidate_cache()
        return self._call(relative, lambda: self.fs.exists(self.fs_path(relative)))

    def isdir(self, relative: str) -> bool:
        if not self.is_local:
            self.fs.invalidate_cache()
        return self._call(relative, lambda: self.fs.isdir(self.fs_path(relative)))

    def read_bytes(self, relative: str) -> bytes:
        """The file's bytes; ``FileNotFoundError`` when absent (other store errors: :class:`StorageError`)."""
        try:
            return self._call(relative, lambda: self.fs.cat_file(self.fs_path(relative)))
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                raise exc.__cause__ from None
            raise

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Replace the file in one step: temporary file + rename locally; one PUT on object stores (an
        object is never seen half-written)."""
        if self.is_local:
            atomic_write_bytes(self.local_path(relative), data)
        else:
            self._call(relative, lambda: self.fs.pipe_file(self.fs_path(relative), data))

    def remove(self, relative: str) -> None:
        """Delete a file; absent is fine."""
        if self.is_local:
            self.local_path(relative).unlink(missing_ok=True)
            return
        try:
            self._call(relative, lambda: self.fs.rm_file(self.fs_path(relative)))
        except StorageError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise

    def copy_file(self, source: str, destination: str) -> None:
        """Copy a file inside the root (locally atomically; on object stores a server-side copy)."""
        if self.is_local:
            target = self.local_path(destination)
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = temporary_file(target.parent, target.name)
            os.close(handle)
            try:
                shutil.copyfile(self.local_path(source), temporary)
                os.replace(temporary, target)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        else:
            self._call(destination, lambda: self.fs.copy(self.fs_path(source), self.fs_path(destination)))

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern`` (fsspec glob syntax), sorted."""
        if not self.is_local:
            self.fs.invalidate_cache()
        found = self._call(pattern, lambda: self.fs.glob(self.fs_path(pattern)))
        return sorted(posixpath.relpath(self.fs._strip_protocol(path), self.path) for path in found)

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Create the file with ``data`` only if it does not exist; True when this call created it."""
        if self.is_local:
            target = self.local_path(relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            return True
        path = self.fs_path(relative)
        try:
            def conditional_put() -> None:
                with self.fs.open(path, "xb") as stream:
                    stream.write(data)
            self._call(relative, conditional_put)
            return True
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, FileExistsError):
                return False
            # Stores without conditional writes (Swift's s3api, older S3 clones) answer ENOSYS or refuse "x".
            if not (isinstance(cause, (ValueError, NotImplementedError)) or getattr(cause, "errno", None) == errno.ENOSYS):
                raise
        # Check, write, read back: two writers racing inside the gap between the check and the write
        # both see their own token only if the store loses a write, which S3's read-after-write
        # consistency rules out; the last writer wins and the other one backs off.
        if self.exists(relative):
            return False
        self.write_bytes(relative, data)
        return self.read_bytes(relative) == data

    # ---------------------------------------------------------------- run folders

    def staging(self, relative: str) -> Path:
        """A fresh empty local folder to write a run's files into before :meth:`publish`."""
        name = posixpath.basename(relative)
        if self.is_local:
            return temporary_folder(self.local_path(posixpath.dirname(relative)), f".{name}.staging-")
        return temporary_folder(Path(tempfile.gettempdir()) / "imix2mix-staging", f".{name}.staging-")

    def publish(self, staging: Path, relative: str) -> None:
        """Make the complete folder ``staging`` the run folder ``relative`` (see the module docstring).
        Locally ``staging`` is renamed into place; on object stores it stays for :meth:`discard`."""
        if self.is_local:
            publish_dir(staging, self.local_path(relative))
        else:
            self._publish_remote(staging, relative)

    def _publish_remote(self, staging: Path, relative: str) -> None:
        files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        parent, name = posixpath.split(relative)
        prefix = posixpath.join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")
        for file in files:  # 1. upload: the published folder is untouched if this fails
            self._call(prefix, lambda file=file: self.fs.put_file(str(staging / file), self.fs_path(f"{prefix}/{file}")))
        try:
            old = set(self.glob(f"{relative}/**")) if self.isdir(relative) else set()
            self.remove(f"{relative}/{COMPLETE_MARKER}")  # 2. no longer a result while it is replaced
            for file in files:
                self.copy_file(f"{prefix}/{file}", f"{relative}/{file}")
            for stale in sorted(old - {f"{relative}/{file}" for file in files} - {f"{relative}/{COMPLETE_MARKER}"}):
                if not self.isdir(stale):
                    self.remove(stale)
            self.write_bytes(f"{relative}/{COMPLETE_MARKER}", json.dumps({"files": files}).encode())  # 3. done
        finally:
            for file in files:  # one DELETE each: several S3 clones refuse the bulk delete of newer clients
                self.remove(f"{prefix}/{file}")

    def is_published(self, relative: str) -> bool:
        """True when ``relative`` holds a complete run folder."""
        if self.is_local:
            return self.local_path(relative).is_dir()
        return self.exists(f"{relative}/{COMPLETE_MARKER}")

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)


def open_output_root(root: str | os.PathLike[str] | OutputRoot, **storage_options: Any) -> OutputRoot:
    """An output root from a local path or an fsspec URL (it need not exist yet: see :func:`check_output_root`).

    ``storage_options`` go to the fsspec file system (e.g. ``client_kwargs={"endpoint_url": …}`` for s3fs);
    without them the store's own configuration applies (for S3: ``AWS_*`` variables, ``~/.aws``).
    """
    if isinstance(root, OutputRoot):
        return root
    text = os.fspath(root)
    if not is_url(text):
        text = os.path.abspath(os.path.expanduser(text))
    with storage_errors(text):
        fs, fs_path = fsspec.core.url_to_fs(text, **storage_options)
    if "file" in _protocols(fs):
        return OutputRoot(uri=fs_path, fs=fs, path=fs_path)
    fs_path = fs_path.rstrip("/")
    return OutputRoot(uri=fs.unstrip_protocol(fs_path), fs=fs, path=fs_path)


def _local_check(root: OutputRoot, needed_bytes: int) -> None:
    folder = root.local_path()
    existing = folder
    while not existing.exists():  # the nearest existing ancestor must be a folder we can create in
        if existing.is_symlink():
            raise StorageError(f"{existing}: a broken symbolic link where the output folder should be")
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(f"{existing}: is a file, not a folder; the output root {folder} cannot be created there")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = temporary_file(folder, "write-check")
        os.close(handle)
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"output root {describe_storage_error(str(folder), exc)} (cannot write there)") from exc
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise StorageError(f"{folder}: only {free / 1024**2:.0f} MiB free; a run needs about "
                           f"{needed_bytes / 1024**2:.0f} MiB")


def check_output_root(root: str | os.PathLike[str] | OutputRoot, needed_bytes: int = RUN_OUTPUT_BYTES) -> OutputRoot:
    """Open the output root and make sure a run can write there: it exists or can be created, a file can be
    written (and removed), and, locally, ``needed_bytes`` are free.  Raises :class:`StorageError` (one
    line naming the path) before any model, Prefect or Ray starts."""
    root = open_output_root(root)
    if root.is_local:
        _local_check(root, needed_bytes)
        return root
    probe = f".imix2mix-write-check-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with storage_errors(root.uri):
        root.fs.makedirs(root.path, exist_ok=True)
    root.write_bytes(probe, b"")
    root.remove(probe)
    return root


# --------------------------------------------------------------------------------------------------
# Local run folders
# --------------------------------------------------------------------------------------------------


def staging_dir(final_dir: Path) -> Path:
    """A fresh empty folder beside ``final_dir`` to write a run's outputs into before publishing."""
    return temporary_folder(final_dir.parent, f".{final_dir.name}.staging-")


def publish_dir(staging: Path, final_dir: Path) -> None:
    """Replace ``final_dir`` by the complete ``staging`` folder.

    The previous outputs stay in place until the new ones are complete, so a run that fails
    half-way never destroys the last good result.
    """
    previous = None
    if final_dir.exists():
        previous = final_dir.with_name(f".{final_dir.name}.previous-{uuid.uuid4().hex[:8]}")
        os.replace(final_dir, previous)
    os.replace(staging, final_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Claims: files saying "this process is working on X", taken over when their owner is gone
# --------------------------------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def claim_is_stale(owner: dict[str, Any], stale_seconds: float, now: float | None = None) -> bool:
    """A claim is stale when its process is gone (same host) or it is older than ``stale_seconds``
    (another host, whose processes cannot be checked from here)."""
    import time

    now = time.time() if now is None else now
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not _process_alive(owner["pid"]):
            return True
    return now - float(owner.get("at") or 0) > stale_seconds


def claim_file(root: OutputRoot, relative: str, stale_seconds: float, **details: Any) -> dict[str, Any] | None:
    """Take the claim ``relative``: None when this process now holds it, else the live owner's record.

    A stale claim (:func:`claim_is_stale`) or an unreadable one is removed and taken over.
    """
    import time

    owner: dict[str, Any] = {}
    for _ in range(3):  # a claim removed as stale may be taken by another process first: look again
        record = {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time(),
                  "token": uuid.uuid4().hex, **details}
        if root.create_exclusive(relative, json.dumps(record).encode()):
            return None
        try:
            owner = json.loads(root.read_bytes(relative))
        except FileNotFoundError:
            continue  # released meanwhile
        except (ValueError, UnicodeDecodeError):
            owner = {}
        if owner and not claim_is_stale(owner, stale_seconds):
            return owner
        root.remove(relative)
    return owner


def release_claim(root: OutputRoot, relative: str) -> None:
    """Remove the claim if this process holds it (a claim taken over by another process stays)."""
    try:
        owner = json.loads(root.read_bytes(relative))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return
    if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
        root.remove(relative)
        if root.is_local:  # a scene folder made only for the claim (its run failed) does not stay behind
            with contextlib.suppress(OSError):
                root.local_path(posixpath.dirname(relative)).rmdir()
