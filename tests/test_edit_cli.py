"""End to end on the tiny preset: ``imix2mix edit`` / ``preview`` over the face scene, outputs,
determinism, and the Editor's modes and ablations."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCENES
from PIL import Image

from imix2mix.cli import main
from imix2mix.edits import Edit
from imix2mix.editor import to_uint8_image
from imix2mix.outputs import contact_sheet, write_edit_outputs
from imix2mix.preprocess import prepare_views
from imix2mix.presets import build_editor
from imix2mix.scene import load_scene

FACE = SCENES / "face"
EDIT = Edit("Turn him into a knight", source_caption="A man with curly hair in a grey jacket",
            target_caption="A knight in armour")
# A shorter schedule than the tiny preset's for runs that only check wiring: τ = 999, 512, 25 with
# 2 + 1 + 1 updates.
SHORT = {"distill_dt": 487, "k_initial": 2, "k": 1, "warmup_steps": 1}
SHORT_ARGS = [arg for key, value in SHORT.items() for arg in ("--set", f"{key}={value}")]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def editor():
    return build_editor("tiny", device="cpu")


@pytest.fixture(scope="module")
def scene():
    return load_scene(FACE)


@pytest.fixture(scope="module")
def short_result(editor, scene):
    return editor.edit(scene, EDIT, editor.default_config.overridden(SHORT))


@pytest.fixture(scope="module")
def tiny_result(editor, scene):
    events = []
    result = editor.edit(scene, EDIT, progress=events.append)
    return result, events


def _run_folder(out) -> "Path":
    (scene_folder,) = out.iterdir()
    (folder,) = [path for path in scene_folder.iterdir() if not path.name.startswith(".")]
    return folder


def test_cli_edit_writes_every_output_and_is_deterministic(tmp_path, capsys):
    argv = ["edit", str(FACE), "-i", EDIT.instruction, "--preset", "tiny", "--device", "cpu",
            "--source-caption", EDIT.source_caption, "--target-caption", EDIT.target_caption, "--set", "seed=3", *SHORT_ARGS]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    a, b = _run_folder(tmp_path / "a"), _run_folder(tmp_path / "b")
    assert a.parent.name == "face" and re.fullmatch(r"turn-him-into-a-knight-[0-9a-f]{12}", a.name)
    assert a.name == b.name  # the same run identity names the same folder
    names = {p.name for p in a.iterdir()}
    expected = {f"view_{i:02d}.png" for i in range(4)} | {f"view_{i:02d}_full.png" for i in range(4)}
    assert expected | {"contact_sheet.png", "run.json", "reference_edit.png", "transforms.json"} == names  # no temp files left
    assert [p.name for p in a.parent.iterdir()] == [a.name]  # no staging folder left beside it
    for name in sorted(expected):
        assert np.array_equal(_png(a / name), _png(b / name)), name
    assert _png(a / "view_00.png").shape == (96, 96, 3)  # tiny teacher decodes at 96²
    assert _png(a / "view_00_full.png").shape == (738, 994, 3)  # the original photo's framing
    record = json.loads((a / "run.json").read_text())
    assert record["config"]["seed"] == 3 and record["iterations"] == 4 and record["preset"] == "tiny"
    assert record["random_weights"] is True
    assert record["metrics"]["clip_cons"] is not None and record["metrics"]["clip_sim"] is not None
    assert record["edit"]["instruction"] == EDIT.instruction
    assert len(record["teacher_timesteps"]) == 4
    evaluation = record["evaluation"]  # imix2mix.evaluation: the epipolar pairs and the no-edit check
    assert len(evaluation["epipolar"]["edited"]["pairs"]) == 6 and len(evaluation["epipolar"]["source"]["pairs"]) == 6
    assert isinstance(evaluation["no_edit"]["no_edit"], bool) and 0 <= evaluation["no_edit"]["changed_fraction"] <= 1
    out = capsys.readouterr()
    assert str(a) in out.out and "epipolar consistency" in out.err
    # transforms.json: the scene's cameras with the full-frame edits; the folder loads as a posed scene.
    edited, original = load_scene(a), load_scene(FACE)
    assert [view.path.name for view in edited.views] == [f"view_{i:02d}_full.png" for i in range(4)]
    for new, old in zip(edited.views, original.views):
        assert np.allclose(new.K, old.K) and np.allclose(new.c2w, old.c2w)
        assert np.array_equal(new.image, _png(new.path))


def test_runs_with_other_settings_or_non_ascii_instructions_get_their_own_folders(tmp_path):
    base = ["edit", str(FACE), "--preset", "tiny", "--device", "cpu", "--no-metrics", "--out", str(tmp_path), *SHORT_ARGS]
    assert main([*base, "-i", "Turn him into a knight"]) == 0
    assert main([*base, "-i", "Turn him into a knight", "--set", "cross_view_attention=none"]) == 0  # an ablation
    assert main([*base, "-i", "把他变成骑士"]) == 0
    assert main([*base, "-i", "让他戴上面具"]) == 0
    names = sorted(path.name for path in (tmp_path / "face").iterdir())
    assert len(names) == 4, names  # nothing overwrote anything
    assert sum(name.startswith("turn-him-into-a-knight-") for name in names) == 2
    assert any(name.startswith("把他变成骑士-") for name in names) and any(name.startswith("让他戴上面具-") for name in names)


def test_cli_edit_that_fails_writing_keeps_the_previous_folder(tmp_path, monkeypatch, capsys):
    argv = ["edit", str(FACE), "-i", "make it snowy", "--preset", "tiny", "--device", "cpu", "--no-metrics",
            "--out", str(tmp_path), *SHORT_ARGS]
    assert main(argv) == 0
    folder = _run_folder(tmp_path)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    import imix2mix.outputs

    written = []
    real = imix2mix.outputs.atomic_write_bytes

    def disk_fills_up(path, data):
        if len(written) == 3:
            raise OSError(28, "No space left on device", str(path))
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(imix2mix.outputs, "atomic_write_bytes", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        main(argv)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # the staging folder is gone


def test_cli_preview_writes_the_reference_edit(tmp_path):
    assert main(["preview", str(FACE), "-i", "make it snowy", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    preview = _run_folder(tmp_path) / "preview.png"
    assert re.fullmatch(r"make-it-snowy-[0-9a-f]{12}", preview.parent.name)
    assert _png(preview).shape == (96, 96, 3)


def test_cli_reports_bad_settings(tmp_path, capsys):
    code = main(["edit", str(FACE), "-i", "x", "--preset", "tiny", "--device", "cpu", "--set", "nonsense=1", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown setting 'nonsense'" in capsys.readouterr().err
    assert main(["edit", str(FACE), "-i", "x", "--preset", "tiny", "--set", "k", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("setting", ["lr=nan", "text_cfg=inf", "seed=-1"])
def test_cli_refuses_a_bad_setting_before_reading_the_scene(tmp_path, capsys, setting):
    missing = tmp_path / "no-such-scene"
    code = main(["edit", str(missing), "-i", "x", "--preset", "tiny", "--device", "cpu", "--set", setting])
    assert code == 2
    err = capsys.readouterr().err
    assert setting.split("=")[0] in err and "no-such-scene" not in err


def test_edit_result_and_progress(tiny_result, scene):
    result, events = tiny_result
    assert len(result.views) == 4 and all(v.shape == (96, 96, 3) and v.dtype == np.uint8 for v in result.views)
    assert [e.iteration for e in events] == list(range(1, 15)) and events[-1].total == 14
    assert all(e.loss is not None and np.isfinite(e.loss) for e in events)  # log_every 1 in the tiny preset
    assert result.reference_index == 0  # random.seed(42); random.choice(range(4))
    assert result.iterations == 14 and len(result.teacher_timesteps) == 14
    assert result.timings["distill"] > 0 and result.peak_memory_bytes is None
    # When each phase ran, in run order, inside the edit: what a memory trace attributes its peak by.
    names = [name for name, _, _ in result.phase_spans]
    assert names[:2] == ["reference_edit", "conditioning"] and "distill" in names
    starts_and_ends = [t for _, start, end in result.phase_spans for t in (start, end)]
    assert starts_and_ends == sorted(starts_and_ends) and 0 <= starts_and_ends[0] and starts_and_ends[-1] <= result.timings["total"]
    assert sum(end - start for name, start, end in result.phase_spans if name == "distill") == pytest.approx(result.timings["distill"])
    assert all(f.shape == v.image.shape for f, v in zip(result.full_views, scene.views))


def test_same_seed_same_images(editor, scene, short_result):
    again = editor.edit(scene, EDIT, editor.default_config.overridden(SHORT))
    for a, b in zip(short_result.views, again.views):
        assert np.array_equal(a, b)
    other = editor.edit(scene, Edit(EDIT.instruction, seed=7), editor.default_config.overridden(SHORT))
    assert not all(np.array_equal(a, b) for a, b in zip(short_result.views, other.views))


def test_score_and_outputs(editor, scene, tiny_result, tmp_path):
    result = tiny_result[0]
    metrics = editor.score(result, EDIT)
    assert -1 <= metrics.clip_cons <= 1 and len(metrics.pair_consistency) == 6
    paths = write_edit_outputs(result, scene, tmp_path, metrics)
    sheet = _png(paths.contact_sheet)
    assert sheet.shape == (2 * 96, 4 * 96, 3)
    assert np.array_equal(sheet, contact_sheet(result.originals, result.views))
    assert np.array_equal(sheet[96:, 96:192], result.views[1])  # edits below, in view order
    record = json.loads(paths.run_json.read_text())
    assert record["config_hash"] == result.config.config_hash()
    assert record["metrics"]["clip_cons"] == pytest.approx(metrics.clip_cons)


def test_modes_and_decoders(editor, scene, short_result):
    base = editor.default_config.overridden(SHORT)
    teacher_only = editor.edit(scene, EDIT, base.overridden({"mode": "teacher_only"}))
    assert teacher_only.iterations == 0 and teacher_only.reference_edit is None and len(teacher_only.views) == 4
    student_only = editor.edit(scene, EDIT, base.overridden({"mode": "student_only"}))
    assert student_only.iterations == 0 and student_only.views[0].shape == (96, 96, 3)
    seva_decoded = editor.edit(scene, EDIT, base.overridden({"output_decoder": "seva"}))
    assert seva_decoded.views[0].shape == (128, 128, 3)
    # the output decoder changes only the decode: same reference, same draws
    assert seva_decoded.teacher_timesteps == short_result.teacher_timesteps
    assert seva_decoded.key_views == short_result.key_views


def test_reference_and_alignment_ablations_run(editor, scene, short_result):
    base = editor.default_config.overridden(SHORT)
    for overrides in ({"reference_edit": "source"}, {"alignment": "decode_encode"}, {"alignment": "learned"},
                      {"student_query_steps": 2}, {"reference_index": 2}):
        result = editor.edit(scene, EDIT, base.overridden(overrides))
        assert result.iterations == 4
        assert result.teacher_timesteps == short_result.teacher_timesteps  # same random streams
        assert not all(np.array_equal(a, b) for a, b in zip(result.views, short_result.views)), overrides


def test_prepare_distillation_for_benchmarks(editor, scene):
    config = editor.default_config.overridden({**SHORT, "time_phases": True})
    with editor.prepare_distillation(scene, EDIT, config) as run:
        assert editor.teacher.attention_mode == "rcv"
        outcome = run.step()
        run.step()
    assert editor.teacher.attention_mode == "none"
    assert run.iteration == 2 and outcome.tau == 999 and torch.isfinite(outcome.loss)
    assert set(run.timer.totals) == {"student_forward", "teacher", "backward", "clip_and_optimizer"}
    assert all(seconds > 0 for seconds in run.timer.totals.values())


def test_reference_edit_switch_sets_z_ref(editor, scene):
    """edited: z_ref = SEVA-VAE(edited reference, bilinear to the student size); source: of the crop."""
    config = editor.default_config.overridden({**SHORT, "reference_index": 1})
    crop = prepare_views(scene, config.method.student_image_size)[1].image[None]
    with editor.prepare_distillation(scene, EDIT, config.overridden({"reference_edit": "source"})) as source:
        pass
    with editor.prepare_distillation(scene, EDIT, config) as edited:
        pass
    with torch.no_grad():
        torch.testing.assert_close(source.cond.replace[0, :4], editor.seva_vae.encode(crop)[0])
        _, reference_edit = editor.preview(scene, EDIT, config)
        image = torch.from_numpy(reference_edit).permute(2, 0, 1).float()[None] / 127.5 - 1
        resized = torch.nn.functional.interpolate(image, size=(128, 128), mode="bilinear", align_corners=False)
    # the preview went through uint8, so compare loosely
    torch.testing.assert_close(edited.cond.replace[0, :4], editor.seva_vae.encode(resized)[0], atol=0.05, rtol=0)
    assert not torch.allclose(edited.cond.replace[0, :4], source.cond.replace[0, :4], atol=0.05)
    assert not torch.equal(edited.cond.crossattn, source.cond.crossattn)
    assert edited.cond.replace[1:].abs().sum() == 0  # only slot 0 is a clean input frame


def test_teacher_only_is_an_independent_ip2p_edit_per_view(editor, scene):
    config = editor.default_config.overridden({"mode": "teacher_only", "seed": 5})
    result = editor.edit(scene, EDIT, config)
    generator = torch.Generator().manual_seed(5)
    for view, prepared in zip(result.views, prepare_views(scene, config.method.student_image_size)):
        expected = editor.teacher.edit_image(prepared.image, EDIT, config.teacher, generator)
        assert np.array_equal(view, to_uint8_image(expected))


def test_cli_full_preset_loads_a_weights_dir(editor, tmp_path, capsys):
    """``--preset full --weights-dir`` goes through the real loading code (tiny weights saved in the
    official formats), with the schedule and sizes shrunk by --set."""
    from imix2mix.presets import save_editor_weights

    save_editor_weights(editor, tmp_path / "weights")
    sizes = ["--set", "student_image_size=128", "--set", "teacher_image_size=96", "--set", "teacher_steps=2"]
    code = main(["edit", str(FACE), "-i", "make it snowy", "--preset", "full", "--device", "cpu", "--no-metrics",
                 "--weights-dir", str(tmp_path / "weights"), "--out", str(tmp_path / "out"), *SHORT_ARGS, *sizes])
    assert code == 0
    record = json.loads((_run_folder(tmp_path / "out") / "run.json").read_text())
    assert record["preset"] == "full" and record["iterations"] == 4 and record["metrics"] is None
    assert record["random_weights"] is False
    assert "random weights" not in capsys.readouterr().err
    code = main(["preview", str(FACE), "-i", "x", "--preset", "full", "--device", "cpu",
                 "--weights-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "p")])
    assert code == 2 and "missing" in capsys.readouterr().err


def test_an_edit_leaves_global_random_state_alone(editor, scene):
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    editor.edit(scene, EDIT, editor.default_config.overridden({**SHORT, "alignment": "learned"}))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert random.getstate() == python_state


def test_gradient_checkpointing_switch(editor, scene):
    with editor.prepare_distillation(scene, EDIT, editor.default_config.overridden({**SHORT, "gradient_checkpointing": True})):
        assert editor.student.network.gradient_checkpointing
    with editor.prepare_distillation(scene, EDIT, editor.default_config.overridden(SHORT)):
        assert not editor.student.network.gradient_checkpointing
