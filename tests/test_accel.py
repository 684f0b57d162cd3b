"""The execution plan is applied for one run and undone after it: a long-lived editor (one per Ray
actor) runs each scene as that scene's config says, whatever ran before."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import SCENES

from imix2mix.accel import ExecutionPlan, LoopNeeds, execute
from imix2mix.config import EditConfig
from imix2mix.edits import Edit
from imix2mix.errors import ConfigError
from imix2mix.kernels.dispatch import TORCH, TRITON, installed_kernels, register_kernel_backend
from imix2mix.kernels.geglu import geglu_reference
from imix2mix.kernels.group_norm import group_norm_reference
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


def test_the_optimizer_state_is_freed_when_the_run_ends(editor):
    """Its moments go before the plan's memory format is undone (that undo needs room under a memory cap)."""
    config = editor.default_config.overridden({"k": 1, "k_initial": 1})
    with editor.prepare_distillation(load_scene(SCENES / "face"), Edit("make it snowy"), config) as loop:
        loop.step()
        optimizer = loop.optimizer
        assert optimizer.state  # the moments of one step
    assert not optimizer.state


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


# -- kernel sets: chosen by the plan, installed for the run, the previous ones back after it ---------

CALLS: list[str] = []


def _recorded(op: str, torch_fn):
    """A kernel backend that records its op and computes torch's result (shows which set ran)."""

    def backend(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        CALLS.append(op)
        return torch_fn(*args, **kwargs)

    register_kernel_backend(op, "test_recorded")(backend)


_recorded("geglu", geglu_reference)
_recorded("group_norm", group_norm_reference)
RECORDED = TORCH.replace(geglu="test_recorded", group_norm="test_recorded")


def _plan(**changes) -> ExecutionPlan:
    return dataclasses.replace(ExecutionPlan.eager("cpu"), **changes)


def _student_forward(network: torch.nn.Module) -> None:
    config = network.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        network(x, torch.tensor([10, 20]), torch.randn(2, 1, config.context_dim, generator=g),
                torch.randn(2, config.dense_in_channels, 8, 8, generator=g), num_frames=2)


def _teacher_forward(teacher) -> None:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 8, 8, 8, generator=g)
    text = torch.randn(1, 77, teacher.unet.config.cross_attention_dim, generator=g)
    with torch.inference_mode():
        teacher.unet(latents, 500, encoder_hidden_states=text)


def test_execute_installs_the_plans_kernel_sets_and_restores_the_previous_ones(editor):
    network, teacher = editor.student.network, editor.teacher
    plan = _plan(student_kernels=RECORDED, eager_student_kernels=TORCH, teacher_kernels=RECORDED)
    with execute(plan, network, teacher) as execution:
        assert installed_kernels(network) == {RECORDED} and teacher.kernels == RECORDED
        CALLS.clear()
        _student_forward(network)
        assert set(CALLS) == {"geglu", "group_norm"}, CALLS
        CALLS.clear()
        with execution.eager_forwards():  # the Euler steps' forwards: the eager set
            _student_forward(network)
        assert CALLS == []
        _teacher_forward(teacher)
        assert set(CALLS) == {"geglu", "group_norm"}, CALLS
    # after the run: torch's path everywhere
    assert installed_kernels(network) == {TORCH} and installed_kernels(teacher.unet) == {TORCH}
    assert teacher.kernels == TORCH
    CALLS.clear()
    _student_forward(network)
    _teacher_forward(teacher)
    assert CALLS == []


def test_kernel_sets_are_restored_when_the_run_fails(editor):
    network, teacher = editor.student.network, editor.teacher
    with pytest.raises(RuntimeError, match="boom"):
        with execute(_plan(student_kernels=RECORDED, teacher_kernels=RECORDED), network, teacher):
            raise RuntimeError("boom")
    assert installed_kernels(network) == {TORCH} and installed_kernels(teacher.unet) == {TORCH}
    assert teacher.kernels == TORCH


def test_the_plan_chooses_the_kernels_from_device_triton_and_options():
    """Resolved for a CUDA device (no GPU is touched) and for the CPU."""
    cuda, needs = torch.device("cuda"), LoopNeeds(trains_student=True)

    def resolve(device=cuda, needs=needs, **overrides) -> ExecutionPlan:
        return ExecutionPlan.resolve(EditConfig().overridden(overrides), device, needs)

    default = resolve()  # auto: Triton where the passes are captured graphs, torch's ops eagerly
    assert default.graph_student and default.graph_teacher and default.weight_copies
    assert (default.student_kernels, default.eager_student_kernels, default.teacher_kernels) == (TRITON, TORCH, TRITON)
    lean = resolve(gradient_checkpointing=True)  # the student runs eagerly, the teacher is still captured
    assert (lean.student_kernels, lean.teacher_kernels) == (TORCH, TRITON)
    eager = resolve(cuda_graphs=False)
    assert {eager.student_kernels, eager.eager_student_kernels, eager.teacher_kernels} == {TORCH}
    several_calls = resolve(needs=LoopNeeds(trains_student=True, student_calls_per_step=2))  # no student graph
    assert (several_calls.student_kernels, several_calls.teacher_kernels) == (TORCH, TRITON)
    only_torch = resolve(kernels="torch")
    assert {only_torch.student_kernels, only_torch.teacher_kernels} == {TORCH} and not only_torch.weight_copies
    everywhere = resolve(kernels="triton", cuda_graphs=False)
    assert {everywhere.student_kernels, everywhere.eager_student_kernels, everywhere.teacher_kernels} == {TRITON}
    compiled = resolve(compile=True, kernels="triton")  # inductor fuses torch's ops itself
    assert {compiled.student_kernels, compiled.eager_student_kernels, compiled.teacher_kernels} == {TORCH}
    partial = resolve(torch_ops="geglu, linear")
    assert partial.student_kernels == TRITON.replace(geglu="torch", linear="torch")
    assert partial.eager_student_kernels == TORCH
    cpu = resolve(device=torch.device("cpu"), kernels="triton")  # no interpreter in this process
    assert {cpu.student_kernels, cpu.eager_student_kernels, cpu.teacher_kernels} == {TORCH}


def test_kernel_options_are_checked_and_outside_the_run_identity():
    base = EditConfig()
    for overrides in ({"kernels": "torch"}, {"kernels": "triton"}, {"torch_ops": "geglu"}):
        assert base.overridden(overrides).config_hash() == base.config_hash(), overrides
    with pytest.raises(ConfigError, match="kernels"):
        base.overridden({"kernels": "cuda"})
    with pytest.raises(ConfigError, match="torch_ops: unknown ops softmax"):
        base.overridden({"torch_ops": "geglu,softmax"})


def test_the_run_modes_never_choose_kernels():
    """The loop and the other run modes get their kernels from the execution; they never name them."""
    import imix2mix.modes

    folder = Path(imix2mix.modes.__file__).parent
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        for word in ("imix2mix.kernels", "KernelSet", "install_kernels", "kernels_installed", ".kernels", "torch_ops"):
            assert word not in text, (path.name, word)
