"""The execution plan is applied for one run and undone after it: a long-lived editor (one per Ray
actor) runs each scene as that scene's config says, whatever ran before."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import SCENES

from imix2mix.accel import ExecutionPlan, LoopNeeds, execute
from imix2mix.config import EditConfig
from imix2mix.edits import Edit
from imix2mix.presets import build_editor
from imix2mix.scene import load_scene


@pytest.fixture(scope="module")
def editor():
    return build_editor("tiny", metrics=False)


def _conv_weights(network: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in network.modules() if isinstance(m, torch.nn.Conv2d)]


def test_compile_is_undone_so_the_next_run_is_eager(editor):
    network, teacher = editor.student.network, editor.teacher
    config = editor.default_config.overridden({"compile": True, "k": 1, "k_initial": 1})
    plan = ExecutionPlan.resolve(config, torch.device("cpu"), LoopNeeds(trains_student=True))
    assert plan.compile_mode == "default"
    with execute(plan, network, teacher):
        assert network._compiled_call_impl is not None  # nn.Module.compile's in-place wrapper
        assert teacher.noise_unet is not teacher.unet
    assert network._compiled_call_impl is None
    assert teacher.noise_unet is teacher.unet
    # The next scene says compile=false: dynamo sees no frame of it.
    from torch._dynamo.utils import counters

    frames = sum(counters["frames"].values())
    editor.edit(load_scene(SCENES / "face"), Edit("make it snowy"), editor.default_config.overridden({"compile": False}))
    assert sum(counters["frames"].values()) == frames


def test_memory_format_checkpointing_and_graph_capture_are_undone(editor):
    network, teacher = editor.student.network, editor.teacher
    plan = dataclasses.replace(
        ExecutionPlan.eager("cpu"), memory_format=torch.channels_last, gradient_checkpointing=True, graph_teacher=True,
    )
    with execute(plan, network, teacher):
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(network) if w.shape[-1] > 1)
        assert teacher.graph_capture and teacher.memory_format == torch.channels_last
        assert any(getattr(m, "gradient_checkpointing", False) for m in network.modules())
    assert all(w.is_contiguous() for w in _conv_weights(network))
    assert not teacher.graph_capture and teacher.memory_format == torch.contiguous_format
    assert not any(getattr(m, "gradient_checkpointing", False) for m in network.modules())


def test_the_plan_is_undone_when_the_run_fails(editor):
    network = editor.student.network
    plan = dataclasses.replace(ExecutionPlan.eager("cpu"), memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="boom"):
        with execute(plan, network, editor.teacher):
            raise RuntimeError("boom")
    assert all(w.is_contiguous() for w in _conv_weights(network))


def test_acceleration_options_never_change_the_run_identity():
    base = EditConfig()
    for name in ("cuda_graphs", "channels_last", "bf16_weight_copies", "compile", "gradient_checkpointing", "offload_after_use"):
        flipped = base.overridden({name: not base.setting(name)})
        assert flipped.config_hash() == base.config_hash(), name
