"""The library layer must stay usable without Prefect or Ray (docs/architecture.md, "Layers")."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys

from conftest import REPO_ROOT

import imix2mix

ORCHESTRATION = ("prefect", "ray", "flows", "tasks", "deployments")
# The console entry point may start flows, but only from inside a command handler (lazy import).
LAZY_ALLOWED = {"imix2mix/commands/pipeline.py", "imix2mix/commands/evaluate.py"}


def _module_level_imports(path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in tree.body:  # module level only; nested imports are checked separately below
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _all_imports(path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _is_orchestration(name: str) -> bool:
    return name.split(".")[0] in ORCHESTRATION


def test_library_sources_do_not_import_orchestration():
    offenders = []
    for path in sorted((REPO_ROOT / "imix2mix").rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).as_posix()
        imports = _module_level_imports(path) if rel in LAZY_ALLOWED else _all_imports(path)
        offenders += [f"{rel}: {name}" for name in imports if _is_orchestration(name)]
    assert not offenders, "library modules import orchestration packages:\n" + "\n".join(offenders)


def test_importing_every_library_module_loads_neither_prefect_nor_ray():
    modules = [m.name for m in pkgutil.walk_packages(imix2mix.__path__, "imix2mix.")]
    assert len(modules) > 3
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in ('prefect', 'ray') if m in sys.modules)\n"
        "print(','.join(leaked))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"importing the library loaded: {out.stdout.strip()}"
