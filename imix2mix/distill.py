"""The I-Mix2Mix engine: personalise SEVA to one scene and edit by score distillation from IP2P.

Reading order (METHOD.md §1):

1. :class:`EditConfig` holds every knob, with the official defaults; :class:`Edit` is one request.
2. :meth:`Editor.edit` runs one scene and edit: reset the student → choose the reference view →
   teacher edit of the reference → student conditioning (z_ref, CLIP-H context, Plücker rays) →
   :class:`Distillation` (the loop) → decode → :class:`EditResult`.
3. :class:`Distillation` holds the per-scene state; :meth:`Distillation.step` is one iteration
   (student query → alignment → teacher t → noise → teacher ε̃ with cross-view attention → SDS
   update) and :meth:`Distillation.advance` the Euler-EDM step to the next τ.

Reproducibility: one seed fixes the reference choice, the initial noise and every t, κ and ε draw
through the run's own generators (:class:`RunRandomness`); global RNG state is never used.  The same
seed on the same CPU gives identical images.  On CUDA, results are repeatable only up to
nondeterministic kernels (atomics in convolution/attention backward passes, bf16/fp16 reductions):
reruns agree closely but not bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import random
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from imix2mix.attention import CrossViewAttention
from imix2mix.edits import Edit
from imix2mix.errors import ConfigError
from imix2mix.kernels.adamw import fused_adamw_available
from imix2mix.kernels.dispatch import use_kernels
from imix2mix.metrics import ClipMetricsModel, SceneMetrics
from imix2mix.optim import AdamWLowPrecisionStates, AdamWWithComputeCopies
from imix2mix.preprocess import paste_back, prepare_views
from imix2mix.schedules import (
    LearningRateSchedule,
    StudentSchedule,
    TeacherTimestepSchedule,
    make_teacher_timestep_sampler,
)
from imix2mix.seva import Seva
from imix2mix.seva.autoencoder import SevaAutoencoder
from imix2mix.seva.camera import StudentConditioning, build_student_conditioning
from imix2mix.seva.conditioner import ClipImageConditioner
from imix2mix.seva.sampling import sample_novel_views
from imix2mix.seva.schedule import SevaDenoiser, SevaSchedule, euler_edm_step
from imix2mix.teacher import InstructPix2PixTeacher, TeacherContext, resize_images

Mode = Literal["distill", "teacher_only", "student_only"]
ReferenceEdit = Literal["edited", "source"]
Alignment = Literal["bilinear", "learned", "decode_encode"]
OutputDecoder = Literal["teacher", "seva"]
# adamw*: torch's AdamW (one update rule, three implementations); adamw_bf16_states: the lean mode's
# AdamW with bf16 moments (changes numerics, see imix2mix/optim.py).
OptimizerName = Literal["adamw", "adamw_fused", "adamw_foreach", "adamw_bf16_states"]
StudentPrecision = Literal["bf16_autocast", "fp32"]

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# Knobs that change how a run is observed or where tensors live, never its result: not hashed.
# cuda_graphs replays the very kernels eager runs (docs/benchmarks.md: graphed vs eager = eager vs eager);
# channels_last and bf16_weight_copies compute the same functions, differing only in reduction order
# (as eager vs eager).
_UNHASHED_FIELDS = frozenset(
    {"log_every", "time_phases", "offload_after_use", "cuda_graphs", "channels_last", "bf16_weight_copies"}
)


@dataclass(frozen=True)
class EditConfig:
    """Every knob of one edit run.  Defaults are the official release's (METHOD.md §1, §2, §8.2)."""

    # what to run
    mode: Mode = "distill"  # distill | teacher_only (IP2P per view) | student_only (SEVA from the edited reference)
    seed: int = 42
    reference_index: int | None = None  # None: seeded uniform choice, as random.seed(seed); random.choice(views)

    # teacher (InstructPix2Pix)
    text_cfg: float = 7.5  # s_T
    image_cfg: float = 1.5  # s_I
    teacher_steps: int = 100  # reference edit: diffusers default
    teacher_image_size: int = 512
    teacher_t_schedule: TeacherTimestepSchedule = "truncnorm"
    teacher_t_upper: int = 950
    teacher_t_lower: int = 50  # lower end of the uniform and τ-matched ablations (t ∈ [0.05, 0.95])
    teacher_t_shape_factor: float = 0.5  # f
    cross_view_attention: CrossViewAttention = "rcv"
    sds_weight: float = 1.0  # w(t), constant

    # student (SEVA) and its τ schedule
    student_image_size: int = 576
    camera_scale: float = 2.0
    t_max: int = 999
    t_min: int = 25
    distill_dt: int = 25
    k: int = 50
    k_initial: int = 200
    student_query_steps: int = 1  # 1: single-step Tweedie; n > 1: n Euler steps τ → 0 with gradients

    # ablations of the paper's Table 3 (and the two baselines through ``mode``)
    reference_edit: ReferenceEdit = "edited"
    alignment: Alignment = "bilinear"

    # optimiser and learning rate
    optimizer: OptimizerName = "adamw_fused"  # the official AdamW update, one fused kernel (docs/benchmarks.md)
    lr: float = 1e-4
    final_lr: float = 5e-5
    min_lr: float = 1e-9
    warmup_steps: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.5

    # output
    output_decoder: OutputDecoder = "teacher"  # teacher: IP2P VAE at the teacher size; seva: SEVA VAE at the student size

    # student-only baseline sampler (SEVA demo defaults)
    student_only_steps: int = 50
    student_only_cfg: float = 2.0
    student_only_cfg_min: float = 1.2

    # precision, memory, speed (CPU always runs fp32)
    student_precision: StudentPrecision = "bf16_autocast"
    gradient_checkpointing: bool = False
    # torch.compile the student and the teacher's noise prediction (fused kernels, same numerics up to
    # fusion order).  With cuda_graphs on CUDA, inductor replays the compiled kernels as CUDA graphs
    # (mode "reduce-overhead").  Warm-up: minutes with a cold inductor cache (docs/benchmarks.md).
    compile: bool = False
    # Replay the student's forward + backward (and the teacher's UNet pass) as CUDA graphs: the same
    # kernels and numerics without the host launching ~10k kernels per iteration.  CUDA only; the
    # student's graph needs student_query_steps = 1 and no gradient checkpointing (else it runs without
    # graphs).  Measured 1.44x faster (docs/benchmarks.md).
    cuda_graphs: bool = True
    # On CUDA, the student's and the teacher's convolutions read and write channels-last (NHWC) memory,
    # and their GroupNorms run as fused NHWC Triton kernels (imix2mix/kernels/group_norm.py): no layout
    # transposes around each convolution, no fp32 copies of activations around each norm.  Same
    # numerics up to reduction order.
    channels_last: bool = True
    # With adamw_fused and bf16 autocast on CUDA: the student's Linear and Conv weights keep a bf16
    # copy between iterations, written by the optimizer's update (AdamWWithComputeCopies, imix2mix/optim.py),
    # instead of autocast casting them at each use and widening their gradients to fp32.  Same numerics
    # (fp32 master weights and moments, the same update) up to the clip norm's summation order.
    bf16_weight_copies: bool = True
    offload_after_use: bool = False  # move CLIP-H and the text encoder off the GPU once used
    log_every: int = 10
    time_phases: bool = False  # per-phase timings (synchronises the device around each phase)

    def __post_init__(self) -> None:
        problems = []
        positive = ("teacher_steps", "teacher_image_size", "student_image_size", "distill_dt", "k", "k_initial",
                    "student_query_steps", "log_every", "student_only_steps")
        problems += [f"{name} must be ≥ 1 (got {getattr(self, name)})" for name in positive if getattr(self, name) < 1]
        if not 0 <= self.t_min <= self.t_max <= 999:
            problems.append(f"need 0 ≤ t_min ≤ t_max ≤ 999 (got t_min={self.t_min}, t_max={self.t_max})")
        if not 0 <= self.teacher_t_lower < self.teacher_t_upper <= 999:
            problems.append(f"need 0 ≤ teacher_t_lower < teacher_t_upper ≤ 999 (got {self.teacher_t_lower}, {self.teacher_t_upper})")
        if self.teacher_t_shape_factor <= 0:
            problems.append("teacher_t_shape_factor must be > 0")
        for name in ("lr", "final_lr", "min_lr", "grad_clip", "eps"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            problems.append("weight_decay and warmup_steps must be ≥ 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two values in [0, 1) (got {self.betas})")
        if self.reference_index is not None and self.reference_index < 0:
            problems.append("reference_index must be ≥ 0")
        if self.student_image_size % 64:  # VAE ×8, then SEVA's three stride-2 levels
            problems.append(f"student_image_size must be a multiple of 64 (got {self.student_image_size})")
        if self.teacher_image_size % 16:
            problems.append(f"teacher_image_size must be a multiple of 16 (got {self.teacher_image_size})")
        for name, kind in _field_types().items():
            if typing.get_origin(kind) is Literal and getattr(self, name) not in typing.get_args(kind):
                problems.append(f"{name} must be one of {', '.join(map(str, typing.get_args(kind)))} (got {getattr(self, name)!r})")
        if problems:
            raise ConfigError("EditConfig: " + "; ".join(problems))

    # -- schedules ------------------------------------------------------------------------------
    @property
    def student_schedule(self) -> StudentSchedule:
        return StudentSchedule(t_max=self.t_max, t_min=self.t_min, distill_dt=self.distill_dt, k=self.k, k_initial=self.k_initial)

    @property
    def lr_schedule(self) -> LearningRateSchedule:
        return LearningRateSchedule.official(
            lr=self.lr, final_lr=self.final_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
            distill_dt=self.distill_dt, k=self.k,
        )

    @property
    def total_iterations(self) -> int:
        return self.student_schedule.total_iterations if self.mode == "distill" else 0

    # -- overrides, identity --------------------------------------------------------------------
    def overridden(self, overrides: dict[str, Any] | None = None) -> "EditConfig":
        """A copy with ``overrides`` applied; values may be strings (``--set key=value``) and are
        parsed to the field's type.  Unknown keys and unparsable values raise :class:`ConfigError`."""
        if not overrides:
            return self
        types_by_name = _field_types()
        changes = {}
        for key, value in overrides.items():
            if key not in types_by_name:
                raise ConfigError(f"EditConfig: unknown setting '{key}'. Known settings: {', '.join(sorted(types_by_name))}.")
            changes[key] = _coerce(key, value, types_by_name[key])
        return dataclasses.replace(self, **changes)

    def for_edit(self, edit: "Edit") -> "EditConfig":
        """The config with the edit's own CFG scales and seed (where it sets them) applied."""
        own = {name: getattr(edit, name) for name in ("text_cfg", "image_cfg", "seed") if getattr(edit, name) is not None}
        return self.overridden(own)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of every setting that can change the result."""
        identity = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED_FIELDS}
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(EditConfig)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Parse/validate one override against the field's annotated type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"EditConfig: setting '{key}' expects {expected}, got {value!r}.")

    if origin in (types.UnionType, typing.Union) and type(None) in args:  # Optional[T]
        if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", ""}):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(map(str, args)))
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise fail("true or false")
    if kind is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise fail("an integer") from None
        raise fail("an integer")
    if kind is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise fail("a number") from None
        raise fail("a number")
    if origin is tuple:
        items = [v for v in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise fail(f"{len(args)} comma-separated values")
        return tuple(_coerce(key, item, arg) for item, arg in zip(items, args))
    raise fail(str(kind))  # pragma: no cover - every field type is handled above


# ---------------------------------------------------------------------------------------------
# Results and progress
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """Reported after every iteration.  ``loss``/``grad_norm`` are filled every ``log_every``
    iterations (and at the last): reading them synchronises the device."""

    iteration: int  # 1-based
    total: int
    tau: int
    t: int
    lr: float
    loss: float | None = None
    grad_norm: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class EditResult:
    """What one edit produced.  Images are H×W×3 uint8; ``views[i]`` is the edit of scene view i."""

    views: list[np.ndarray]
    full_views: list[np.ndarray]  # each edit pasted back into the original photo's framing
    originals: list[np.ndarray]  # the square crops the edits correspond to
    reference_index: int
    reference_edit: np.ndarray | None  # the teacher's edit of the reference (None for teacher_only)
    edit: Edit
    config: EditConfig
    timings: dict[str, float]
    peak_memory_bytes: int | None  # device memory high-water mark (CUDA only)
    iterations: int
    log: list[dict[str, float]]
    device: str
    teacher_timesteps: list[int] = field(default_factory=list)
    key_views: list[int] = field(default_factory=list)
    preset: str = ""
    random_weights: bool = False  # True: the models were random (tiny preset, benchmarks): not a real edit


# ---------------------------------------------------------------------------------------------
# Pieces of one iteration
# ---------------------------------------------------------------------------------------------


@dataclass
class RunRandomness:
    """All random streams of one run, derived from one seed (no global RNG)."""

    seed: int
    device: torch.device

    def __post_init__(self) -> None:
        self.timesteps = np.random.default_rng(self.seed)  # teacher t
        self.initial_noise = torch.Generator("cpu").manual_seed(self.seed)  # drawn on CPU like SEVA's sampler
        self.key_views = torch.Generator("cpu").manual_seed(self.seed + 1)  # κ: host-side, no device sync
        self.sds_noise = torch.Generator(self.device).manual_seed(self.seed + 2)  # ε of the perturbation
        self.reference_edit = torch.Generator(self.device).manual_seed(self.seed)

    def reference_choice(self, num_views: int) -> int:
        """The official ``random.seed(seed); random.choice(frame_indices)``, on a private Random."""
        return random.Random(self.seed).choice(range(num_views))

    def key_view(self, num_views: int) -> int:
        return int(torch.randint(num_views, (1,), generator=self.key_views))


class LearnedAlignment(torch.nn.Module):
    """Table 3 "Learned Mapping": bilinear resize, then a 5×5 conv 4→4 initialised to the identity."""

    def __init__(self, size: int, channels: int = 4):
        super().__init__()
        self.size = size
        # skip_init: the default (random) init would draw from the global generator for nothing
        self.conv = torch.nn.utils.skip_init(torch.nn.Conv2d, channels, channels, kernel_size=5, padding=2)
        torch.nn.init.dirac_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(latents.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.conv(resized)


class _StudentWithFrameCount(torch.nn.Module):
    """The student with ``num_frames`` bound, so a CUDA-graph capture sees tensor arguments only."""

    def __init__(self, network: Seva, num_frames: int):
        super().__init__()
        self.network = network
        self.num_frames = num_frames

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.network(x, t, y, dense, num_frames=self.num_frames)


class GraphedStudent(torch.nn.Module):
    """The student's forward and backward captured once per scene as CUDA graphs
    (``torch.cuda.make_graphed_callables``) and replayed every iteration.

    Inputs are copied into static buffers, so shapes are fixed per scene; one forward may be in
    flight before its backward (the single-step Tweedie query).  Gradients still accumulate into the
    network's ``.grad`` for the optimizer.
    """

    def __init__(self, network: Seva, cond, num_frames: int, latent_size: int, autocast) -> None:
        super().__init__()
        device = cond.concat.device
        sample = (
            torch.randn(num_frames, 4 + cond.concat.shape[1], latent_size, latent_size, device=device),
            torch.full((num_frames,), 500, dtype=torch.long, device=device),
            cond.crossattn.detach().clone(),
            cond.dense_vector.detach().clone(),
        )
        for parameter in network.parameters():  # an earlier scene's gradients: free their memory first
            parameter.grad = None
        with autocast, use_kernels("triton", unless_chosen=True):
            # allow_unused_input: q, k and norm2 of the single-token cross-attentions get no gradient
            self.graphed = torch.cuda.make_graphed_callables(
                _StudentWithFrameCount(network, num_frames), sample, allow_unused_input=True
            )
        for parameter in network.parameters():  # the warm-up passes left gradients behind
            parameter.grad = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, dense: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        return self.graphed(x, t, y, dense)


class PhaseTimer:
    """Wall time per phase, summed over iterations; a no-op unless enabled (it synchronises)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        self.totals: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


@dataclass
class StepOutcome:
    """One iteration's values, kept on the device (reading them is the caller's choice)."""

    tau: int
    t: int
    key_view: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor


def sds_surrogate_loss(estimate: torch.Tensor, guided_noise: torch.Tensor, noise: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """L = Σ(g ⊙ x̂0)/numel with g = w(ε̃ − ε) detached and NaNs zeroed: ∂L/∂x̂0 = g/numel.

    The DreamFusion stop-gradient trick; equal to ½‖x̂0 − sg(x̂0 − g)‖²/numel up to a constant.
    """
    gradient = torch.nan_to_num(weight * (guided_noise.float() - noise.float()), nan=0.0).detach()
    return (gradient * estimate.float()).sum() / estimate.numel()


def eager_forwards(config: EditConfig) -> contextlib.AbstractContextManager:
    """Where ``compile`` is on, run the student's no-grad forwards eagerly: the Euler steps between τ
    (40 per scene, about a second) and the student-only sampler.  Compiling them would add graphs that
    take minutes with a cold cache."""
    return torch.compiler.set_stance("force_eager") if config.compile else contextlib.nullcontext()


class Distillation:
    """Per-scene state of the loop.  ``step()`` is one iteration; ``advance()`` the Euler step to
    the next τ; ``run()`` does the whole schedule.  A benchmark can call ``step()`` directly.

    The official code wraps the update in a ``GradScaler``; under bf16 autocast (or fp32) it only
    rescales and unscales, so it is left out.  The one behaviour it would add is skipping a step whose
    gradients are not finite; NaNs in g are zeroed before the backward pass, as in the official code.
    """

    def __init__(
        self,
        *,
        denoiser: SevaDenoiser,
        conditioning: StudentConditioning,
        teacher: InstructPix2PixTeacher,
        teacher_context: TeacherContext,
        config: EditConfig,
        randomness: RunRandomness,
        device: torch.device,
        seva_vae: SevaAutoencoder | None = None,
    ):
        self.denoiser = denoiser
        self.network = denoiser.network
        self.conditioning = conditioning
        self.cond = conditioning.cond
        self.num_frames = conditioning.num_frames
        self.num_views = self.num_frames - 1
        self.teacher = teacher
        self.teacher_context = teacher_context
        self.config = config
        self.randomness = randomness
        self.device = device
        self.seva_vae = seva_vae
        self.timer = PhaseTimer(config.time_phases, device)

        schedule = config.student_schedule
        self.taus = schedule.taus
        self.updates_per_tau = schedule.updates_per_tau
        self.total_iterations = schedule.total_iterations
        self.lr_schedule = config.lr_schedule
        self.sample_t = make_teacher_timestep_sampler(
            config.teacher_t_schedule, randomness.timesteps, lower=config.teacher_t_lower,
            upper=config.teacher_t_upper, shape_factor=config.teacher_t_shape_factor,
        )
        self.teacher_latent_size = config.teacher_image_size // teacher.pipeline.vae_scale_factor
        self.alignment = LearnedAlignment(self.teacher_latent_size).to(device) if config.alignment == "learned" else None
        self.trainable = [p for p in self.network.parameters() if p.requires_grad]
        if self.alignment is not None:
            self.trainable += list(self.alignment.parameters())
        compute_copies = matrix_parameters(self.network) if self.uses_weight_copies(config, device) else []
        self.optimizer = _make_optimizer(self.trainable, config, compute_copies)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda" and config.student_precision == "bf16_autocast"
            else contextlib.nullcontext()
        )
        self.sigmas = denoiser.schedule.table(device)
        if self.graphs_student(config, device):
            # Autocast's weight-cast cache cannot be captured; each cast is a kernel inside the graph.
            self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.student_precision == "bf16_autocast", cache_enabled=False)
            self.denoiser = SevaDenoiser(
                GraphedStudent(self.network, self.cond, self.num_frames, config.student_image_size // 8, self.autocast),
                denoiser.schedule,
            )

        latent_shape = (self.num_frames, 4, config.student_image_size // 8, config.student_image_size // 8)
        sigma_max = float(self.denoiser.schedule.sigmas[config.t_max])
        noise = torch.randn(latent_shape, generator=randomness.initial_noise)
        self.latents = (noise * (1.0 + sigma_max**2) ** 0.5).to(device)  # ζ ~ N(0, (1 + σ_max²) I)
        self.tau_position = 0
        self.updates_done_at_tau = 0
        self.iteration = 0
        self.last_estimate: torch.Tensor | None = None  # x̂0 of frames 1..N at the student's latent size
        self.teacher_timesteps: list[int] = []
        self.key_views: list[int] = []

    @staticmethod
    def inductor_graphs(config: EditConfig, device: torch.device) -> bool:
        """Whether the compiled student and teacher run as inductor's CUDA graphs (``torch.compile``
        mode "reduce-overhead").  Our own capture of compiled code failed for the backward pass
        (``cudaErrorStreamCaptureIsolation``, torch 2.11, docs/benchmarks.md); inductor's cudagraph
        trees capture inside the compiled functions."""
        return config.compile and config.cuda_graphs and device.type == "cuda"

    @staticmethod
    def uses_weight_copies(config: EditConfig, device: torch.device) -> bool:
        """Whether the student computes from persistent bf16 weight copies (``bf16_weight_copies``):
        for the default fused AdamW under bf16 autocast, on CUDA with Triton."""
        return (
            config.bf16_weight_copies and config.optimizer == "adamw_fused"
            and config.student_precision == "bf16_autocast" and fused_adamw_available(device)
            and device.type == "cuda"
        )

    @staticmethod
    def graphs_teacher(config: EditConfig) -> bool:
        """Whether the teacher's UNet pass is replayed as a CUDA graph we capture (on CUDA).  Not
        with ``compile``: there inductor captures (:meth:`inductor_graphs`)."""
        return config.cuda_graphs and not config.compile

    @staticmethod
    def graphs_student(config: EditConfig, device: torch.device) -> bool:
        """Whether the student's forward + backward is replayed as CUDA graphs: as the teacher, and
        only for a single-step query without gradient checkpointing."""
        return (
            Distillation.graphs_teacher(config) and device.type == "cuda"
            and config.student_query_steps == 1 and not config.gradient_checkpointing
        )

    # -- the iteration --------------------------------------------------------------------------
    @property
    def tau(self) -> int:
        return self.taus[self.tau_position]

    def student_estimate(self, latents: torch.Tensor, tau: int) -> torch.Tensor:
        """x̂0 of all T frames from ζ_τ: the Tweedie estimate D(ζ; σ_τ) = ζ̃ − σ_τ ε_θ, or with
        ``student_query_steps`` = n > 1 the end of an n-step Euler trajectory τ → 0 (gradients through all)."""
        steps = self.config.student_query_steps
        indices = np.linspace(tau, 0, steps, endpoint=False).astype(int)
        sigmas = [self.sigmas[i] for i in indices] + [None]
        x = latents
        with self.autocast:
            for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
                denoised = self.denoiser(x, sigma, self.cond, self.num_frames)
                if sigma_next is None:
                    return denoised
                x = euler_edm_step(x, denoised, sigma, sigma_next)
        raise AssertionError("unreachable")  # pragma: no cover

    def align(self, estimate: torch.Tensor) -> torch.Tensor:
        """Student latents [N,4,h,w] → teacher latents [N,4,h_T,w_T] (METHOD §1.5 step 2)."""
        size = self.teacher_latent_size
        if self.config.alignment == "bilinear":
            return F.interpolate(estimate.float(), size=(size, size), mode="bilinear", align_corners=False)
        if self.config.alignment == "learned":
            return self.alignment(estimate)
        # decode_encode: student VAE decode → resize to the teacher's image size → teacher VAE encode
        images = self.seva_vae.decode(estimate.float())
        images = resize_images(images.float(), self.config.teacher_image_size)
        return self.teacher.encode(images).float()

    def step(self) -> StepOutcome:
        """One distillation iteration at the current τ (no host synchronisation)."""
        tau, config = self.tau, self.config
        # The previous iteration's gradients go before this forward, not just before the backward:
        # their memory is free while the activations build up.
        self.optimizer.zero_grad(set_to_none=True)
        if self.inductor_graphs(config, self.device):
            # Inductor's cudagraph trees reuse their memory per iteration; mark where one starts.
            torch.compiler.cudagraph_mark_step_begin()
        with self.timer.phase("student_forward"):
            estimate = self.student_estimate(self.latents, tau)[1:]  # frames 1..N (slot 0 is the reference)
            aligned = self.align(estimate)
        with self.timer.phase("teacher"):
            t = self.sample_t(tau)
            key_view = self.randomness.key_view(self.num_views)
            noise = torch.randn(aligned.shape, generator=self.randomness.sds_noise, device=self.device)
            noisy = self.teacher.add_noise(aligned.detach(), t, noise)
            guided = self.teacher.predict_noise(
                noisy, t, self.teacher_context, text_cfg=config.text_cfg, image_cfg=config.image_cfg, key_view=key_view,
                cuda_graph=self.graphs_teacher(config),
            )
        with self.timer.phase("backward"):
            loss = sds_surrogate_loss(aligned, guided, noise, config.sds_weight)
            loss.backward()
        with self.timer.phase("clip_and_optimizer"):
            lr = self.lr_schedule(self.iteration)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if isinstance(self.optimizer, AdamWWithComputeCopies):
                grad_norm = self.optimizer.clip_and_step(config.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.grad_clip)
                self.optimizer.step()
        self.last_estimate = estimate.detach()
        self.iteration += 1
        self.updates_done_at_tau += 1
        self.teacher_timesteps.append(t)
        self.key_views.append(key_view)
        return StepOutcome(tau=tau, t=t, key_view=key_view, lr=lr, loss=loss.detach(), grad_norm=grad_norm.detach())

    @torch.no_grad()
    def advance(self) -> bool:
        """Euler-EDM step ζ_τ → ζ_τnext with the updated student; False after the last τ (no step)."""
        if self.tau_position + 1 >= len(self.taus):
            return False
        sigma, sigma_next = self.sigmas[self.tau], self.sigmas[self.taus[self.tau_position + 1]]
        with eager_forwards(self.config), self.autocast:
            denoised = self.denoiser(self.latents, sigma, self.cond, self.num_frames)
        self.latents = euler_edm_step(self.latents, denoised.float(), sigma, sigma_next)
        self.tau_position += 1
        self.updates_done_at_tau = 0
        return True

    def run(self, progress: ProgressCallback | None = None) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """The whole schedule; returns the last x̂0 of frames 1..N and the logged values."""
        log: list[dict[str, float]] = []
        while True:
            for _ in range(self.updates_per_tau[self.tau_position] - self.updates_done_at_tau):
                outcome = self.step()
                logged = self.iteration % self.config.log_every == 0 or self.iteration == self.total_iterations
                loss = grad_norm = None
                if logged:
                    loss, grad_norm = float(outcome.loss), float(outcome.grad_norm)
                    log.append(dict(iteration=self.iteration, tau=outcome.tau, t=outcome.t, lr=outcome.lr, loss=loss, grad_norm=grad_norm))
                if progress is not None:
                    progress(ProgressEvent(self.iteration, self.total_iterations, outcome.tau, outcome.t, outcome.lr, loss, grad_norm))
            if not self.advance():
                break
        return self.last_estimate, log

    def close(self) -> None:
        """Give the student its fp32 weights back (the trained values), ending bf16 weight copies."""
        if isinstance(self.optimizer, AdamWWithComputeCopies) and not self.optimizer.released:
            self.optimizer.release()


def matrix_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights and biases of ``module``'s Linear and Conv layers: the parameters autocast rounds
    to its dtype at every use (norms and embeddings compute in fp32)."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return [p for m in module.modules() if isinstance(m, layers) for p in m.parameters(recurse=False)]


def _make_optimizer(
    params: list[torch.nn.Parameter], config: EditConfig, compute_copies: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    hyper = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamw_bf16_states":
        return AdamWLowPrecisionStates(params, **hyper)
    if compute_copies:
        return AdamWWithComputeCopies(params, **hyper, compute_copies=compute_copies, compute_dtype=torch.bfloat16)
    variant = {"adamw": {}, "adamw_fused": {"fused": True}, "adamw_foreach": {"foreach": True}}[config.optimizer]
    return torch.optim.AdamW(params, **hyper, **variant)


# ---------------------------------------------------------------------------------------------
# The editor: models loaded once, one scene and edit per call
# ---------------------------------------------------------------------------------------------


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [−1, 1] → H×W×3 uint8."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy().copy()


class Editor:
    """Holds the loaded teacher, student, SEVA VAE, CLIP-H and (optionally) the metrics CLIP.

    ``edit()`` resets the student to its pristine weights (kept in host memory, copied back in
    place) and builds a fresh optimizer, so one Editor serves many scenes.
    """

    def __init__(
        self,
        *,
        teacher: InstructPix2PixTeacher,
        student: Seva,
        seva_vae: SevaAutoencoder,
        clip_image: ClipImageConditioner,
        clip_metrics: ClipMetricsModel | None = None,
        device: torch.device | str = "cpu",
        default_config: EditConfig | None = None,
        preset: str = "full",
        random_weights: bool = False,
    ):
        self.device = torch.device(device)
        self.teacher = teacher
        self.student = student.to(self.device)
        self.seva_vae = seva_vae
        self.clip_image = clip_image
        self.clip_metrics = clip_metrics
        self.default_config = default_config or EditConfig()
        self.preset = preset
        self.random_weights = random_weights
        self.schedule = SevaSchedule()
        self.denoiser = SevaDenoiser(self.student, self.schedule)
        pin = self.device.type == "cuda"  # pinned host memory makes the per-scene copy back fast
        self._pristine = {
            name: (value.detach().to("cpu", copy=True).pin_memory() if pin else value.detach().to("cpu", copy=True))
            for name, value in self.student.state_dict().items()
        }
        self._compile_mode: str | None = None  # torch.compile's mode, once compiled

    # -- student reset --------------------------------------------------------------------------
    @torch.no_grad()
    def reset_student(self) -> None:
        """Copy the pristine weights back in place (no checkpoint read; no reallocation unless an
        unfinished run left bf16 weight copies in the parameters)."""
        for name, parameter in self.student.named_parameters():
            if parameter.dtype != self._pristine[name].dtype:
                parameter.grad = None
                parameter.data = torch.empty_like(parameter, dtype=self._pristine[name].dtype)
        for name, value in self.student.state_dict().items():
            value.copy_(self._pristine[name], non_blocking=True)
        self.student.requires_grad_(True)
        self.student.train()

    # -- the edit -------------------------------------------------------------------------------
    def edit(
        self,
        scene,
        edit: Edit,
        config: EditConfig | None = None,
        progress: ProgressCallback | None = None,
    ) -> EditResult:
        """Edit every view of ``scene`` (METHOD §1): the mode in ``config`` picks I-Mix2Mix
        distillation or one of the two baselines.  ``config`` defaults to the preset's."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        inputs = self._scene_inputs(scene, edit, config)
        config, timings = inputs.config, inputs.timings
        log: list[dict[str, float]] = []
        distillation: Distillation | None = None
        reference_edit: torch.Tensor | None = None
        if config.mode == "teacher_only":
            with _timed(timings, "teacher_edits"):
                edited = torch.stack([self._teacher_edit(view, edit, config, inputs.randomness) for view in inputs.originals])
        else:
            reference_edit, conditioning = self._reference_and_conditioning(inputs)
            if config.mode == "student_only":
                with _timed(timings, "student_sampling"):
                    estimate = self._sample_student(conditioning, config, inputs.randomness)
            else:
                distillation = self._start_distillation(inputs, conditioning)
                try:
                    with _timed(timings, "distill"):
                        estimate, log = distillation.run(progress)
                finally:
                    self.finish_distillation(distillation)
                timings.update({f"phase_{k}": v for k, v in distillation.timer.totals.items()})
            with _timed(timings, "decode"):
                edited = self._decode(estimate, config, distillation)

        views = [to_uint8_image(image) for image in edited]
        full_views = [paste_back(image, view, prep.box) for image, view, prep in zip(views, scene.views, inputs.prepared)]
        timings["total"] = time.perf_counter() - started
        return EditResult(
            views=views,
            full_views=full_views,
            originals=[to_uint8_image(image) for image in inputs.originals],
            reference_index=inputs.reference,
            reference_edit=None if reference_edit is None else to_uint8_image(reference_edit),
            edit=edit,
            config=config,
            timings=timings,
            peak_memory_bytes=int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None,
            iterations=distillation.iteration if distillation is not None else 0,
            log=log,
            device=_device_name(self.device),
            teacher_timesteps=list(distillation.teacher_timesteps) if distillation is not None else [],
            key_views=list(distillation.key_views) if distillation is not None else [],
            preset=self.preset,
            random_weights=self.random_weights,
        )

    def prepare_distillation(self, scene, edit: Edit, config: EditConfig | None = None) -> Distillation:
        """Everything up to the loop (student reset, reference edit, conditioning, teacher context,
        cross-view attention installed) and the :class:`Distillation` ready to ``step()``: for
        benchmarks that time iterations.  Call :meth:`finish_distillation` when done."""
        inputs = self._scene_inputs(scene, edit, config)
        _, conditioning = self._reference_and_conditioning(inputs)
        return self._start_distillation(inputs, conditioning)

    def finish_distillation(self, distillation: Distillation | None = None) -> None:
        """Back to the between-scenes state: plain teacher attention (the reference edit of the next
        scene must not use RCVAttn) and, given the run, the student's fp32 weights back."""
        self.teacher.set_cross_view_attention("none")
        if distillation is not None:
            distillation.close()

    def preview(self, scene, edit: Edit, config: EditConfig | None = None) -> tuple[int, np.ndarray]:
        """Only the teacher's edit of the reference view: (reference index, edited image)."""
        inputs = self._scene_inputs(scene, edit, config)
        image = self._teacher_edit(inputs.originals[inputs.reference], edit, inputs.config, inputs.randomness)
        return inputs.reference, to_uint8_image(image)

    def score(self, result: EditResult, edit: Edit | None = None) -> SceneMetrics:
        """CLIP Sim./Dir./Cons. of a result with the already loaded metrics CLIP."""
        if self.clip_metrics is None:
            raise ConfigError("this Editor was built without the metrics CLIP (build_editor(..., metrics=True))")
        edit = edit or result.edit
        return self.clip_metrics.score(result.views, result.originals, edit.source_caption, edit.target_caption)

    # -- steps of edit() ------------------------------------------------------------------------
    def _scene_inputs(self, scene, edit: Edit, config: EditConfig | None) -> "_SceneInputs":
        """The effective config, the square crops, the run's random streams and the reference index."""
        config = (config or self.default_config).for_edit(edit)
        if self.device.type == "cuda":  # an earlier edit with offload_after_use may have moved these off the GPU
            self.teacher.pipeline.text_encoder.to(self.device)
            self.clip_image.to(self.device)
        prepared = prepare_views(scene, config.student_image_size)
        randomness = RunRandomness(config.seed, self.device)
        num_views = len(prepared)
        reference = config.reference_index if config.reference_index is not None else randomness.reference_choice(num_views)
        if reference >= num_views:
            raise ConfigError(f"EditConfig: reference_index {reference} but the scene '{scene.name}' has {num_views} views.")
        originals = torch.stack([view.image for view in prepared])  # [N, 3, S, S] in [−1, 1]
        return _SceneInputs(scene, edit, config, prepared, originals, randomness, reference, timings={})

    def _reference_and_conditioning(self, inputs: "_SceneInputs"):
        """Teacher edit of the reference (unless the source-reference ablation), then the student's
        conditioning from it; also resets the student for this scene."""
        config, timings = inputs.config, inputs.timings
        reference_edit = None
        if config.reference_edit == "edited":
            with _timed(timings, "reference_edit"):
                reference_edit = self._teacher_edit(inputs.originals[inputs.reference], inputs.edit, config, inputs.randomness)
            size = config.student_image_size
            reference_image = F.interpolate(reference_edit[None], size=(size, size), mode="bilinear", align_corners=False)
        else:  # Table 3 "Source ref. frame": the unedited reference conditions the student
            reference_image = inputs.originals[inputs.reference][None]
        with _timed(timings, "conditioning"):
            conditioning = self._student_conditioning(inputs.scene, inputs.prepared, inputs.reference, reference_image, config)
        self.reset_student()
        self._configure_student(config)
        return reference_edit, conditioning

    def _start_distillation(self, inputs: "_SceneInputs", conditioning) -> Distillation:
        config = inputs.config
        with _timed(inputs.timings, "teacher_context"):
            context = self.teacher.prepare(inputs.edit.instruction, inputs.originals, config.teacher_image_size)
            if config.offload_after_use and self.device.type == "cuda":
                self.teacher.pipeline.text_encoder.to("cpu")
        self.teacher.set_cross_view_attention(config.cross_view_attention)
        return Distillation(
            denoiser=self.denoiser, conditioning=conditioning, teacher=self.teacher, teacher_context=context,
            config=config, randomness=inputs.randomness, device=self.device, seva_vae=self.seva_vae,
        )

    def _teacher_edit(self, image: torch.Tensor, edit: Edit, config: EditConfig, randomness: RunRandomness) -> torch.Tensor:
        """Full IP2P pipeline on one view at the configured teacher size (plain attention)."""
        return self.teacher.edit_image(
            image, edit.instruction, text_cfg=config.text_cfg, image_cfg=config.image_cfg,
            steps=config.teacher_steps, generator=randomness.reference_edit, image_size=config.teacher_image_size,
        ).cpu()

    @torch.no_grad()
    def _student_conditioning(self, scene, prepared, reference: int, reference_image: torch.Tensor, config: EditConfig):
        """z_ref and the CLIP-H context of the reference image [1, 3, S, S], plus the cameras."""
        reference_image = reference_image.float().to(self.device)
        reference_latent = self.seva_vae.encode(reference_image)
        embedding = self.clip_image(reference_image)
        if config.offload_after_use and self.device.type == "cuda":
            self.clip_image.to("cpu")
        conditioning = build_student_conditioning(
            np.stack([view.c2w for view in scene.views]),
            np.stack([view.K_normalized for view in prepared]),
            reference,
            reference_latent.float(),
            embedding.reshape(-1).float(),
            config.camera_scale,
        )
        return conditioning.to(self.device)

    def _configure_student(self, config: EditConfig) -> None:
        self.student.enable_gradient_checkpointing(config.gradient_checkpointing)
        memory_format = torch.channels_last if config.channels_last and self.device.type == "cuda" else torch.contiguous_format
        self.student.to(memory_format=memory_format)  # in place (the same Parameter objects): a no-op when unchanged
        self.teacher.set_memory_format(memory_format)
        if not config.compile:
            return
        mode = "reduce-overhead" if Distillation.inductor_graphs(config, self.device) else "default"
        if self._compile_mode != mode:
            # In place, so parameter names (and the pristine copy) stay valid; static shapes: a new
            # number of views compiles once more rather than switching to slower dynamic kernels.
            self.student.compile(dynamic=False, mode=mode)
            self.teacher.compile_noise_prediction(mode)
            self._compile_mode = mode

    @torch.no_grad()
    def _sample_student(self, conditioning, config: EditConfig, randomness: RunRandomness) -> torch.Tensor:
        """Student-only baseline: SEVA samples the N views from the edited reference alone."""
        with eager_forwards(config):
            latents = sample_novel_views(
                self.denoiser, conditioning, num_steps=config.student_only_steps, cfg=config.student_only_cfg,
                cfg_min=config.student_only_cfg_min, generator=randomness.initial_noise,
            )
        return latents[1:]

    @torch.no_grad()
    def _decode(self, estimate: torch.Tensor, config: EditConfig, distillation: Distillation | None) -> torch.Tensor:
        """Final x̂0 of frames 1..N → images in [−1, 1] (METHOD §1.7: aligned to the teacher's latent
        size the way the loop aligned it, decoded by the teacher VAE), or the SEVA VAE at the student size."""
        if config.output_decoder == "seva":
            return self.seva_vae.decode(estimate.float()).float().cpu()
        if distillation is not None:
            aligned = distillation.align(estimate)
        else:
            size = config.teacher_image_size // self.teacher.pipeline.vae_scale_factor
            aligned = F.interpolate(estimate.float(), size=(size, size), mode="bilinear", align_corners=False)
        return self.teacher.decode(aligned).cpu()


@dataclass
class _SceneInputs:
    scene: Any
    edit: Edit
    config: EditConfig
    prepared: list
    originals: torch.Tensor
    randomness: RunRandomness
    reference: int
    timings: dict[str, float]


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
