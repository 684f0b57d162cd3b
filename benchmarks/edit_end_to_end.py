"""The whole product path on a GPU with random full-size weights: ``Editor.edit`` on a real scene
(reference edit, distillation, Euler steps, decode, paste-back, CLIP metrics), and the two baselines.
Measures the path, never quality (the weights are random).

    python benchmarks/edit_end_to_end.py --scene examples/face --k 2      # 40 τ × 2 iterations
    python benchmarks/edit_end_to_end.py --modes distill,t2vz,distill:controlnet_canny   # MODE[:TEACHER]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imix2mix.edits import Edit  # noqa: E402
from imix2mix.presets import build_editor  # noqa: E402
from imix2mix.scene import load_scene  # noqa: E402

EDIT = Edit("turn him into a knight", source_caption="a photo of a man", target_caption="a photo of a knight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, default=Path("examples/face"))
    parser.add_argument("--k", type=int, default=2, help="iterations per τ (and k_initial): a short schedule")
    parser.add_argument("--teacher-steps", type=int, default=5)
    parser.add_argument("--modes", default="distill,teacher_only,student_only", help="comma-separated MODE or MODE:TEACHER")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EditConfig override")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    editor = build_editor("full" if device.type == "cuda" else "tiny", device=device, random_weights=True, metrics=True)
    report = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "build_seconds": round(time.perf_counter() - started, 1), "runs": {}}
    scene = load_scene(args.scene)
    for run in args.modes.split(","):
        mode, _, teacher = run.partition(":")
        overrides = {"k": args.k, "k_initial": args.k, "teacher_steps": args.teacher_steps, "mode": mode,
                     **({"teacher": teacher} if teacher else {}), **dict(item.split("=", 1) for item in args.set)}
        config = editor.default_config.overridden(overrides)
        started = time.perf_counter()
        result = editor.edit(scene, EDIT, config)
        seconds = time.perf_counter() - started
        finite = all(np.isfinite(view.astype(np.float32)).all() for view in result.views)
        report["runs"][run] = {
            "seconds": round(seconds, 1), "iterations": result.iterations, "views": len(result.views),
            "view_shape": list(result.views[0].shape), "full_view_shapes": [list(v.shape) for v in result.full_views],
            "finite": bool(finite), "metrics": {k: getattr(editor.score(result), k) for k in ("clip_sim", "clip_dir", "clip_cons")},
            "peak_memory_gib": round((result.peak_memory_bytes or 0) / 2**30, 1),
            "timings": {k: round(v, 2) for k, v in result.timings.items()},
        }
        print(run, json.dumps(report["runs"][run], default=str), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "edit_end_to_end.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
