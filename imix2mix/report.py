"""The report of an evaluation suite, built from the variants' manifests only.

``report.md`` holds per-variant means of every metric side by side with the paper's Table 1 and
Table 3 numbers, per-edit tables, bar charts (``charts/*.png``, matplotlib) and, per edit, a grid of
the variants' contact sheets (``grids/*.png``).  Nothing in it depends on when or where it was built
(no timestamps, no absolute paths; PNGs without software metadata), so rebuilding it from the same
manifests gives the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from imix2mix.files import atomic_write_bytes
from imix2mix.manifests import RUNS, ManifestError, ManifestStore
from imix2mix.suite import SuiteEdit, SuitePlan, SuiteScene, Variant, outputs_root

# (manifest column, heading); the paper reports the first three.
METRICS = (
    ("clip_cons", "CLIP Cons."),
    ("clip_sim", "CLIP Sim."),
    ("clip_dir", "CLIP Dir."),
    ("epipolar_score", "Epipolar"),
    ("changed_fraction", "Changed px"),
)
PAPER_METRICS = ("clip_cons", "clip_sim", "clip_dir")
TINY_WARNING = ("> **Tiny preset: these numbers are meaningless.** The models have small random weights; "
                "this report shows that the evaluation machinery runs, not how well anything edits.")
_LABEL_WIDTH = 150
_TILE = 96


@dataclass(frozen=True)
class EditResultRow:
    """One (variant, scene, edit, seed) of the suite and its latest succeeded manifest row (None: not run yet)."""

    variant: Variant
    scene: SuiteScene
    edit: SuiteEdit
    edit_id: str
    row: dict[str, Any] | None


def _latest_successes(output_root: Path) -> dict[tuple[str, str], dict[str, Any]]:
    try:
        rows = ManifestStore(output_root).read_rows(RUNS)
    except ManifestError:
        return {}
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["scene_id"], row["edit_id"])
        if row["status"] == "succeeded" and (key not in latest or (row["finished_at"] or oldest) >= (latest[key]["finished_at"] or oldest)):
            latest[key] = row
    return latest


def collect_results(plan: SuitePlan, out: Path) -> list[EditResultRow]:
    """Every (variant, scene, edit, seed) of the plan with its manifest row, in suite order."""
    results = []
    for variant in plan.runnable:
        successes = _latest_successes(outputs_root(out, variant))
        for scene in plan.scenes:
            specs = plan.suite.edit_specs(scene, variant)
            chosen = [edit for edit in scene.edits if variant.all_edits or edit.ablation]
            per_seed = len(plan.suite.seeds)
            for index, spec in enumerate(specs):
                results.append(EditResultRow(variant, scene, chosen[index // per_seed], spec.edit_id,
                                             successes.get((scene.name, spec.edit_id))))
    return results


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(numbers)) if numbers else None


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _cfg(value: float | None) -> str:
    return "default" if value is None else f"{value:g}"


@dataclass(frozen=True)
class TableRow:
    variant: Variant
    runs: int
    expected: int
    means: dict[str, float | None]
    no_edit: int


def table_rows(results: Sequence[EditResultRow], table: int) -> list[TableRow]:
    """Per variant of ``table``: means over its edits (Table 3: the ablation subset)."""
    rows = []
    for variant in dict.fromkeys(r.variant for r in results):
        if table not in variant.tables:
            continue
        mine = [r for r in results if r.variant == variant and (table == 1 or r.edit.ablation)]
        done = [r.row for r in mine if r.row is not None]
        rows.append(TableRow(variant, len(done), len(mine), {name: _mean([row.get(name) for row in done]) for name, _ in METRICS},
                             sum(bool(row.get("no_edit")) for row in done)))
    return rows


def _table_markdown(rows: Sequence[TableRow], table: int) -> list[str]:
    headings = [f"{heading} ours / paper" if name in PAPER_METRICS else heading for name, heading in METRICS]
    lines = ["| Variant | runs | " + " | ".join(headings) + " | no edit |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for row in rows:
        paper = row.variant.paper_numbers(table) or {}
        cells = [f"{_f(row.means[name])} / {_f(paper.get(name))}" if name in PAPER_METRICS else _f(row.means[name])
                 for name, _ in METRICS]
        lines.append(f"| {row.variant.label} (`{row.variant.name}`) | {row.runs}/{row.expected} | "
                     + " | ".join(cells) + f" | {'⚠ ' if row.no_edit else ''}{row.no_edit} |")
    return lines


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bar_chart(rows: Sequence[TableRow], table: int, title: str) -> bytes:
    """One panel per metric: our mean per variant, and the paper's number beside it where it has one."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 * len(METRICS), 3.6), dpi=80)
    axes = figure.subplots(1, len(METRICS))
    names = [row.variant.name for row in rows]
    positions = np.arange(len(rows))
    for axis, (metric, heading) in zip(axes, METRICS):
        ours = [row.means[metric] if row.means[metric] is not None else 0.0 for row in rows]
        axis.bar(positions - 0.2, ours, width=0.4, label="ours", color="#4477aa")
        if metric in PAPER_METRICS:
            paper = [(row.variant.paper_numbers(table) or {}).get(metric) for row in rows]
            axis.bar(positions + 0.2, [p if p is not None else 0.0 for p in paper], width=0.4, label="paper",
                     color="#cc6677")
        axis.set_title(heading)
        axis.set_xticks(positions, names, rotation=45, ha="right", fontsize=7)
        axis.axhline(0.0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _labelled(image: Image.Image, label: str) -> Image.Image:
    canvas = Image.new("RGB", (_LABEL_WIDTH + image.width, image.height), "white")
    canvas.paste(image, (_LABEL_WIDTH, 0))
    ImageDraw.Draw(canvas).text((4, image.height // 2 - 6), label[:24], fill="black")
    return canvas


def contact_grid(sheets: Sequence[tuple[str, Path]]) -> Image.Image | None:
    """The photos (top half of the first contact sheet), then each variant's edits (bottom halves)."""
    rows = []
    for index, (label, path) in enumerate(sheets):
        with Image.open(path) as opened:
            sheet = opened.convert("RGB")
        half = sheet.height // 2
        views = sheet.width // half if half else 0
        size = (_TILE * max(views, 1), _TILE)
        if index == 0:
            rows.append(_labelled(sheet.crop((0, 0, sheet.width, half)).resize(size, Image.Resampling.BICUBIC), "photos"))
        rows.append(_labelled(sheet.crop((0, half, sheet.width, sheet.height)).resize(size, Image.Resampling.BICUBIC), label))
    if not rows:
        return None
    width = max(row.width for row in rows)
    grid = Image.new("RGB", (width, sum(row.height for row in rows)), "white")
    top = 0
    for row in rows:
        grid.paste(row, (0, top))
        top += row.height
    return grid


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _slug(*parts: str) -> str:
    return "--".join(parts)


def build_report(plan: SuitePlan, out: Path) -> str:
    """Write ``report.md``, ``charts/`` and ``grids/`` under ``out`` from the manifests; returns the markdown."""
    out = Path(out)
    results = collect_results(plan, out)
    presets = sorted({r.row["preset"] for r in results if r.row is not None})
    lines = [TINY_WARNING, ""] if "tiny" in presets else []
    suite = plan.suite
    lines += [f"# Evaluation report: suite `{suite.name}`", "",
              suite.description, "",
              f"- views per scene: N = {suite.views}; seeds: {', '.join(map(str, suite.seeds))}; "
              f"preset(s): {', '.join(presets) or 'none run yet'}",
              f"- scenes: {', '.join(f'`{s.name}`' for s in plan.scenes) or 'none'}",
              f"- variants: {', '.join(f'`{v.name}`' for v in plan.runnable) or 'none'}",
              "- each variant's runs and manifests: `variants/<variant>/outputs/` (an ordinary collection output root)"]
    if plan.problems:
        lines += ["", "**Left out:**", ""] + [f"- {problem}" for problem in plan.problems]
    for table, title, scope in ((1, "Table 1: methods", "every edit"),
                                (3, "Table 3: ablations", "the ablation edits (`ablation: true` in the suite)")):
        rows = table_rows(results, table)
        if not rows:
            continue
        chart = Path("charts") / f"table{table}.png"
        atomic_write_bytes(out / chart, bar_chart(rows, table, f"{title} (means over {scope.split(' (')[0]})"))
        lines += ["", f"## {title}", "", f"Means over {scope}; paper numbers from METHOD.md §6 (– where it has none). "
                  "`runs` counts the runs with a result out of those the suite asks for; `no edit` the runs flagged "
                  "as near-identical to the photos.", ""]
        lines += _table_markdown(rows, table)
        lines += ["", f"![{title}]({chart.as_posix()})"]
    lines += ["", "## Per edit"]
    by_edit: dict[tuple[str, str], list[EditResultRow]] = {}
    for result in results:
        by_edit.setdefault((result.scene.name, result.edit_id), []).append(result)
    for (scene_name, edit_id), rows in by_edit.items():
        edit = rows[0].edit
        lines += ["", f"### {scene_name} · {edit.instruction} (`{edit_id}`)", "",
                  f"Target caption: {edit.target_caption or '–'}; s_T {_cfg(edit.text_cfg)}, s_I {_cfg(edit.image_cfg)}"
                  + ("; in the ablation subset" if edit.ablation else ""), "",
                  "| Variant | " + " | ".join(heading for _, heading in METRICS) + " | no edit | output |",
                  "|---|" + "---|" * len(METRICS) + "---|---|"]
        sheets = []
        for result in rows:
            row = result.row or {}
            cells = " | ".join(_f(row.get(name)) for name, _ in METRICS)
            flag = "⚠ no edit" if row.get("no_edit") else ("–" if result.row is None else "")
            folder = Path("variants") / result.variant.name / "outputs" / row["output_dir"] if row.get("output_dir") else None
            lines.append(f"| `{result.variant.name}` | {cells} | {flag} | "
                         + (f"`{folder.as_posix()}`" if folder else "not run yet") + " |")
            if folder is not None and (out / folder / "contact_sheet.png").is_file():
                sheets.append((result.variant.name, out / folder / "contact_sheet.png"))
        grid = contact_grid(sheets)
        if grid is not None:
            path = Path("grids") / f"{_slug(scene_name, edit_id)}.png"
            atomic_write_bytes(out / path, _png_bytes(grid))
            lines += ["", f"![contact sheets: photos, then each variant's edits]({path.as_posix()})"]
    lines += ["", "## The metrics", "",
              "- **CLIP Sim.**: mean over views of cos(φ(edit), ψ(target caption)) (OpenAI CLIP ViT-L/14).",
              "- **CLIP Dir.**: mean over views of cos(φ(edit) − φ(photo), ψ(target) − ψ(source caption)).",
              "- **CLIP Cons.**: mean over all view pairs of cos(φ(photo_i) − φ(photo_j), φ(edit_i) − φ(edit_j)).",
              "- **Epipolar**: fraction of view pairs whose SIFT matches lie on the epipolar lines of the known "
              "cameras (median symmetric distance under 4 px at 512², at least 10 matches), divided by the same "
              "fraction on the photos; 1 = as consistent as the photos.",
              "- **Changed px**: fraction of pixels (64² downsampled) that differ from the photo by more than 0.1; "
              "`no edit` flags runs under 1 % (or under 3 % with CLIP Dir. under 0.05).", ""]
    markdown = "\n".join(lines)
    atomic_write_bytes(out / "report.md", markdown.encode("utf-8"))
    return markdown
