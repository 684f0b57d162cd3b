"""Evaluation suites: scenes × edits × named variants (config overrides), run as ordinary collections.

A suite file (YAML; ``imix2mix/suites/<name>.yaml`` ships the paper's) holds::

    name: paper
    views: 4                      # N: every scene must have exactly this many photos
    seeds: [42]                   # each edit runs once per seed
    scenes:
      - name: face
        path: examples/face       # relative to the data folder (--data), or absolute
        download: "..."           # optional: where to get the scene when the folder is missing
        source_caption: "..."
        edits:
          - {instruction: ..., target_caption: ..., text_cfg: 7.5, image_cfg: 1.5, ablation: true}
    variants:
      - name: distill
        label: "..."
        tables: [1, 3]            # Table 1 rows run every edit; Table 3-only rows the `ablation` edits
        config: {mode: distill}   # EditConfig overrides
        paper: {table1: {clip_cons: 0.342, clip_sim: 0.258, clip_dir: 0.173}}

Each variant is an ordinary collection run (:mod:`imix2mix.collection`) with its own output root,
``<out>/variants/<variant>/outputs``, over a staged collection root ``<out>/variants/<variant>/inputs``
that holds a copy of each scene's input files (hard links where possible) and a generated
``edits.yaml`` with the variant's edits: resume, skip and the manifests work as for any collection,
and two variants never share an output folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from imix2mix.collection import NOT_SCENE_INPUTS, EditSpec
from imix2mix.errors import ConfigError, SceneError
from imix2mix.files import atomic_write_bytes

METRIC_NAMES = ("clip_cons", "clip_sim", "clip_dir")
TABLES = (1, 3)


@dataclass(frozen=True)
class SuiteEdit:
    instruction: str
    target_caption: str | None = None
    text_cfg: float | None = None
    image_cfg: float | None = None
    ablation: bool = False  # part of the ablation subset (Table 3)


@dataclass(frozen=True)
class SuiteScene:
    name: str
    path: str  # as written in the suite
    source_caption: str | None
    edits: tuple[SuiteEdit, ...]
    download: str | None = None

    def folder(self, data_root: Path) -> Path:
        path = Path(self.path).expanduser()
        return path if path.is_absolute() else data_root / path


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    tables: tuple[int, ...]
    config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    paper: Mapping[str, Mapping[str, float]] = field(default_factory=dict, hash=False)  # "table1" -> metrics

    @property
    def all_edits(self) -> bool:
        """Table 1 variants run every edit; Table 3-only variants the ablation subset."""
        return 1 in self.tables

    def paper_numbers(self, table: int) -> Mapping[str, float] | None:
        return self.paper.get(f"table{table}")


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    views: int
    seeds: tuple[int, ...]
    scenes: tuple[SuiteScene, ...]
    variants: tuple[Variant, ...]
    source: str = "<suite>"

    def select(self, scenes: Sequence[str] | None = None, variants: Sequence[str] | None = None) -> "Suite":
        """The suite restricted to the named scenes and variants (None: all); unknown names are an error."""
        def pick(items: tuple, names: Sequence[str] | None, what: str) -> tuple:
            if not names:
                return items
            known = {item.name: item for item in items}
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ConfigError(f"{self.source}: no {what} {unknown}; the suite has {sorted(known)}")
            return tuple(item for item in items if item.name in set(names))

        return Suite(self.name, self.description, self.views, self.seeds, pick(self.scenes, scenes, "scene(s)"),
                     pick(self.variants, variants, "mode(s)"), self.source)

    def edit_specs(self, scene: SuiteScene, variant: Variant) -> list[EditSpec]:
        """The edits ``variant`` runs on ``scene``, once per seed, as collection edit specs."""
        return [
            EditSpec(instruction=edit.instruction, source_caption=scene.source_caption,
                     target_caption=edit.target_caption, text_cfg=edit.text_cfg, image_cfg=edit.image_cfg, seed=seed)
            for edit in scene.edits if variant.all_edits or edit.ablation
            for seed in self.seeds
        ]


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def _fail(source: str, reason: str) -> ConfigError:
    return ConfigError(f"{source}: {reason}")


def _keys(data: Any, where: str, source: str, required: set[str], optional: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise _fail(source, f"{where} must be a mapping, got {data!r}")
    missing, unknown = required - set(data), set(data) - required - optional
    if missing:
        raise _fail(source, f"{where} needs {sorted(missing)}")
    if unknown:
        raise _fail(source, f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(required | optional)}")
    return data


def _text(value: Any, where: str, source: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, f"{where} must be a non-empty string, got {value!r}")
    return value.strip()


def _number(value: Any, where: str, source: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, f"{where} must be a number, got {value!r}")
    return float(value)


def _parse_scene(data: Any, index: int, source: str) -> SuiteScene:
    where = f"scenes[{index}]"
    data = _keys(data, where, source, {"name", "path", "edits"}, {"source_caption", "download"})
    items = data["edits"]
    if not isinstance(items, list) or not items:
        raise _fail(source, f"{where}.edits must be a non-empty list")
    edits = []
    for number, item in enumerate(items):
        at = f"{where}.edits[{number}]"
        item = _keys(item, at, source, {"instruction"}, {"target_caption", "text_cfg", "image_cfg", "ablation"})
        edits.append(SuiteEdit(
            instruction=_text(item["instruction"], f"{at}.instruction", source),
            target_caption=_text(item.get("target_caption"), f"{at}.target_caption", source, optional=True),
            text_cfg=_number(item.get("text_cfg"), f"{at}.text_cfg", source),
            image_cfg=_number(item.get("image_cfg"), f"{at}.image_cfg", source),
            ablation=bool(item.get("ablation", False)),
        ))
    return SuiteScene(
        name=_text(data["name"], f"{where}.name", source), path=_text(data["path"], f"{where}.path", source),
        source_caption=_text(data.get("source_caption"), f"{where}.source_caption", source, optional=True),
        edits=tuple(edits), download=_text(data.get("download"), f"{where}.download", source, optional=True),
    )


def _parse_variant(data: Any, index: int, source: str) -> Variant:
    where = f"variants[{index}]"
    data = _keys(data, where, source, {"name", "tables"}, {"label", "config", "paper"})
    tables = data["tables"]
    if not isinstance(tables, list) or not tables or not set(tables) <= set(TABLES):
        raise _fail(source, f"{where}.tables must be a non-empty list of {list(TABLES)}, got {tables!r}")
    config = data.get("config") or {}
    if not isinstance(config, Mapping) or not all(isinstance(key, str) for key in config):
        raise _fail(source, f"{where}.config must be a mapping of EditConfig field names to values")
    paper = data.get("paper") or {}
    for table, numbers in paper.items() if isinstance(paper, Mapping) else [(None, None)]:
        if table not in {f"table{t}" for t in TABLES} or not isinstance(numbers, Mapping) or set(numbers) - set(METRIC_NAMES):
            raise _fail(source, f"{where}.paper must map table1/table3 to {list(METRIC_NAMES)} values, got {paper!r}")
    name = _text(data["name"], f"{where}.name", source)
    return Variant(name=name, label=_text(data.get("label"), f"{where}.label", source, optional=True) or name,
                   tables=tuple(tables), config=dict(config),
                   paper={table: {k: float(v) for k, v in numbers.items()} for table, numbers in paper.items()})


def parse_suite(data: Any, source: str = "<suite>") -> Suite:
    """Validate a suite document (already parsed from YAML); errors name ``source`` and the entry."""
    data = _keys(data, "the suite", source, {"name", "scenes", "variants"}, {"description", "views", "seeds"})
    views = data.get("views", 4)
    if isinstance(views, bool) or not isinstance(views, int) or views < 2:
        raise _fail(source, f"views must be an integer ≥ 2, got {views!r}")
    seeds = data.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise _fail(source, f"seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    for key in ("scenes", "variants"):
        if not isinstance(data[key], list) or not data[key]:
            raise _fail(source, f"{key} must be a non-empty list")
    scenes = tuple(_parse_scene(item, index, source) for index, item in enumerate(data["scenes"]))
    variants = tuple(_parse_variant(item, index, source) for index, item in enumerate(data["variants"]))
    for what, names in (("scene", [s.name for s in scenes]), ("variant", [v.name for v in variants])):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise _fail(source, f"{what} name(s) {repeated} appear more than once")
    return Suite(name=_text(data["name"], "name", source), description=str(data.get("description") or ""),
                 views=views, seeds=tuple(seeds), scenes=scenes, variants=variants, source=source)


def bundled_suites() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("imix2mix.suites").iterdir()
                  if p.name.endswith(".yaml"))


def load_suite(name_or_path: str | os.PathLike[str]) -> Suite:
    """A bundled suite by name (``paper``) or a suite file by path."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file():
        if text in bundled_suites():
            bundled = resources.files("imix2mix.suites") / f"{text}.yaml"
            return parse_suite(yaml.safe_load(bundled.read_text(encoding="utf-8")), f"suite '{text}' ({bundled})")
        raise ConfigError(f"{text}: no such suite file, and not a bundled suite ({', '.join(bundled_suites())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _fail(str(path), f"is not valid YAML: {exc}") from exc
    return parse_suite(data, str(path))


# --------------------------------------------------------------------------------------------------
# Staging: one collection root per variant
# --------------------------------------------------------------------------------------------------


def variant_dir(out: Path, variant: Variant) -> Path:
    return Path(out) / "variants" / variant.name


def inputs_root(out: Path, variant: Variant) -> Path:
    return variant_dir(out, variant) / "inputs"


def outputs_root(out: Path, variant: Variant) -> Path:
    return variant_dir(out, variant) / "outputs"


def scene_problem(suite: Suite, scene: SuiteScene, data_root: Path) -> str | None:
    """Why ``scene`` cannot run (missing folder, with where to get it; wrong number of photos), or None."""
    from imix2mix.scene import scene_photos

    folder = scene.folder(data_root)
    if not folder.is_dir():
        hint = f": {scene.download}" if scene.download else ""
        where = scene.path if Path(scene.path).is_absolute() else f"{scene.path} (under the data folder)"
        return f"scene '{scene.name}': folder {where} not found{hint}"
    try:
        count = len(scene_photos(folder))
    except SceneError as exc:
        return f"scene '{scene.name}': {exc}"
    if count != suite.views:
        return f"scene '{scene.name}': {scene.path} has {count} photos, the suite evaluates N = {suite.views}"
    return None


def variant_problem(variant: Variant, base_config: Any) -> str | None:
    """Why ``variant`` cannot run with this engine (e.g. a mode it does not know), or None."""
    try:
        base_config.overridden(dict(variant.config))
    except ConfigError as exc:
        return f"mode '{variant.name}': not run, this engine refuses its settings {dict(variant.config)} ({exc})"
    return None


def _link_or_copy(source: Path, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.stat().st_size and target.read_bytes() == source.read_bytes():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.staging")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def stage_scene(scene: SuiteScene, edits: Sequence[EditSpec], data_root: Path, destination: Path) -> Path:
    """``destination`` holding the scene's input files and an ``edits.yaml`` of ``edits`` (idempotent)."""
    folder = scene.folder(data_root)
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and relative.as_posix() not in NOT_SCENE_INPUTS and not relative.name.startswith("."):
            _link_or_copy(path, destination / relative)
    document = {"edits": [{key: value for key, value in (
        ("instruction", e.instruction), ("source_caption", e.source_caption), ("target_caption", e.target_caption),
        ("text_cfg", e.text_cfg), ("image_cfg", e.image_cfg), ("seed", e.seed)) if value is not None} for e in edits]}
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    edits_file = destination / "edits.yaml"
    if not edits_file.is_file() or edits_file.read_text(encoding="utf-8") != text:
        atomic_write_bytes(edits_file, text.encode("utf-8"))
    return destination


@dataclass(frozen=True)
class SuitePlan:
    """What an evaluation runs: per runnable variant its staged collection root and output root."""

    suite: Suite
    runnable: tuple[Variant, ...]
    problems: tuple[str, ...]  # scenes and variants that are left out, one line each
    scenes: tuple[SuiteScene, ...]  # the scenes that run


def plan_suite(suite: Suite, out: Path, data_root: Path, base_config: Any, *, stage: bool = True) -> SuitePlan:
    """Check scenes and variants, and (``stage``) write each runnable variant's collection root."""
    problems, scenes = [], []
    for scene in suite.scenes:
        problem = scene_problem(suite, scene, data_root)
        if problem:
            problems.append(problem)
        else:
            scenes.append(scene)
    runnable = []
    for variant in suite.variants:
        problem = variant_problem(variant, base_config)
        if problem:
            problems.append(problem)
            continue
        runnable.append(variant)
        if stage:
            for scene in scenes:
                stage_scene(scene, suite.edit_specs(scene, variant), data_root, inputs_root(out, variant) / scene.name)
    return SuitePlan(suite, tuple(runnable), tuple(problems), tuple(scenes))
