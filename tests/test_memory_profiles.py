"""The named memory profiles (``--memory``): what each resolves to, what enters the run's identity,
the allocator setting of the GPU process, and the execution context undoing the 24gb plan."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from imix2mix.accel import ExecutionPlan, LoopNeeds, execute
from imix2mix.commands import add_selection_arguments, selected_settings
from imix2mix.commands.evaluate import register as register_evaluate
from imix2mix.config import ALLOCATOR_ENV, MEMORY_PROFILES, EditConfig, apply_allocator, memory_settings
from imix2mix.errors import ConfigError
from imix2mix.kernels.adamw import fused_adamw_available
from imix2mix.optim import AdamWWithComputeCopies, matrix_parameters
from imix2mix.presets import build_editor

CUDA = torch.device("cuda")
TRAINS = LoopNeeds(trains_student=True)


def profile_config(name: str, overrides: dict | None = None) -> EditConfig:
    return EditConfig().overridden(memory_settings(name, overrides))


def test_the_24gb_profile_keeps_the_fast_path_and_saves_memory():
    config = profile_config("24gb")
    assert config.runtime.optimizer == "adamw_bf16_states"
    assert config.acceleration.offload_after_use
    assert not config.acceleration.gradient_checkpointing
    plan = ExecutionPlan.resolve(config, CUDA, TRAINS)
    default = ExecutionPlan.resolve(EditConfig(), CUDA, TRAINS)
    # CUDA graphs of the student and the teacher, channels-last and the kernels: the default's.
    assert plan.graph_student and plan.graph_teacher and not plan.gradient_checkpointing
    assert plan.memory_format == torch.channels_last
    assert plan.student_kernels == default.student_kernels and plan.teacher_kernels == default.teacher_kernels
    # The bf16 weight copies stay (their fused pass keeps bf16 moments) wherever the default has them.
    assert plan.weight_copies == default.weight_copies == fused_adamw_available(CUDA)
    # Their fp32 masters are split into copy + int16 residual: the same numbers in 2 bytes less.
    assert plan.split_masters == plan.weight_copies and not default.split_masters
    assert plan.offload_after_use and not default.offload_after_use
    assert MEMORY_PROFILES["24gb"].allocator == "expandable_segments:True"


def test_lean_adds_checkpointing_and_loses_the_student_graph():
    plan = ExecutionPlan.resolve(profile_config("lean"), CUDA, TRAINS)
    assert plan.gradient_checkpointing and not plan.graph_student
    assert profile_config("default") == EditConfig()


def test_only_the_numerics_changes_enter_the_run_identity():
    base = EditConfig()
    # bf16 moments change the numbers: another run.
    assert profile_config("24gb").config_hash() != base.config_hash()
    assert profile_config("24gb").config_hash() == base.overridden({"optimizer": "adamw_bf16_states"}).config_hash()
    # Offloading and checkpointing compute the same function: the same run.
    assert base.overridden({"offload_after_use": True, "gradient_checkpointing": True}).config_hash() == base.config_hash()
    assert profile_config("lean").config_hash() == profile_config("24gb").config_hash()


def test_the_runs_own_settings_win_over_the_profile():
    assert profile_config("24gb", {"optimizer": "adamw_fused"}).runtime.optimizer == "adamw_fused"
    with pytest.raises(ConfigError, match="unknown memory profile 'huge'"):
        memory_settings("huge")


def test_the_allocator_is_set_once_for_the_process_and_a_users_value_wins():
    environ: dict[str, str] = {}
    assert apply_allocator("default", environ) is None and environ == {}
    assert apply_allocator("24gb", environ) == "expandable_segments:True"
    mine = {ALLOCATOR_ENV: "max_split_size_mb:512"}
    assert apply_allocator("24gb", mine) == "max_split_size_mb:512"


@pytest.mark.parametrize("register", ["selection", "evaluate"])
def test_the_cli_takes_memory(register):
    parser = argparse.ArgumentParser()
    if register == "selection":
        add_selection_arguments(parser)
        parser.add_argument("--set", dest="settings", action="append")
        args = parser.parse_args(["--memory", "24gb", "--set", "offload_after_use=false"])
        settings = selected_settings(args)
        assert settings == {"optimizer": "adamw_bf16_states", "split_master_weights": True, "offload_after_use": "false"}
        assert parser.parse_args([]).memory == "default"
    else:
        register_evaluate(parser.add_subparsers())
        assert parser.parse_args(["evaluate", "paper", "--out", "x", "--memory", "lean"]).memory == "lean"
    with pytest.raises(SystemExit):
        parser.parse_args(["--memory", "8gb"] if register == "selection" else ["evaluate", "paper", "--out", "x", "--memory", "8gb"])


def test_the_execution_context_undoes_the_24gb_plan():
    """The 24gb plan's optimizer (bf16 weight copies with bf16 moments and split masters) and the
    channels-last format are applied for one run and undone after it: fp32 contiguous parameters, the
    same values, but for masters exactly halfway between two bf16 values that round down, which a
    split keeps one fp32 ulp smaller (about one in 65,536)."""
    network = build_editor("tiny", device="cpu", metrics=False).student.network
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    copied = {id(p) for p in matrix_parameters(network)}
    plan = dataclasses.replace(ExecutionPlan.eager("cpu"), weight_copies=True, split_masters=True, memory_format=torch.channels_last)
    with execute(plan, network, None) as execution:
        optimizer = execution.optimizer(list(network.parameters()), profile_config("24gb"))
        assert isinstance(optimizer, AdamWWithComputeCopies) and optimizer.state_dtype == torch.bfloat16
        assert optimizer.split_masters
        assert all(p.dtype == torch.bfloat16 for p in network.parameters() if id(p) in copied)
    nudged = total = 0
    for name, p in network.named_parameters():
        assert p.dtype == torch.float32 and p.is_contiguous(), name
        ulps = (p.detach().view(torch.int32) - before[name].view(torch.int32)).abs()
        assert int(ulps.max()) <= (1 if id(p) in copied else 0), name
        nudged, total = nudged + int((ulps > 0).sum()), total + p.numel()
    assert nudged <= 4 * total / 2**16 + 4, (nudged, total)

