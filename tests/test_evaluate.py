"""Evaluation suites: the paper's suite against METHOD.md, and `imix2mix evaluate` end to end (tiny)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import EXAMPLES

from imix2mix.commands.pipeline import _print_runs
from imix2mix.errors import ConfigError
from imix2mix.report import METRICS, TINY_WARNING
from imix2mix.suite import load_suite, parse_suite

SCENE_NAMES = {"Face": "face", "Bear": "bear", "Person": "person"}


def _markdown_table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table after ``heading``."""
    section = text[text.index(heading):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header


def test_paper_suite_matches_method_md(shared_dir: Path) -> None:
    method = (shared_dir / "METHOD.md").read_text(encoding="utf-8")
    suite = load_suite("paper")
    assert suite.views == 4 and [s.name for s in suite.scenes] == ["face", "bear", "person"]
    expected, caption = [], None
    for scene, original, instruction, edited, text_cfg, image_cfg in _markdown_table(method, "### 5.2 The 20 edits"):
        caption = caption if original == "〃" else original.strip('"')
        expected.append((SCENE_NAMES[scene], caption, instruction, edited, float(text_cfg), float(image_cfg)))
    ours = [(scene.name, scene.source_caption, e.instruction, e.target_caption, e.text_cfg, e.image_cfg)
            for scene in suite.scenes for e in scene.edits]
    assert len(expected) == 20 and ours == expected
    assert sum(e.ablation for scene in suite.scenes for e in scene.edits) == 6  # the ablation subset's size

    variants = {v.name: v for v in suite.variants}
    table1 = {row[0].strip("*"): [float(c.strip("*")) for c in row[1:]] for row in _markdown_table(method, "**Table 1:")}
    assert [variants["distill"].paper["table1"][m] for m in ("clip_cons", "clip_sim", "clip_dir")] == table1["Ours"]
    assert [variants["t2vz"].paper["table1"][m] for m in ("clip_cons", "clip_sim", "clip_dir")] == table1["T2VZ"]
    table3 = {row[1].split(" (")[0].strip("*"): [float(c) for c in row[2:]] for row in _markdown_table(method, "**Table 3:")}
    names = {"Student Only": "student_only", "Teacher Only": "teacher_only", "Source ref. frame": "source_reference",
             "Learned Mapping": "learned_alignment", "Uniform t ∈ [0.05, 0.95]": "uniform_t",
             "τ-matched t": "tau_matched_t", "W/O RCVAttn": "no_rcvattn", "Full": "distill"}
    assert set(table3) == set(names)
    for row, name in names.items():
        assert [variants[name].paper["table3"][m] for m in ("clip_cons", "clip_sim", "clip_dir")] == table3[row], row
    assert {"distill", "teacher_only", "student_only", "t2vz", "sdedit"} <= {v.name for v in suite.variants if 1 in v.tables}
    assert variants["no_rcvattn"].config == {"cross_view_attention": "none"}
    assert variants["tau_matched_t"].config == {"teacher_t_schedule": "tau_matched"}


@pytest.mark.parametrize("change, message", [
    ({"views": 1}, "views must be an integer"),
    ({"variants": [{"name": "x", "tables": [2]}]}, "variants[0].tables"),
    ({"scenes": [{"name": "a", "path": "a", "edits": [{"instruction": "x", "nonsense": 1}]}]}, "unknown key(s) ['nonsense']"),
    ({"variants": [{"name": "x", "tables": [1]}, {"name": "x", "tables": [3]}]}, "appear more than once"),
])
def test_bad_suites_name_the_file_and_the_entry(change: dict, message: str) -> None:
    data = {"name": "s", "scenes": [{"name": "a", "path": "a", "edits": ["x"]}], "variants": [{"name": "v", "tables": [1]}]}
    data["scenes"][0]["edits"] = [{"instruction": "x"}]
    with pytest.raises(ConfigError) as error:
        parse_suite({**data, **change}, "my-suite.yaml")
    assert "my-suite.yaml" in str(error.value) and message in str(error.value)
    with pytest.raises(ConfigError, match="no mode"):
        parse_suite(data, "s.yaml").select(variants=["nope"])


def test_cli_warns_when_no_edit_happened(capsys: pytest.CaptureFixture) -> None:
    _print_runs([{"status": "succeeded", "scene": "face", "edit": "make it snowy", "clip_dir": 0.01, "note": "",
                  "no_edit": True},
                 {"status": "succeeded", "scene": "face", "edit": "make it rain", "clip_dir": 0.2, "note": "",
                  "no_edit": False}])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("warning:")] == [
        "warning: face · make it snowy: no edit happened (the edited views are near-identical to the photos; "
        "see runs.parquet changed_fraction)"]


# --------------------------------------------------------------------------------------------------
# End to end (tiny preset, real Prefect API and Ray)
# --------------------------------------------------------------------------------------------------

SHORT = {"distill_dt": 999, "k_initial": 2, "k": 1, "warmup_steps": 1, "teacher_steps": 1}


@pytest.fixture(scope="module")
def services(tmp_root: Path) -> Iterator[None]:
    import ray
    from prefect.testing.utilities import prefect_test_harness

    from tasks.workers import RaySettings, connect_ray

    with prefect_test_harness(server_startup_timeout=None):
        started = connect_ray(RaySettings(temp_dir=tmp_root / "ray-evaluate", num_cpus=2))
        yield
        if started:
            ray.shutdown()


def _tiny_suite(path: Path) -> Path:
    suite = {
        "name": "tiny-check", "description": "two scenes, two edits each, two modes", "views": 4, "seeds": [0],
        "scenes": [
            {"name": "face", "path": str(EXAMPLES / "face"), "source_caption": "A man with curly hair in a grey jacket",
             "edits": [{"instruction": "Give him a Venetian mask", "target_caption": "A man with a Venetian mask",
                        "text_cfg": 7.5, "image_cfg": 1.5, "ablation": True},
                       {"instruction": "Turn him into batman", "target_caption": "A batman"}]},
            {"name": "bear", "path": "data/bear", "download": "get data/bear from the published I-Mix2Mix release",
             "source_caption": "A stone bear", "edits": [{"instruction": "Turn the bear to a panda bear"}]},
            {"name": "person", "path": str(EXAMPLES / "person-small"), "source_caption": "A man next to a wall",
             "edits": [{"instruction": "Turn him into a knight", "target_caption": "A knight", "text_cfg": 6.0,
                        "ablation": True},
                       {"instruction": "Turn him into a clown", "target_caption": "A clown"}]},
        ],
        "variants": [
            {"name": "distill", "tables": [1, 3], "config": {"mode": "distill"},
             "paper": {"table1": {"clip_cons": 0.342, "clip_sim": 0.258, "clip_dir": 0.173}}},
            {"name": "teacher_only", "tables": [1, 3], "config": {"mode": "teacher_only"},
             "paper": {"table3": {"clip_cons": 0.228, "clip_sim": 0.252, "clip_dir": 0.184}}},
            {"name": "futuristic", "tables": [1], "config": {"mode": "not_a_mode_yet"}},
        ],
    }
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png")) + [folder / "report.md"]
            if p.relative_to(folder).parts[0] != "variants"}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_evaluate_runs_the_suite_writes_the_report_resumes_and_rebuilds_it(
        services: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from imix2mix.cli import main

    suite = _tiny_suite(tmp_path / "suite.yaml")
    out = tmp_path / "eval"
    argv = ["evaluate", str(suite), "--out", str(out), "--preset", "tiny", "--device", "cpu", "--workers", "1",
            "--cache", str(tmp_path / "cache"), "--data", str(tmp_path)]
    argv += [arg for key, value in SHORT.items() for arg in ("--set", f"{key}={value}")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "8 succeeded, 0 failed, 0 skipped" in printed
    assert "left out: scene 'bear'" in printed and "published I-Mix2Mix release" in printed
    assert "left out: mode 'futuristic'" in printed and "not_a_mode_yet" in printed

    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.splitlines()[0] == TINY_WARNING
    assert "## Table 1: methods" in report and "## Table 3: ablations" in report
    assert (out / "charts" / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "charts" / "table3.png").is_file() and len(list((out / "grids").glob("*.png"))) == 4
    assert report.count("### ") == 4 and "](grids/face--give-him-a-venetian-mask-" in report

    # The numbers in the report are the manifests' (means over edits, and every per-edit value).
    table1 = {row[0]: row for row in _table(report, "## Table 1")}
    table3 = {row[0]: row for row in _table(report, "## Table 3")}
    for variant in ("distill", "teacher_only"):
        runs = pq.read_table(out / "variants" / variant / "outputs" / "manifests" / "runs.parquet").to_pylist()
        assert len(runs) == 4 and {run["status"] for run in runs} == {"succeeded"}
        assert all(run["changed_fraction"] is not None and isinstance(run["no_edit"], bool) for run in runs)
        label = f"{variant} (`{variant}`)"
        for column, (name, _) in enumerate(METRICS, start=2):
            mean = _mean([run[name] for run in runs])
            ablation = _mean([run[name] for run in runs if run["instruction"] in ("Give him a Venetian mask",
                                                                                   "Turn him into a knight")])
            assert table1[label][column].split(" / ")[0] == mean, (variant, name)
            assert table3[label][column].split(" / ")[0] == ablation, (variant, name)
        assert table1[label][1] == "4/4" and table3[label][1] == "2/2"
        for run in runs:
            row = next(r for r in _table(report, f"(`{run['edit_id']}`)") if r[0] == f"`{variant}`")
            assert row[1:1 + len(METRICS)] == [_fmt(run[name]) for name, _ in METRICS]
            assert (out / "variants" / variant / "outputs" / run["output_dir"] / "run.json").is_file()
        pairs = pq.read_table(out / "variants" / variant / "outputs" / "manifests" / "pairs.parquet").to_pylist()
        assert len(pairs) == 4 * 12 and {p["views"] for p in pairs} == {"edited", "source"}
    assert table1["distill (`distill`)"][2].endswith(" / 0.342")  # the paper's number beside ours
    assert table3["teacher_only (`teacher_only`)"][4].endswith(" / 0.184")

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="evaluation-tiny-check-")))
    assert artifacts and artifacts[0].data == report  # the key ends with the flow run's short id (tasks.metrics.artifact_key)

    first = _files(out)
    assert main(argv) == 0  # everything is done: all skipped, the same report
    assert "0 succeeded, 0 failed, 8 skipped" in capsys.readouterr().out
    assert _files(out) == first
    (out / "report.md").unlink()
    for chart in (out / "charts").glob("*.png"):
        chart.unlink()
    assert main(["evaluate", str(suite), "--out", str(out), "--data", str(tmp_path), "--report-only"]) == 0
    assert _files(out) == first  # byte for byte


def _mean(values: list) -> str:
    numbers = [v for v in values if v is not None]
    return _fmt(sum(numbers) / len(numbers) if numbers else None)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _table(report: str, heading: str) -> list[list[str]]:
    return _markdown_table(report, heading)
