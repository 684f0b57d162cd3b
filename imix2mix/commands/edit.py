"""``imix2mix edit SCENE`` (the whole I-Mix2Mix run) and ``imix2mix preview SCENE`` (the teacher's
edit of the reference view only, to check an instruction before spending a distillation on it)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from imix2mix.commands import add_selection_arguments, selected_settings
from imix2mix.errors import ConfigError


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scene", type=Path, help="scene folder (transforms.json, COLMAP model, or photos for SfM)")
    parser.add_argument("--instruction", "-i", required=True, help='edit instruction, e.g. "Turn him into a knight"')
    parser.add_argument("--preset", choices=("full", "tiny"), default="full",
                        help="full: official weights; tiny: small random models that exercise the pipeline (not real edits)")
    parser.add_argument("--out", default="outputs",
                        help="output root, a folder or an fsspec URL (s3://bucket/prefix); the run's folder is "
                             "OUT/<scene>/<instruction slug>-<run hash> (default: outputs)")
    parser.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE",
                        help="override an EditConfig setting, e.g. --set k=25 --set cross_view_attention=none (repeatable)")
    add_selection_arguments(parser)
    parser.add_argument("--target-caption", default=None,
                        help="caption of the edited scene (CLIP Sim./Dir.; the prompt of the controlnet_* teachers)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="local folder with seva/, seva_vae/, clip_h/, teacher/, clip_metrics/ instead of the Hugging Face Hub")
    parser.add_argument("--random-weights", action="store_true", help="full preset: random full-size models (benchmarks)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU runs: torch/OpenMP threads (default: $OMP_NUM_THREADS if set, else half the CPUs "
                             "this process may use, at least 1)")


def register(subparsers: argparse._SubParsersAction) -> None:
    edit = subparsers.add_parser("edit", help="edit all views of a scene consistently (I-Mix2Mix)")
    _add_common_arguments(edit)
    edit.add_argument("--source-caption", default=None, help="caption of the original scene (CLIP Dir.)")
    edit.add_argument("--no-metrics", action="store_true", help="skip the CLIP metrics (and loading CLIP ViT-L/14)")
    edit.set_defaults(handler=run_edit)

    preview = subparsers.add_parser("preview", help="only the teacher's edit of the reference view (preview.png)")
    _add_common_arguments(preview)
    preview.set_defaults(handler=run_preview)


def cpu_threads(requested: int | None, environ: Mapping[str, str], usable_cpus: int) -> int:
    """Threads for a CPU run: ``--threads``, else ``OMP_NUM_THREADS``, else half the usable CPUs (≥ 1).

    Not all of them: OpenMP threads that compete with other processes for the cores spin while they
    wait, and a tiny run on a busy 2-core machine took 151–161 s with 2 threads, 10 s with 1.
    """
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads must be ≥ 1, got {requested}")
        return requested
    try:
        return max(1, int(environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, usable_cpus // 2)


def _setup(args: argparse.Namespace, *, metrics: bool):
    import torch

    from imix2mix.config import apply_allocator, default_config
    from imix2mix.presets import WeightSources, build_editor
    from imix2mix.scene import load_scene

    # A bad --set is refused before anything is read or built.
    config = default_config(args.preset).overridden(selected_settings(args))
    apply_allocator(args.memory, os.environ)  # before this process first touches CUDA
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if device == "cpu":
        torch.set_num_threads(cpu_threads(args.threads, os.environ, len(os.sched_getaffinity(0))))
    scene = load_scene(args.scene)
    weights = WeightSources.local(args.weights_dir) if args.weights_dir else None
    editor = build_editor(args.preset, device=device, weights=weights, random_weights=args.random_weights, metrics=metrics)
    if editor.random_weights:
        print("note: random weights: this run exercises the pipeline; its images are not real edits", file=sys.stderr)
    return scene, editor, config


def _check_output_root(args: argparse.Namespace):
    """The output root, checked before any model loads (one clear line if it cannot take a run)."""
    from imix2mix.storage import check_output_root

    return check_output_root(args.out)


def _run_folder(args: argparse.Namespace, scene, edit, config) -> str:
    """``<scene>/<instruction slug>-<run hash>``: the same rule as a collection run's folder."""
    from imix2mix.collection import run_folder_name

    return f"{scene.name}/{run_folder_name(edit.instruction, config.for_edit(edit).config_hash(), args.preset)}"


def run_edit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from imix2mix.edits import Edit
    from imix2mix.evaluation import evaluate_result, format_score
    from imix2mix.outputs import write_edit_outputs

    edit = Edit(args.instruction, source_caption=args.source_caption, target_caption=args.target_caption)
    root = _check_output_root(args)
    scene, editor, config = _setup(args, metrics=not args.no_metrics)
    console = Console(stderr=True)
    columns = (TextColumn("[bold]distilling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("distill", total=config.for_edit(edit).total_iterations or None, status="reference edit…")

        def on_progress(event) -> None:
            status = f"τ={event.tau} t={event.t} lr={event.lr:.2e}"
            if event.loss is not None:
                status += f" loss={event.loss:+.3e} |g|={event.grad_norm:.3f}"
            bar.update(task, completed=event.iteration, total=event.total, status=status)

        result = editor.edit(scene, edit, config, progress=on_progress)
    metrics = editor.score(result, edit) if editor.clip_metrics is not None else None
    evaluation = evaluate_result(result, scene, metrics)
    folder = _run_folder(args, scene, edit, config)
    staging = root.staging(folder)  # written completely, then published in one step: a failure keeps the old folder
    try:
        write_edit_outputs(result, scene, staging, metrics, evaluation=evaluation)
        root.publish(staging, folder)
    finally:
        root.discard(staging)
    console.print(f"reference view {result.reference_index} ({scene.views[result.reference_index].name}), "
                  f"{result.iterations} iterations in {result.timings['total']:.1f} s")
    if metrics is not None:
        parts = [f"{name} {value:.4f}" for name, value in
                 (("CLIP Sim.", metrics.clip_sim), ("CLIP Dir.", metrics.clip_dir), ("CLIP Cons.", metrics.clip_cons)) if value is not None]
        console.print(", ".join(parts) or "no metrics")
    epipolar = evaluation.epipolar
    console.print(f"epipolar consistency {format_score(epipolar.score)} (consistent pairs: edited "
                  f"{epipolar.edited.consistent}/{epipolar.edited.measured}, source "
                  f"{epipolar.source.consistent}/{epipolar.source.measured} measured)")
    if evaluation.no_edit:
        console.print(f"[bold yellow]warning: no edit happened[/]: {evaluation.change.reason}")
    print(root.uri_of(folder))
    return 0


def run_preview(args: argparse.Namespace) -> int:
    from imix2mix.edits import Edit
    from imix2mix.outputs import png_bytes

    root = _check_output_root(args)
    scene, editor, config = _setup(args, metrics=False)
    edit = Edit(args.instruction, target_caption=args.target_caption)
    reference, image = editor.preview(scene, edit, config)
    relative = f"{_run_folder(args, scene, edit, config)}/preview.png"
    root.write_bytes(relative, png_bytes(image))
    print(f"reference view {reference} ({scene.views[reference].name}) → {root.uri_of(relative)}", file=sys.stderr)
    print(root.uri_of(relative))
    return 0
