"""Every teacher and every run mode end to end on examples/face with the tiny preset: Editor.edit writes
every output; the registries, the selection settings, the SDEdit settings and the loading of the
ControlNet teachers through the presets' TeacherLoader."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EXAMPLES

from imix2mix.config import MODE_NAMES, TEACHER_NAMES, EditConfig, WeightSources, default_config
from imix2mix.edits import Edit
from imix2mix.errors import ConfigError, MissingWeightsError
from imix2mix.modes import mode_names
from imix2mix.outputs import write_edit_outputs
from imix2mix.presets import TeacherLoader, build_editor
from imix2mix.scene import load_scene
from imix2mix.teachers import teacher_names
from imix2mix.teachers.controlnet import ControlNetCannyTeacher, ControlNetDepthTeacher
from imix2mix.teachers.ip2p import InstructPix2PixTeacher

EDIT = Edit("Give him a Venetian mask", source_caption="A man", target_caption="A man with a Venetian mask")
RUNS = [(teacher, mode) for teacher in TEACHER_NAMES for mode in MODE_NAMES]


@pytest.fixture(scope="module")
def editor():
    return build_editor("tiny", device="cpu")


@pytest.fixture(scope="module")
def scene():
    return load_scene(EXAMPLES / "face")


def test_new_names_are_registered():
    assert {"controlnet_canny", "controlnet_depth"} <= set(teacher_names()) and set(teacher_names()) == set(TEACHER_NAMES)
    assert {"t2vz", "sdedit"} <= set(mode_names()) and set(mode_names()) == set(MODE_NAMES)


@pytest.mark.parametrize("teacher, mode", RUNS, ids=[f"{t}-{m}" for t, m in RUNS])
def test_every_teacher_and_mode_writes_every_output(editor, scene, tmp_path, teacher, mode):
    config = editor.default_config.overridden({"teacher": teacher, "mode": mode})
    result = editor.edit(scene, EDIT, config)
    assert type(editor.teacher_for(config.teacher)).name == teacher
    assert len(result.views) == len(scene.views) == 4
    size = config.teacher.image_size  # every mode decodes with the teacher's VAE at its size
    assert all(view.shape == (size, size, 3) and view.dtype.name == "uint8" for view in result.views)
    assert result.iterations == (config.total_iterations if mode == "distill" else 0) and (mode != "distill" or result.iterations > 0)
    assert (result.reference_edit is None) == (mode in ("teacher_only", "t2vz"))
    paths = write_edit_outputs(result, scene, tmp_path / "run", editor.score(result))
    for path in [*paths.views, *paths.full_views, paths.contact_sheet, paths.run_json, paths.transforms]:
        assert path.is_file() and path.stat().st_size > 0, path
    run = json.loads(paths.run_json.read_text())
    assert run["config"]["mode"] == mode and run["config"]["teacher"]["name"] == teacher


def test_controlnet_teachers_need_a_target_caption(editor, scene):
    config = editor.default_config.overridden({"teacher": "controlnet_canny", "mode": "teacher_only"})
    with pytest.raises(ConfigError, match="target caption is required"):
        editor.edit(scene, Edit("Give him a Venetian mask"), config)


def test_sdedit_and_t2vz_settings():
    baselines = EditConfig().baselines
    assert (baselines.sdedit_t, baselines.sdedit_steps, baselines.sdedit_cfg, baselines.t2vz_steps) == (500, 50, 2.0, 100)
    for t in (250, 750, 123):
        assert EditConfig().overridden({"sdedit_t": str(t)}).baselines.sdedit_t == t
    for bad in ("0", "1000", "half"):
        with pytest.raises(ConfigError, match="sdedit_t"):
            EditConfig().overridden({"sdedit_t": bad})
    # the noise level is part of the run's identity; t2vz steps too
    assert EditConfig(mode="sdedit").config_hash() != EditConfig(mode="sdedit").overridden({"sdedit_t": 250}).config_hash()
    assert default_config("tiny").baselines.t2vz_steps == 4


def test_sdedit_noise_level_changes_the_result(editor, scene):
    config = editor.default_config.overridden({"mode": "sdedit", "reference_index": 0})
    low = editor.edit(scene, EDIT, config.overridden({"sdedit_t": 250}))
    high = editor.edit(scene, EDIT, config.overridden({"sdedit_t": 750}))
    again = editor.edit(scene, EDIT, config.overridden({"sdedit_t": 750}))
    assert all((a == b).all() for a, b in zip(high.views, again.views))  # seeded
    assert any((a != b).any() for a, b in zip(low.views, high.views))


def test_controlnet_teachers_load_through_the_teacher_loader(tmp_path, editor):
    """Tiny random ControlNet teachers saved as safetensors load back by path (WeightSources.local
    layout, or a ControlNet given as teacher_id); a missing folder is named."""
    canny = editor.teacher_for(editor.default_config.teacher.__class__(name="controlnet_canny"))
    depth = editor.teacher_for(editor.default_config.teacher.__class__(name="controlnet_depth"))
    assert isinstance(canny, ControlNetCannyTeacher) and isinstance(depth, ControlNetDepthTeacher)
    assert isinstance(editor.teacher, InstructPix2PixTeacher)
    canny.save_pretrained(tmp_path)
    depth.controlnet.save_pretrained(tmp_path / "controlnet_depth", safe_serialization=True)
    depth.control_images.estimator.model.save_pretrained(tmp_path / "depth", safe_serialization=True)
    depth.control_images.estimator.image_processor.save_pretrained(tmp_path / "depth")
    loader = TeacherLoader(preset="full", random_weights=False, weights=WeightSources.local(tmp_path), device=torch.device("cpu"))
    settings = default_config("tiny").teacher
    for name, reference in (("controlnet_canny", canny), ("controlnet_depth", depth)):
        loaded = loader(settings.__class__(name=name))
        assert type(loaded) is type(reference)
        for key, value in reference.controlnet.state_dict().items():
            assert torch.equal(loaded.controlnet.state_dict()[key], value), key
    by_id = loader(settings.__class__(name="controlnet_depth", model_id=str(tmp_path / "controlnet_canny")))
    assert isinstance(by_id, ControlNetDepthTeacher)
    assert torch.equal(next(iter(by_id.controlnet.state_dict().values())), next(iter(canny.controlnet.state_dict().values())))
    with pytest.raises(MissingWeightsError, match="no-such-controlnet"):
        loader(settings.__class__(name="controlnet_canny", model_id=str(tmp_path / "no-such-controlnet")))


def test_cli_selects_teacher_teacher_id_and_mode(tmp_path, capsys):
    from imix2mix.cli import main

    face = EXAMPLES / "face"
    base = ["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "-i", "Give him a Venetian mask"]
    assert main(["edit", str(face), *base, "--no-metrics", "--teacher", "controlnet_canny", "--mode", "t2vz",
                 "--target-caption", "A man with a Venetian mask"]) == 0
    (folder,) = (tmp_path / "face").iterdir()
    run = json.loads((folder / "run.json").read_text())
    assert run["config"]["mode"] == "t2vz" and run["config"]["teacher"]["name"] == "controlnet_canny"
    assert len(list(folder.glob("view_*_full.png"))) == 4
    # --teacher-id reaches the config (the tiny preset builds random weights whatever the id says)
    assert main(["preview", str(face), *base, "--teacher", "controlnet_depth", "--teacher-id", "my/controlnet",
                 "--target-caption", "A man with a Venetian mask"]) == 0
    assert capsys.readouterr().out.strip().endswith("preview.png")
    # a ControlNet teacher without a target caption: one clear line, exit code 2
    assert main(["preview", str(face), *base, "--teacher", "controlnet_canny"]) == 2
    assert "target caption is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["edit", str(face), *base, "--teacher", "nonsense"])


@pytest.mark.parametrize("name", teacher_names())
def test_every_registered_teacher_implements_the_teacher_protocol(name):
    """A method the engine calls (the acceleration context, the modes) missing from one teacher would fail
    only when that teacher runs with that option: checked here for all of them at once."""
    from imix2mix.teachers import teacher_class
    from imix2mix.teachers.base import Teacher

    required = [member for member in vars(Teacher) if not member.startswith("_") and callable(getattr(Teacher, member))]
    missing = [member for member in required if not callable(getattr(teacher_class(name), member, None))]
    assert required and not missing, f"{name} lacks {missing}"
