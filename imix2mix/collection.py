"""Photo collections: which scene folders a root holds, and which edits to make to each.

A *collection root* is a local folder or an fsspec URL (``file://``, ``s3://``, ``gs://``, ``memory://``)
whose direct sub-folders are scenes.  A *scene folder* holds photos, directly or in ``images/``, and
optionally ``transforms.json`` or a COLMAP ``sparse/`` model.  Nothing here ever reads a path outside
the root: symlinks that leave it and ``..`` components are refused.

Edits come from an *edit document* (YAML or JSON, same schema as a scene's ``edits.yaml`` /
``edits.json`` or a collection-wide file or flow parameter)::

    source_caption: a photo of a man          # optional default for every edit below
    config: {k: 25}                           # optional EditConfig overrides
    edits:
      - instruction: turn him into a knight   # required
        target_caption: a photo of a knight   # optional (CLIP metrics)
        source_caption: a photo of a man      # optional (CLIP metrics)
        text_cfg: 7.5                         # optional teacher CFG (s_T)
        image_cfg: 1.5                        # optional teacher CFG (s_I)
        seed: 0                               # optional
        config: {lr: 5.0e-5}                  # optional EditConfig overrides for this edit only
        teacher: controlnet_canny             # optional shorthand for config: {teacher: …} (also teacher_id)
        modes: [distill, teacher_only, t2vz]  # optional (or methods:): one run per mode, to compare them
      - make it snowy                         # shorthand: only the instruction

This module imports neither torch, pycolmap nor the engine at import time, so listings and validation are cheap (the storage
watcher uses them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import yaml

from imix2mix.edits import Edit
from imix2mix.errors import ConfigError, SceneError
from imix2mix.files import atomic_write_text, temporary_folder
from imix2mix.images import IMAGE_SUFFIXES
from imix2mix.storage import OutputRoot, claim_file, open_output_root, release_claim

logger = logging.getLogger(__name__)

EDIT_FILE_NAMES = ("edits.yaml", "edits.yml", "edits.json")
READY_MARKER = "_READY"  # the storage watcher's "upload complete" marker (imix2mix.watching)
# Files of a scene folder that are not its inputs: what to edit (each edit has its own identity) and the marker.
NOT_SCENE_INPUTS = (READY_MARKER, *EDIT_FILE_NAMES)
# How the caller's overrides (``--set``, the flows' ``config_overrides``) are named in error messages.
BASE_OVERRIDES_SOURCE = "config_overrides (--set)"
# Folders under a root that are never scenes: hidden ones, our own bookkeeping (``_cache``) and outputs.
_NOT_A_SCENE = re.compile(r"^[._]")


# --------------------------------------------------------------------------------------------------
# Roots and scene folders
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectionRoot:
    """A collection root opened through fsspec.

    ``path`` is the filesystem path fsspec uses; for local roots it is the resolved absolute path, so
    containment checks compare real locations (symlinks followed).
    """

    uri: str
    fs: fsspec.AbstractFileSystem = field(compare=False, repr=False)
    path: str

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def uri_for(self, fs_path: str) -> str:
        """The user-facing URI of a path inside this root (plain path for local roots)."""
        if self.is_local:
            return fs_path
        return self.fs.unstrip_protocol(fs_path)

    def contains(self, fs_path: str) -> bool:
        """True when ``fs_path`` lies inside the root, after resolving symlinks (local roots)."""
        if self.is_local:
            real = os.path.realpath(fs_path)
            return real == self.path or real.startswith(self.path.rstrip("/") + "/")
        normalized = posixpath.normpath(fs_path)
        root = posixpath.normpath(self.path)
        return normalized.startswith(root.rstrip("/") + "/")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def open_root(root: str | os.PathLike[str]) -> CollectionRoot:
    """Open a collection root given as a local path or an fsspec URL; it must be an existing folder."""
    text = os.fspath(root)
    if "://" not in text:
        text = os.path.abspath(os.path.expanduser(text))
    fs, fs_path = fsspec.core.url_to_fs(text)
    if "file" in _protocols(fs):
        fs_path = os.path.realpath(fs_path)
        uri = fs_path
    else:
        fs_path = fs_path.rstrip("/")
        uri = fs.unstrip_protocol(fs_path)
    if not fs.isdir(fs_path):
        raise ConfigError(f"{text}: collection root is not an existing folder")
    return CollectionRoot(uri=uri, fs=fs, path=fs_path)


@dataclass(frozen=True)
class SceneRef:
    """One scene folder of a collection (not yet read)."""

    scene_id: str  # the folder name; unique within a root
    uri: str  # user-facing location (local path or URL)
    path: str  # fsspec path inside ``root.fs``
    root: CollectionRoot = field(compare=False, repr=False)

    def uri_of(self, relative: str) -> str:
        """The user-facing location of a file of this scene, given its path relative to the folder."""
        return self.root.uri_for(posixpath.join(self.path, relative))


def _entries(root: CollectionRoot, folder: str) -> list[dict[str, Any]]:
    return [entry for entry in root.fs.ls(folder, detail=True)]


def _basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def _image_names(root: CollectionRoot, folder: str) -> list[str]:
    try:
        entries = _entries(root, folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        _basename(entry["name"])
        for entry in entries
        if entry.get("type") == "file" and posixpath.splitext(entry["name"])[1].lower() in IMAGE_SUFFIXES
    )


def is_scene_folder(root: CollectionRoot, folder: str) -> bool:
    """A scene folder has photos directly inside it or in an ``images/`` sub-folder."""
    return bool(_image_names(root, folder) or _image_names(root, posixpath.join(folder, "images")))


def list_scenes(root: CollectionRoot | str | os.PathLike[str]) -> list[SceneRef]:
    """The scene folders directly under ``root``, sorted by name.

    Hidden and underscore-prefixed folders (caches, outputs) are not scenes; a folder that is a
    symlink leading outside the root is skipped.
    """
    if not isinstance(root, CollectionRoot):
        root = open_root(root)
    scenes = []
    for entry in _entries(root, root.path):
        name = _basename(entry["name"])
        if entry.get("type") != "directory" or _NOT_A_SCENE.match(name):
            continue
        folder = posixpath.join(root.path, name)
        if not root.contains(folder):
            continue
        if is_scene_folder(root, folder):
            scenes.append(SceneRef(scene_id=name, uri=root.uri_for(folder), path=folder, root=root))
    return sorted(scenes, key=lambda scene: scene.scene_id)


def find_scene(root: CollectionRoot | str | os.PathLike[str], scene_uri: str) -> SceneRef:
    """The scene at ``scene_uri`` (a URI, a path, or a bare folder name), re-listed from storage.

    Raises :class:`SceneError` when it lies outside the root or is not a scene folder there.
    """
    if not isinstance(root, CollectionRoot):
        root = open_root(root)
    text = scene_uri.rstrip("/")
    if "/" not in text and "://" not in text:
        candidate = posixpath.join(root.path, text)
    elif root.is_local:
        candidate = os.path.abspath(os.path.expanduser(text.removeprefix("file://")))
    else:
        candidate = fsspec.core.url_to_fs(text)[1] if "://" in text else text
    if ".." in candidate.split("/") or not root.contains(candidate):
        raise SceneError(scene_uri, f"is outside the collection root {root.uri}; refusing to read it")
    if root.is_local:
        candidate = os.path.realpath(candidate)
    parent = posixpath.dirname(candidate.rstrip("/"))
    if posixpath.normpath(parent) != posixpath.normpath(root.path):
        raise SceneError(scene_uri, f"is not a scene folder directly under {root.uri}")
    by_id = {scene.scene_id: scene for scene in list_scenes(root)}
    scene_id = _basename(candidate)
    if scene_id not in by_id:
        raise SceneError(scene_uri, f"no scene folder with photos named {scene_id!r} under {root.uri}")
    return by_id[scene_id]


# --------------------------------------------------------------------------------------------------
# Fetching remote scenes into a local cache
# --------------------------------------------------------------------------------------------------


def _scene_files(scene: SceneRef) -> list[dict[str, Any]]:
    """Every file of a scene folder (recursively), refusing any that resolves outside the root."""
    fs = scene.root.fs
    files = []
    for path, info in sorted(fs.find(scene.path, detail=True, withdirs=False).items()):
        if not scene.root.contains(path):
            raise SceneError(scene.uri, f"{path} points outside the collection root; refusing to read it")
        if info.get("type") == "directory" or (scene.root.is_local and os.path.isdir(path)):
            continue  # a symlinked folder (fsspec lists it as a file): its files count under their real path
        files.append({**info, "name": path})
    return files


def listing_fingerprint(scene: SceneRef) -> str:
    """A hash of a scene folder's listing: relative names, sizes and etags / checksums / mtimes.

    Cheap (no file contents are read), and changes whenever a file is added, removed or rewritten.
    """
    digest = hashlib.sha256(scene.uri.encode())
    for info in _scene_files(scene):
        relative = posixpath.relpath(info["name"], scene.path)
        version = next(
            (info[key] for key in ("ETag", "etag", "md5Hash", "crc32c", "mtime", "LastModified", "updated",
                                   "created") if info.get(key) is not None),
            "",
        )
        digest.update(f"\0{relative}\0{info.get('size')}\0{version}".encode())
    return digest.hexdigest()


def folder_content_hash(scene: SceneRef, exclude: Collection[str] = (), include: Collection[str] | None = None) -> str:
    """sha256 over the relative names and bytes of every file in the scene folder, except those whose
    path relative to the folder is in ``exclude`` (or, given ``include``, only those in it).  Files
    resolving outside the root are refused (:class:`SceneError`).  The storage watcher and the planner
    both use this one function.
    """
    fs = scene.root.fs
    digest = hashlib.sha256(b"imix2mix-folder-v1")
    for info in _scene_files(scene):
        relative = posixpath.relpath(info["name"], scene.path)
        if relative in exclude or (include is not None and relative not in include):
            continue
        digest.update(relative.encode("utf-8") + b"\0")
        with fs.open(info["name"], "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def scene_content_hash(scene: SceneRef, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The identity of a scene's inputs as stored: :func:`folder_content_hash` of its photos, pose files
    (``transforms.json``, ``sparse/``) and any other file, without its edit files and ``_READY`` marker.

    Editing ``edits.yaml`` does not change it; new or rewritten photos or poses do.  With ``cache_dir``
    the hash is kept in ``cache_dir/<listing fingerprint>`` (the key :func:`fetch_scene` also trusts:
    names, sizes, etags / checksums / mtimes), so planning an unchanged scene lists it without reading
    (or downloading) its bytes.  A hash is cached only if the listing did not change while it was read.
    """
    if cache_dir is None:
        return folder_content_hash(scene, NOT_SCENE_INPUTS)
    listing = listing_fingerprint(scene)
    cached = Path(cache_dir) / listing
    try:
        value = cached.read_text(encoding="utf-8").strip()
        if _SHA256_HEX.match(value):
            return value
    except (OSError, UnicodeDecodeError):
        pass
    value = folder_content_hash(scene, NOT_SCENE_INPUTS)
    if listing_fingerprint(scene) == listing:
        atomic_write_text(cached, value)
    return value


def edit_files_hash(scene: SceneRef) -> str:
    """:func:`folder_content_hash` of the scene's edit files alone (what to edit, not what is edited)."""
    return folder_content_hash(scene, include=EDIT_FILE_NAMES)


def fetch_scene(scene: SceneRef, cache_dir: str | os.PathLike[str]) -> Path:
    """A local folder holding the scene's files.

    Local scenes are used in place.  Remote ones are copied once into
    ``cache_dir/inputs/<listing hash>/<scene_id>`` (complete copies only: written to a temporary
    folder, then renamed), so an unchanged scene is never downloaded twice.
    """
    if scene.root.is_local:
        _scene_files(scene)  # refuse escaping symlinks before anything reads the folder
        return Path(scene.path)
    key = listing_fingerprint(scene)[:24]
    destination = Path(cache_dir) / "inputs" / key / scene.scene_id
    if destination.is_dir():
        return destination
    staging = temporary_folder(destination.parent, f".{scene.scene_id}-")
    try:
        for info in _scene_files(scene):
            relative = posixpath.relpath(info["name"], scene.path)
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            scene.root.fs.get_file(info["name"], str(target))
        os.replace(staging, destination)
    except OSError:
        if not destination.is_dir():  # else another task fetched the same listing first
            raise  # storage errors stay OSError: the ingest task retries those
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


# --------------------------------------------------------------------------------------------------
# Edit specs
# --------------------------------------------------------------------------------------------------

_EDIT_KEYS = {"instruction", "source_caption", "target_caption", "text_cfg", "image_cfg", "seed", "config", "modes", "methods",
              "teacher", "teacher_id"}
_DOCUMENT_KEYS = {"source_caption", "config", "edits"}


@dataclass(frozen=True)
class EditSpec(Edit):
    """One requested edit of a scene, as written in an edit document (validated).

    ``config`` holds EditConfig overrides for this edit only (``teacher:`` / ``teacher_id:`` are
    shorthands for its keys).  ``modes`` (``methods:`` in the file): run modes to compare, one run per
    mode, each with its own config hash, output folder and manifest row; empty: the config's mode.
    ``edit_id`` names the edit's output folder; it depends on what changes the pixels the edit asks for
    (instruction, CFG scales, seed) but not on captions (they only feed the CLIP metrics) or on
    ``config`` and ``modes`` (part of the run's config hash).
    """

    config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    modes: tuple[str, ...] = field(default=(), hash=False)

    @property
    def edit_id(self) -> str:
        identity = {"instruction": self.instruction, "text_cfg": self.text_cfg, "image_cfg": self.image_cfg,
                    "seed": self.seed}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        return f"{slugify(self.instruction)}-{digest}"

    def to_edit(self) -> Edit:
        """The request alone, without this document's config overrides."""
        return Edit(**Edit.to_dict(self))


@dataclass(frozen=True)
class EditDocument:
    """A parsed edit document: edits plus the document-level defaults already applied to them."""

    edits: tuple[EditSpec, ...]
    source_caption: str | None = None  # the scene's caption; default for edits without their own
    config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    source: str = "<edits>"


def slugify(text: str, max_length: int = 40) -> str:
    """Lower-case words of letters and digits joined by ``-``, in any script (``"Turn him into a knight!"`` →
    ``turn-him-into-a-knight``, ``"把他变成骑士"`` → ``把他变成骑士``); ``edit`` when nothing is left."""
    normalized = unicodedata.normalize("NFKC", text).lower()
    words = "".join(char if char.isalnum() else " " for char in normalized).split()
    slug = "-".join(words)[:max_length].rstrip("-")
    return slug or "edit"


RUN_HASH_LENGTH = 12  # hex digits of the run identity in an output folder's name


def run_folder_name(instruction: str, config_hash: str, preset: str) -> str:
    """The output folder of one run under ``<out>/<scene>/``: ``<instruction slug>-<short run identity>``.

    The identity covers what changes the result: the instruction, the full config hash (CFG scales,
    seed, method, mode and ablation settings, see ``EditConfig.config_hash``) and the preset (which
    models).  Runs of one edit with other settings get their own folders; instructions that slugify
    alike never share one.  ``edit``, ``preview`` and ``collection`` all name folders with it.
    """
    identity = json.dumps({"instruction": instruction, "config_hash": config_hash, "preset": preset},
                          sort_keys=True, ensure_ascii=False)
    return f"{slugify(instruction)}-{hashlib.sha256(identity.encode('utf-8')).hexdigest()[:RUN_HASH_LENGTH]}"


def _fail(source: str, reason: str) -> ConfigError:
    return ConfigError(f"{source}: {reason}")


def _optional_text(value: Any, where: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, f"{where} must be a non-empty string, got {value!r}")
    return value.strip()


def _optional_scale(value: Any, where: str, source: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise _fail(source, f"{where} must be a positive finite number, got {value!r}")
    return float(value)


def _optional_seed(value: Any, where: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(source, f"{where} must be a non-negative integer, got {value!r}")
    return value


def _config_overrides(value: Any, where: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise _fail(source, f"{where} must be a mapping of EditConfig field names to values, got {value!r}")
    return dict(value)


def _modes(item: Mapping[str, Any], where: str, source: str) -> tuple[str, ...]:
    from imix2mix.config import MODE_NAMES

    if "modes" in item and "methods" in item:
        raise _fail(source, f"{where} has both 'modes' and 'methods'; keep one")
    key = "modes" if "modes" in item else "methods"
    value = item.get(key)
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not names or not all(isinstance(name, str) for name in names):
        raise _fail(source, f"{where}.{key} must be a non-empty list of run modes, got {value!r}")
    unknown = [name for name in names if name not in MODE_NAMES]
    if unknown:
        raise _fail(source, f"{where}.{key} has unknown mode(s) {unknown}; choose from {', '.join(MODE_NAMES)}")
    if len(set(names)) != len(names):
        raise _fail(source, f"{where}.{key} lists a mode twice: {list(names)}")
    return tuple(names)


def _parse_edit(item: Any, index: int, default_source_caption: str | None, source: str) -> EditSpec:
    where = f"edits[{index}]"
    if isinstance(item, str):
        item = {"instruction": item}
    if not isinstance(item, Mapping):
        raise _fail(source, f"{where} must be a mapping with an 'instruction' or a string, got {item!r}")
    unknown = set(item) - _EDIT_KEYS
    if unknown:
        raise _fail(source, f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_EDIT_KEYS)}")
    instruction = _optional_text(item.get("instruction"), f"{where}.instruction", source)
    if instruction is None:
        raise _fail(source, f"{where} needs an 'instruction'")
    return EditSpec(
        instruction=instruction,
        source_caption=_optional_text(item.get("source_caption"), f"{where}.source_caption", source)
        or default_source_caption,
        target_caption=_optional_text(item.get("target_caption"), f"{where}.target_caption", source),
        text_cfg=_optional_scale(item.get("text_cfg"), f"{where}.text_cfg", source),
        image_cfg=_optional_scale(item.get("image_cfg"), f"{where}.image_cfg", source),
        seed=_optional_seed(item.get("seed"), f"{where}.seed", source),
        config={**_config_overrides(item.get("config"), f"{where}.config", source),
                **{key: item[key] for key in ("teacher", "teacher_id") if item.get(key) is not None}},
        modes=_modes(item, where, source),
    )


def parse_edit_document(data: Any, source: str = "<edits>") -> EditDocument:
    """Validate an edit document (already parsed from YAML/JSON, or given as Python data).

    Accepts the mapping form shown in the module docstring or a bare list of edits.  Errors name
    ``source`` (the file) and the offending entry.
    """
    if isinstance(data, (list, tuple)):
        data = {"edits": list(data)}
    if not isinstance(data, Mapping):
        raise _fail(source, f"an edit document must be a mapping with 'edits:' or a list of edits, got {type(data).__name__}")
    unknown = set(data) - _DOCUMENT_KEYS
    if unknown:
        raise _fail(source, f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_DOCUMENT_KEYS)}")
    items = data.get("edits")
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise _fail(source, "'edits' must be a non-empty list")
    default_caption = _optional_text(data.get("source_caption"), "source_caption", source)
    edits = tuple(_parse_edit(item, index, default_caption, source) for index, item in enumerate(items))
    seen: dict[str, int] = {}
    for index, edit in enumerate(edits):
        if edit.edit_id in seen:
            raise _fail(source, f"edits[{index}] repeats edits[{seen[edit.edit_id]}] ({edit.instruction!r})")
        seen[edit.edit_id] = index
    return EditDocument(
        edits=edits,
        source_caption=default_caption,
        config=_config_overrides(data.get("config"), "config", source),
        source=source,
    )


def _parse_text(text: str, source: str) -> Any:
    try:
        if source.endswith(".json"):
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise _fail(source, f"is not valid {'JSON' if source.endswith('.json') else 'YAML'}: {exc}") from exc


def load_edit_document(path: str | os.PathLike[str]) -> EditDocument:
    """Read and validate an edit document from a local path or an fsspec URL."""
    source = os.fspath(path)
    try:
        with fsspec.open(source, "r", encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError as exc:
        raise _fail(source, "edit file not found") from exc
    except UnicodeDecodeError as exc:
        raise _fail(source, f"is not UTF-8 text: {exc}") from exc
    return parse_edit_document(_parse_text(text, source), source)


def scene_edit_document(scene: SceneRef) -> EditDocument | None:
    """The scene's own ``edits.yaml`` / ``edits.json``, or ``None`` when it has none."""
    fs = scene.root.fs
    present = [name for name in EDIT_FILE_NAMES if fs.isfile(posixpath.join(scene.path, name))]
    if len(present) > 1:
        raise _fail(scene.uri, f"has several edit files {present}; keep one")
    if not present:
        return None
    path = posixpath.join(scene.path, present[0])
    source = scene.root.uri_for(path)
    if not scene.root.contains(path):
        raise _fail(source, "points outside the collection root; refusing to read it")
    with fs.open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(source, f"is not UTF-8 text: {exc}") from exc
    return parse_edit_document(_parse_text(text, source), source)


def collection_edit_document(edits: Any) -> EditDocument | None:
    """Collection-wide edits from a flow/CLI parameter: a path/URL to a file, a document, or ``None``."""
    if edits is None:
        return None
    if isinstance(edits, (str, os.PathLike)):
        return load_edit_document(edits)
    return parse_edit_document(edits, "collection edits parameter")


@dataclass(frozen=True)
class SceneEdit:
    """One edit to run on one scene, with its merged EditConfig overrides."""

    edit: EditSpec
    config_overrides: Mapping[str, Any] = field(hash=False)
    # Where the overrides came from, general to specific: (what names it, its overrides), so a bad
    # value is reported with the file (or parameter) that set it.
    override_sources: tuple[tuple[str, Mapping[str, Any]], ...] = field(default=(), hash=False, compare=False)

    def explain(self, base_config: Any, error: ConfigError) -> str:
        """``error`` (from applying the merged overrides) prefixed with the first source that is wrong alone."""
        for source, overrides in self.override_sources:
            try:
                base_config.overridden(dict(overrides))
            except ConfigError as own:
                return f"{source}: {own}"
        return str(error)


def edits_for_scene(
    scene: SceneRef,
    collection_edits: EditDocument | None,
    base_overrides: Mapping[str, Any] | None = None,
) -> list[SceneEdit]:
    """The edits to run on ``scene``: collection-wide ones, then the scene's own.

    Config overrides merge from general to specific: ``base_overrides`` (the caller's), the
    collection document's ``config``, the scene document's ``config``, the edit's ``config``.  The
    scene's ``source_caption`` also applies to collection-wide edits without one.  Raises
    :class:`ConfigError` naming the scene's edit file when it is invalid.
    """
    scene_document = scene_edit_document(scene)
    sources = [(BASE_OVERRIDES_SOURCE, base_overrides or {})]
    sources += [(f"{document.source}, config", document.config) for document in (collection_edits, scene_document)
                if document is not None]
    shared = {key: value for _, overrides in sources for key, value in overrides.items()}

    def scene_edits(edit: EditSpec, document: EditDocument) -> list[SceneEdit]:
        own = (f"{document.source}, edit {edit.instruction!r}, config", edit.config)
        if not edit.modes:
            return [SceneEdit(edit, {**shared, **edit.config}, tuple(sources) + (own,))]
        return [SceneEdit(edit, {**shared, **edit.config, "mode": mode}, tuple(sources) + (own,)) for mode in edit.modes]

    planned: dict[str, list[SceneEdit]] = {}
    if collection_edits is not None:
        scene_caption = scene_document.source_caption if scene_document else None
        for edit in collection_edits.edits:
            if edit.source_caption is None and scene_caption is not None:
                edit = replace(edit, source_caption=scene_caption)
            planned[edit.edit_id] = scene_edits(edit, collection_edits)
    for edit in scene_document.edits if scene_document else ():
        planned[edit.edit_id] = scene_edits(edit, scene_document)  # the scene's own spec wins
    return [item for items in planned.values() for item in items]


# --------------------------------------------------------------------------------------------------
# Loading a fetched scene, with structure-from-motion poses cached by photo content
# --------------------------------------------------------------------------------------------------


def photos_hash(paths: Sequence[Path], folder: Path) -> str:
    """sha256 over the photos' relative names and bytes: the identity of an SfM input."""
    digest = hashlib.sha256(b"imix2mix-photos-v1")
    for path in paths:
        digest.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def load_scene_cached(folder: str | os.PathLike[str], pose_cache_dir: str | os.PathLike[str] | None) -> Any:
    """``load_scene(folder)``, except that photos without poses are posed by SfM only once.

    Scenes with ``transforms.json`` or a COLMAP model load as usual.  For photo-only scenes the SfM
    cameras and registration report are kept in ``pose_cache_dir/<photos hash>.json`` (a
    transforms.json plus the report), keyed by the photos' bytes, so a re-run, another edit of the
    same scene, or a copy of it elsewhere skips structure from motion.
    """
    from imix2mix.poses import PoseReport, ViewRegistration
    from imix2mix.scene import detect_loader, load_scene, load_transforms_scene, scene_photos, transforms_dict

    folder = Path(folder)
    if pose_cache_dir is None or not folder.is_dir() or detect_loader(folder) != "sfm":
        return load_scene(folder)
    cached = Path(pose_cache_dir) / f"{photos_hash(scene_photos(folder), folder)}.json"
    if cached.is_file():
        data = json.loads(cached.read_text(encoding="utf-8"))
        report = data["registration"]
        registration = PoseReport(
            **{**report, "views": tuple(ViewRegistration(**view) for view in report["views"]),
               "notes": tuple(report.get("notes", ()))}
        )
        scene = load_transforms_scene(folder, json_path=cached)
        return replace(scene, pose_source="sfm", registration=registration)
    scene = load_scene(folder, "sfm")
    content = transforms_dict(scene, root=folder)
    content["registration"] = asdict(scene.registration)
    atomic_write_text(cached, json.dumps(content))
    return scene


# --------------------------------------------------------------------------------------------------
# Planning a batch: scenes × edits, minus what already succeeded
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One (scene, edit) with its effective EditConfig, and the earlier success that makes it skippable."""

    scene: SceneRef
    edit: EditSpec
    config: Any = field(repr=False)  # imix2mix.config.EditConfig with the edit's overrides applied
    config_hash: str
    output_root: OutputRoot = field(repr=False, compare=False)
    folder_name: str  # run_folder_name(instruction, config_hash, preset)
    previous_run: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    scene_content_hash: str | None = None  # scene_content_hash() at planning; None when it could not be read
    claimed_by: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)  # another batch's claim

    @property
    def output_subdir(self) -> PurePosixPath:
        """The output folder relative to the output root, as the manifests record it."""
        return PurePosixPath(self.scene.scene_id) / self.folder_name

    @property
    def output_dir(self) -> str:
        """The output folder as users see it (a local path or a URL)."""
        return self.output_root.uri_of(self.output_subdir.as_posix())

    @property
    def claim(self) -> str:
        """The claim file that keeps two batches on one output root from running this run twice."""
        return f"{self.scene.scene_id}/.{self.folder_name}.claim"

    @property
    def skip(self) -> bool:
        return self.previous_run is not None or self.claimed_by is not None

    @property
    def artifact_parts(self) -> tuple[str, ...]:
        """What names this run among a batch's runs: scene, edit and (besides distill) its mode."""
        mode = getattr(self.config, "mode", "distill")
        return (self.scene.scene_id, self.edit.edit_id) + (() if mode == "distill" else (mode,))

    @property
    def label(self) -> str:
        """Human-readable run name, e.g. ``face · turn him into a knight`` (``… · t2vz`` for a mode other
        than distill)."""
        mode = getattr(self.config, "mode", "distill")
        return f"{self.scene.scene_id} · {self.edit.instruction}" + ("" if mode == "distill" else f" · {mode}")


@dataclass(frozen=True)
class SceneProblem:
    """A scene that cannot be planned (invalid edit file or config overrides)."""

    scene: SceneRef
    error: str


@dataclass(frozen=True)
class CollectionPlan:
    runs: tuple[PlannedRun, ...]
    problems: tuple[SceneProblem, ...] = ()

    @property
    def to_run(self) -> list[PlannedRun]:
        return [run for run in self.runs if not run.skip]

    @property
    def skipped(self) -> list[PlannedRun]:
        return [run for run in self.runs if run.skip]

    def scenes_to_run(self) -> list[SceneRef]:
        """Scenes with at least one run to do, in plan order."""
        return list({run.scene.scene_id: run.scene for run in self.to_run}.values())


def _runs_holding_output_dirs(succeeded: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """output_dir → run_id of the latest success written there.

    Every run of one identity (instruction, config, preset) publishes into the same folder, e.g. again
    after the scene's photos changed, so only the latest success there is still on disk.
    """
    def finished(row: Mapping[str, Any]) -> datetime:
        return row.get("finished_at") or datetime.min.replace(tzinfo=timezone.utc)

    latest: dict[str, Mapping[str, Any]] = {}
    for row in succeeded:
        folder = row.get("output_dir")
        if folder and (folder not in latest or finished(row) >= finished(latest[folder])):
            latest[folder] = row
    return {folder: row.get("run_id") for folder, row in latest.items()}


def _current_content_hash(scene: SceneRef, cache_dir: str | os.PathLike[str] | None) -> str | None:
    """The scene's content hash, or None (nothing is skipped) when its files cannot be read now.

    The runs then go ahead, and ingesting the scene reports the problem (naming the file) in the
    manifest, or retries a passing storage error.
    """
    try:
        return scene_content_hash(scene, cache_dir)
    except (SceneError, OSError) as exc:
        logger.warning("scene %s: cannot hash its files (%s); its runs will not be skipped", scene.uri, exc)
        return None


def plan_collection(
    scenes: Sequence[SceneRef],
    collection_edits: EditDocument | None,
    base_config: Any,
    *,
    preset: str,
    output_root: str | os.PathLike[str] | OutputRoot,
    succeeded: Mapping[tuple[str, str, str], Mapping[str, Any]],
    base_overrides: Mapping[str, Any] | None = None,
    content_cache_dir: str | os.PathLike[str] | None = None,
) -> CollectionPlan:
    """Every (scene, edit) with its effective config; runs that already succeeded are marked skipped.

    ``base_config`` is the preset's :class:`~imix2mix.config.EditConfig`; ``succeeded`` maps
    (scene_id, edit_id, config_hash) to the manifest row of the latest success.  A success counts only
    for the same preset, for the scene's current contents (its ``scene_content_hash`` equals
    :func:`scene_content_hash` now: a scene uploaded again under the same name with other photos or
    poses is edited again; a row without one, written before the column existed, does not count), and
    while its output folder still holds its result: the folder is published
    (:meth:`~imix2mix.storage.OutputRoot.is_published`) and no later success (of the same run on other
    photos) replaced it.  ``content_cache_dir`` caches the content hashes
    by listing.  A scene whose edit file or config overrides are invalid becomes a
    :class:`SceneProblem`; the other scenes are planned normally.
    """
    output_root = open_output_root(output_root)
    holding = _runs_holding_output_dirs(succeeded.values())
    runs: list[PlannedRun] = []
    problems: list[SceneProblem] = []
    for scene in scenes:
        content_hash = _current_content_hash(scene, content_cache_dir)
        try:
            scene_runs = []
            for item in edits_for_scene(scene, collection_edits, base_overrides):
                try:
                    config = base_config.overridden(dict(item.config_overrides)).for_edit(item.edit.to_edit())
                except ConfigError as exc:
                    raise ConfigError(f"scene {scene.scene_id}, edit {item.edit.instruction!r}: "
                                      f"{item.explain(base_config, exc)}") from exc
                config_hash = config.config_hash()
                previous = succeeded.get((scene.scene_id, item.edit.edit_id, config_hash))
                if previous is not None and (
                    previous.get("preset") != preset
                    or content_hash is None
                    or previous.get("scene_content_hash") != content_hash
                    or not previous.get("output_dir")
                    or holding.get(previous["output_dir"]) != previous.get("run_id")
                    or not output_root.is_published(previous["output_dir"])
                ):
                    previous = None
                scene_runs.append(PlannedRun(
                    scene=scene, edit=item.edit, config=config, config_hash=config_hash, output_root=output_root,
                    folder_name=run_folder_name(item.edit.instruction, config_hash, preset), previous_run=previous,
                    scene_content_hash=content_hash,
                ))
        except (ConfigError, SceneError) as exc:
            problems.append(SceneProblem(scene, str(exc)))
            continue
        if not scene_runs:
            problems.append(SceneProblem(scene, f"{scene.uri}: no edits (add an edits.yaml beside the photos, "
                                                "or pass collection-wide edits)"))
        runs.extend(scene_runs)
    return CollectionPlan(tuple(runs), tuple(problems))


# --------------------------------------------------------------------------------------------------
# Claims: two batches on one output root never run the same run twice
# --------------------------------------------------------------------------------------------------

# A claim older than this is taken over even if its owner's host cannot be asked whether the process
# lives (a batch renews its claims when a run starts, so only a run longer than this can lose one).
CLAIM_STALE_SECONDS = 6 * 3600


def claim_runs(plan: CollectionPlan, batch: str | None = None,
               stale_seconds: float = CLAIM_STALE_SECONDS) -> CollectionPlan:
    """``plan`` with a claim taken on each run to do; a run another live batch has claimed is marked
    ``claimed_by`` (skipped) instead.  Stale claims (their process is gone on this host, or older
    than ``stale_seconds``) are taken over.  Release each claim with :func:`release_run` when done."""
    runs = []
    for run in plan.runs:
        if not run.skip:
            owner = claim_file(run.output_root, run.claim, stale_seconds, run=run.label, batch=batch)
            if owner is not None:
                run = replace(run, claimed_by=owner)
        runs.append(run)
    return replace(plan, runs=tuple(runs))


def claim_note(owner: Mapping[str, Any]) -> str:
    """Why a claimed run is skipped, e.g. ``claimed by another batch (host gpu1, pid 4242)``."""
    return f"claimed by another batch (host {owner.get('host')}, pid {owner.get('pid')})"


def release_run(run: PlannedRun) -> None:
    """Give up this process's claim on ``run`` (no-op when it holds none)."""
    release_claim(run.output_root, run.claim)
