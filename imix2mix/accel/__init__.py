"""How a run executes on its device: one plan, applied for the length of the run and undone after it.

The algorithm (:mod:`imix2mix.modes`) never reads the acceleration options.  It declares what it needs
(:class:`LoopNeeds`: how many student calls one step makes, whether it trains the student); the
:class:`ExecutionPlan` is resolved once from the run's :class:`~imix2mix.config.EditConfig`, the device
and those needs; :func:`execute` applies it to the student and the teacher and yields an
:class:`Execution`, the only object the loop asks for its autocast, its student callable, its
optimizer and its iteration marks.  On exit everything the plan changed is undone — memory format,
gradient checkpointing, compiled code, captured graphs, weight copies, kernel sets — so a long-lived
editor (one per Ray actor) runs the next scene exactly as that scene's config says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from imix2mix.accel.graphs import GraphedStudent, release_cuda_memory
from imix2mix.config import COPY_OPTIMIZERS, EditConfig
from imix2mix.kernels.adamw import fused_adamw_available
from imix2mix.kernels.dispatch import TORCH, TRITON, KernelSet, install_kernels, kernels_installed
from imix2mix.kernels.triton_support import triton_runs_on
from imix2mix.optim import make_optimizer, matrix_parameters
from imix2mix.teachers.base import Teacher


@dataclass(frozen=True)
class LoopNeeds:
    """What a run mode's loop asks of the execution."""

    trains_student: bool  # an optimizer updates the student (distillation)
    student_calls_per_step: int = 1  # a forward + backward replayable as one captured graph needs 1


@dataclass(frozen=True)
class ExecutionPlan:
    """The resolved execution of one run; every field is a decision, not an option."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # the student's forward under autocast (bf16 on CUDA), or fp32
    memory_format: torch.memory_format  # the student's and the teacher's convolutions
    gradient_checkpointing: bool
    compile_mode: str | None  # torch.compile's mode for the student and the teacher's noise prediction
    graph_student: bool  # the student's forward + backward replayed as CUDA graphs we capture
    graph_teacher: bool  # the teacher's noise-prediction UNet pass replayed as a CUDA graph we capture
    weight_copies: bool  # bf16 weight copies written by the fused AdamW pass
    split_masters: bool  # with the copies: the fp32 masters kept as copy + int16 residual
    offload_after_use: bool
    # What the fused ops run (imix2mix.kernels.dispatch), installed on the models for the run: the
    # student's passes, its no-grad forwards outside the training step, the teacher's UNet; and the
    # weight copies' AdamW launch sizes (student_kernels.adamw_launch).
    student_kernels: KernelSet
    eager_student_kernels: KernelSet
    teacher_kernels: KernelSet

    @classmethod
    def resolve(cls, config: EditConfig, device: torch.device | str, needs: LoopNeeds) -> "ExecutionPlan":
        device = torch.device(device)
        acceleration, runtime = config.acceleration, config.runtime
        cuda = device.type == "cuda"
        bf16 = cuda and runtime.student_precision == "bf16_autocast"
        compile_mode = None
        if acceleration.compile and needs.trains_student:
            # Inductor's cudagraph trees capture inside compiled code ("reduce-overhead"); our own
            # capture of compiled code failed for the backward (cudaErrorStreamCaptureIsolation, torch 2.11).
            compile_mode = "reduce-overhead" if acceleration.cuda_graphs and cuda else "default"
        graph_teacher = acceleration.cuda_graphs and cuda and compile_mode is None
        graph_student = (
            graph_teacher and needs.trains_student and needs.student_calls_per_step == 1
            and not acceleration.gradient_checkpointing
        )
        weight_copies = (
            acceleration.bf16_weight_copies and needs.trains_student and bf16
            and runtime.optimizer in COPY_OPTIMIZERS and fused_adamw_available(device)
            and acceleration.kernels != "torch"
        )
        # Triton kernels pay off where their launches are replayed from CUDA graphs ("auto"); never
        # under torch.compile (inductor fuses torch's ops itself and cannot trace our launches).
        triton = acceleration.kernels != "torch" and triton_runs_on(device) and compile_mode is None
        torch_ops = dict.fromkeys(acceleration.torch_op_names(), "torch")

        def kernels(captured: bool) -> KernelSet:
            use = triton and (captured or acceleration.kernels == "triton")
            return (TRITON if use else TORCH).replace(**torch_ops)

        return cls(
            device=device,
            autocast_dtype=torch.bfloat16 if bf16 else None,
            memory_format=torch.channels_last if acceleration.channels_last and cuda else torch.contiguous_format,
            gradient_checkpointing=acceleration.gradient_checkpointing and needs.trains_student,
            compile_mode=compile_mode,
            graph_student=graph_student,
            graph_teacher=graph_teacher,
            weight_copies=weight_copies,
            split_masters=weight_copies and acceleration.split_master_weights,
            offload_after_use=acceleration.offload_after_use and cuda,
            student_kernels=kernels(graph_student),
            eager_student_kernels=kernels(False),
            teacher_kernels=kernels(graph_teacher),
        )

    @classmethod
    def eager(cls, device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> "ExecutionPlan":
        """Plain eager execution (tests and tools that drive the loop by hand)."""
        return cls(
            device=torch.device(device), autocast_dtype=autocast_dtype, memory_format=torch.contiguous_format,
            gradient_checkpointing=False, compile_mode=None, graph_student=False, graph_teacher=False,
            weight_copies=False, split_masters=False, offload_after_use=False, student_kernels=TORCH, eager_student_kernels=TORCH,
            teacher_kernels=TORCH,
        )

    @property
    def inductor_graphs(self) -> bool:
        return self.compile_mode == "reduce-overhead"


class Execution:
    """The applied plan, as the loop sees it (from :func:`execute`)."""

    def __init__(self, plan: ExecutionPlan, student: torch.nn.Module):
        self.plan = plan
        self.student = student
        self.optimizers: list = []
        self.graphed_students: list[GraphedStudent] = []

    @property
    def device(self) -> torch.device:
        return self.plan.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """The student's precision context.  Under graph capture, autocast's weight-cast cache cannot
        be captured: each cast is a kernel inside the graph."""
        if self.plan.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.plan.autocast_dtype, cache_enabled=not self.plan.graph_student)

    def student_function(self, conditioning, num_frames: int, latent_size: int) -> Callable[..., torch.Tensor]:
        """What the loop calls as the student network: the network, or its captured graphs."""
        if not self.plan.graph_student:
            return self.student
        graphed = GraphedStudent(self.student, conditioning, num_frames, latent_size, self.autocast())
        self.graphed_students.append(graphed)
        return graphed

    def optimizer(self, params: list[torch.nn.Parameter], config: EditConfig):
        """The run's optimizer (``clip_and_step``/``set_lr``/``close``); closed when the run ends."""
        method = config.method
        optimizer = make_optimizer(
            params, config.runtime.optimizer, lr=method.lr, betas=tuple(method.betas), eps=method.eps,
            weight_decay=method.weight_decay,
            compute_copies=matrix_parameters(self.student) if self.plan.weight_copies else [],
            launch=self.plan.student_kernels.adamw_launch, split_masters=self.plan.split_masters,
        )
        self.optimizers.append(optimizer)
        return optimizer

    def begin_iteration(self) -> None:
        """Mark where an iteration starts (inductor's cudagraph trees reuse their memory per iteration)."""
        if self.plan.inductor_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    @contextlib.contextmanager
    def eager_forwards(self) -> Iterator[None]:
        """No-grad student forwards outside the training step (the Euler steps between τ, about a
        second per scene) run eagerly: compiling them would add graphs that take minutes cold, and
        they take the eager kernel set (a captured training step's Triton kernels would cost launch
        overhead here)."""
        with contextlib.ExitStack() as stack:
            if self.plan.compile_mode:
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            if self.plan.eager_student_kernels != self.plan.student_kernels:
                stack.enter_context(kernels_installed(self.student, self.plan.eager_student_kernels))
            yield

    def close(self) -> None:
        for optimizer in self.optimizers:
            optimizer.close()  # weight copies: the fp32 (trained) weights go back into the parameters
            # The moments are dead once the run is over; freed here, before the memory format is undone,
            # because that undo allocates each converted weight anew: at a 24 GiB cap, with the moments
            # still held, it ran out of memory at the end of the run (H100, 24gb profile, N = 4).
            optimizer.state.clear()
        self.optimizers.clear()
        for graphed in self.graphed_students:  # the run's graphs: their pools are freed by execute's exit
            graphed.release()
        self.graphed_students.clear()


@contextlib.contextmanager
def execute(plan: ExecutionPlan, student: torch.nn.Module | None, teacher: Teacher | None) -> Iterator[Execution]:
    """Apply ``plan`` to the student network and the teacher for one run; undo all of it on exit,
    also when the run (or applying the plan) fails."""
    execution = Execution(plan, student)
    undo_student_kernels = None
    teacher_kernels = None
    try:
        if student is not None:
            undo_student_kernels = install_kernels(student, plan.student_kernels)
            student.enable_gradient_checkpointing(plan.gradient_checkpointing)
            student.to(memory_format=plan.memory_format)  # in place: the same Parameter objects
            if plan.compile_mode is not None:
                # In place, so parameter names (and the pristine copy) stay valid; static shapes: a new
                # number of views compiles once more rather than switching to slower dynamic kernels.
                student.compile(dynamic=False, mode=plan.compile_mode)
        if teacher is not None:
            teacher_kernels = teacher.set_kernels(plan.teacher_kernels)
            teacher.set_memory_format(plan.memory_format)
            teacher.compile_noise_prediction(plan.compile_mode)
            teacher.set_graph_capture(plan.graph_teacher)
        yield execution
    finally:
        execution.close()
        if undo_student_kernels is not None:
            undo_student_kernels()
        if teacher_kernels is not None:
            teacher.set_kernels(teacher_kernels)
        if student is not None:
            student._compiled_call_impl = None  # what nn.Module.compile set: eager calls again
            student.enable_gradient_checkpointing(False)
            student.to(memory_format=torch.contiguous_format)
        if teacher is not None:
            teacher.set_graph_capture(False)
            teacher.compile_noise_prediction(None)
            teacher.set_memory_format(torch.contiguous_format)
        # The released graphs' pools and the moments' blocks back to the driver now, not at the next
        # run: the decode after the loop would otherwise add its activations on top of them (the 24gb
        # profile's whole-edit peak).
        release_cuda_memory(plan.device)


__all__ = ["Execution", "ExecutionPlan", "GraphedStudent", "LoopNeeds", "execute", "release_cuda_memory"]
