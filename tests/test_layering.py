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


# The orchestration process plans, schedules and records; the engine runs in the Ray workers.
ORCHESTRATION_MODULES = ("flows.edit_collection", "flows.edit_scene", "flows.evaluate_suite", "tasks.plan", "tasks.distill",
                         "tasks.poses", "tasks.workers", "deployments.watcher", "imix2mix.commands.pipeline",
                         "imix2mix.commands.evaluate", "imix2mix.evaluation", "imix2mix.cli")
ENGINE = ("torch", "diffusers", "transformers", "imix2mix.editor", "imix2mix.modes", "imix2mix.presets")


def test_importing_the_flows_and_the_collection_command_loads_no_torch_and_no_engine():
    code = (
        "import importlib, sys\n"
        f"for name in {ORCHESTRATION_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "import imix2mix.cli\n"
        "imix2mix.cli.build_parser()\n"
        f"print(','.join(sorted(m for m in {ENGINE!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"importing the orchestration modules loaded: {out.stdout.strip()}"


def test_flows_and_deployments_default_to_the_full_preset():
    """A deployment that forgets the preset must not silently produce random-weight noise."""
    import inspect

    from flows.edit_collection import edit_collection
    from flows.edit_scene import edit_scene

    for flow in (edit_collection, edit_scene):
        assert inspect.signature(flow.fn).parameters["preset"].default == "full"
    assert 'IMIX2MIX_PRESET="${IMIX2MIX_PRESET:-full}"' in (REPO_ROOT / "deployments" / "setup_pool.sh").read_text()
