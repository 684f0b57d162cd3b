"""``imix2mix inspect SCENE`` and ``imix2mix poses SCENE``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from imix2mix.errors import RegistrationError, SceneError
from imix2mix.poses import PoseReport, SfmOptions, ViewRegistration
from imix2mix.scene import LOADERS, TRANSFORMS_FILE, Scene, load_scene, write_transforms_json


def _format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return lines


def _entry_cells(entry: ViewRegistration) -> list[str]:
    error = "-" if entry.mean_reprojection_error is None else f"{entry.mean_reprojection_error:.3f}"
    return ["yes" if entry.registered else "NO", error]


def _registration_cells(report: PoseReport | None, name: str) -> list[str]:
    entry = report.view(name) if report is not None else None
    return ["given", "-"] if entry is None else _entry_cells(entry)


def _registration_summary(report: PoseReport) -> str:
    overall = "-" if report.mean_reprojection_error is None else f"{report.mean_reprojection_error:.3f} px"
    timing = "" if report.seconds is None else f", {report.seconds:.1f} s"
    return f"{report.num_points3D} 3D points, mean reprojection error {overall}{timing}"


def report_lines(report: PoseReport) -> list[str]:
    rows = [[entry.name, *_entry_cells(entry), str(entry.num_observations)] for entry in report.views]
    lines = _format_table(["photo", "registered", "reproj px", "observations"], rows)
    lines.append(f"{report.source}: {_registration_summary(report)}")
    return lines


def scene_lines(scene: Scene) -> list[str]:
    lines = [
        f"scene:         {scene.name}" + (f"  ({scene.root})" if scene.root is not None else ""),
        f"views:         {len(scene)}",
        f"pose source:   {scene.pose_source}",
        f"content hash:  {scene.content_hash}",
        "",
    ]
    rows = []
    for index, view in enumerate(scene.views):
        centre = view.c2w[:3, 3]
        rows.append(
            [
                str(index),
                view.name,
                f"{view.width}x{view.height}",
                f"{view.K[0, 0]:.1f}",
                f"{view.K[1, 1]:.1f}",
                f"{view.K[0, 2]:.1f},{view.K[1, 2]:.1f}",
                np.array2string(centre, precision=3, suppress_small=True, separator=","),
                *_registration_cells(scene.registration, view.name),
            ]
        )
    lines += _format_table(["#", "name", "size", "fx", "fy", "cx,cy", "camera centre", "registered", "reproj px"], rows)
    if scene.registration is not None:
        lines.append("")
        lines.append(f"registration:  {_registration_summary(scene.registration)}")
    return lines


def _print_failed_registration(error: RegistrationError, stream: TextIO) -> None:
    report = getattr(error, "report", None)
    if report is not None:
        print("\n".join(report_lines(report)), file=stream)


def run_inspect(args: argparse.Namespace) -> int:
    try:
        scene = load_scene(args.scene, loader=args.loader)
    except RegistrationError as error:
        _print_failed_registration(error, sys.stderr)
        raise
    print("\n".join(scene_lines(scene)))
    return 0


def run_poses(args: argparse.Namespace) -> int:
    scene_dir = Path(args.scene)
    if not scene_dir.is_dir():
        raise SceneError(scene_dir, "scene folder does not exist")
    out_path = Path(args.out) if args.out else scene_dir / TRANSFORMS_FILE
    if out_path.exists() and not args.force:  # before spending time on SfM
        raise SceneError(out_path, "already exists; pass --force to overwrite it")
    try:
        scene = load_scene(scene_dir, loader="sfm", max_image_size=args.max_image_size)
    except RegistrationError as error:
        _print_failed_registration(error, sys.stderr)
        raise
    print("\n".join(report_lines(scene.registration)))
    written = write_transforms_json(scene, out_path, force=args.force)
    print(f"wrote {written} ({len(scene)} cameras)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    inspect = subparsers.add_parser(
        "inspect",
        help="load a scene and show its views, cameras, pose source, registration quality and content hash",
    )
    inspect.add_argument("scene", help="scene folder (photos, optional transforms.json or sparse/0), or a transforms.json")
    inspect.add_argument(
        "--loader", choices=LOADERS, default="auto",
        help="how to get poses (auto: transforms.json, else COLMAP sparse model, else structure from motion)",
    )
    inspect.set_defaults(handler=run_inspect)

    poses = subparsers.add_parser(
        "poses", help="estimate camera poses with structure from motion and write a nerfstudio transforms.json"
    )
    poses.add_argument("scene", help="scene folder with 3-32 photos (in images/ or directly inside)")
    poses.add_argument("--out", help=f"output file (default: SCENE/{TRANSFORMS_FILE})")
    poses.add_argument("--force", action="store_true", help="overwrite an existing output file")
    poses.add_argument("--max-image-size", type=int, default=SfmOptions().max_image_size, help="longest side used for feature extraction")
    poses.set_defaults(handler=run_poses)
