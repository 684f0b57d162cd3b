"""What a run shows in the Prefect UI: live progress, a metrics table, the contact sheet, a batch summary."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image
from prefect import get_run_logger, runtime
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from imix2mix.collection import PlannedRun

_THUMBNAIL_WIDTH = 768  # the contact sheet is embedded in the artifact: keep it small


def artifact_key(*parts: str) -> str:
    """A key unique to this flow run (the Artifacts page lists the latest version of each key, so a key
    shared by every run would hide earlier runs).  Prefect keys allow lower-case letters, digits and dashes."""
    flow_run_id = str(runtime.flow_run.id or "")[:8]
    text = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")
    return f"{text[:120 - len(flow_run_id) - 1]}-{flow_run_id}".strip("-")


class ProgressArtifact:
    """A progress artifact for one run, advanced from the actor's progress reports."""

    def __init__(self, run: PlannedRun):
        self.run = run
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=artifact_key("progress", *run.artifact_parts),
            description=f"Distillation of {run.label}",
        )
        self._percent = 0
        self._logged_decile = 0

    def update(self, report: dict[str, Any], worker: str) -> None:
        total = max(int(report.get("total") or 0), 1)
        percent = min(100, int(100 * int(report.get("iteration") or 0) / total))
        if percent > self._percent:
            self._percent = percent
            update_progress_artifact(self.artifact_id, progress=float(percent))
        if percent // 10 > self._logged_decile:
            self._logged_decile = percent // 10
            loss = report.get("loss")
            get_run_logger().info(
                "%s: iteration %s/%s (τ=%s, t=%s%s) on %s", self.run.label, report.get("iteration"), total,
                report.get("tau"), report.get("t"), "" if loss is None else f", loss={loss:.4g}", worker,
            )

    def finish(self) -> None:
        if self._percent < 100:
            update_progress_artifact(self.artifact_id, progress=100.0)


def publish_run_artifacts(run: PlannedRun, outcome: Any, contact_sheet: Path) -> None:
    """A table of the run's CLIP metrics (overall and per view) and a markdown view of the contact sheet."""
    metrics = outcome.metrics
    if metrics is not None:
        rows = [{"view": "all", "clip_sim": metrics.clip_sim, "clip_dir": metrics.clip_dir,
                 "clip_cons": metrics.clip_cons}]
        rows += [{"view": index, "clip_sim": view.clip_sim, "clip_dir": view.clip_dir, "clip_cons": view.clip_cons}
                 for index, view in enumerate(metrics.views)]
        create_table_artifact(table=rows, key=artifact_key("metrics", *run.artifact_parts), description=f"CLIP metrics of {run.label}")
    result = outcome.result
    create_markdown_artifact(
        key=artifact_key("contact-sheet", *run.artifact_parts),
        description=f"Contact sheet of {run.label}",
        markdown="\n".join([
            f"### {run.label}",
            f"![contact sheet: originals on top, edits below]({_thumbnail_data_uri(contact_sheet)})",
            "",
            f"- output: `{run.output_dir}`",
            f"- iterations: {result.iterations}, device: {result.device}, worker: {outcome.worker}"
            + (f" (after {outcome.attempts} attempts)" if outcome.attempts > 1 else ""),
            f"- config hash: `{run.config_hash[:12]}`",
        ]),
    )


def _thumbnail_data_uri(path: Path) -> str:
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > _THUMBNAIL_WIDTH:
            image = image.resize((_THUMBNAIL_WIDTH, round(image.height * _THUMBNAIL_WIDTH / image.width)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STATUS_ORDER = {"failed": 0, "succeeded": 1, "skipped": 2}
_EDIT_WIDTH, _NOTE_WIDTH = 40, 140  # characters: the table fits a browser window without scrolling


def _short(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def summary_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch's rows for the UI: failures and their reasons first, short columns, rounded numbers."""
    ordered = sorted(rows, key=lambda row: (_STATUS_ORDER.get(row["status"], 3), row["scene"], row["edit"] or ""))
    return [{"status": row["status"], "scene": row["scene"], "edit": _short(row["edit"], _EDIT_WIDTH),
             "reason": _short(row["note"], _NOTE_WIDTH), "seconds": _rounded(row["seconds"]),
             "clip_sim": _rounded(row["clip_sim"]), "clip_dir": _rounded(row["clip_dir"]),
             "clip_cons": _rounded(row["clip_cons"]), "output": row["output"] or ""}
            for row in ordered]


def publish_summary(rows: list[dict[str, Any]], key: str) -> None:
    """The batch's table: one row per (scene, edit) with its status, reason, time and metrics."""
    create_table_artifact(table=summary_table(rows) or [{"status": "nothing to do"}], key=key,
                          description="Runs of this batch, failures first (skipped = already done with the same "
                                      "config); full reasons in runs.parquet and the flow run's logs")
