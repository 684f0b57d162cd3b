"""The run configuration: :class:`EditConfig` (every knob of one edit run), the presets' defaults
and :class:`WeightSources`.

Torch-free on purpose: the orchestration process (flows, the planner, ``imix2mix collection``)
builds configs and their hashes without importing torch, diffusers or the engine.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imix2mix.errors import ConfigError
from imix2mix.schedules import LearningRateSchedule, StudentSchedule, TeacherTimestepSchedule

if TYPE_CHECKING:
    from imix2mix.edits import Edit

CrossViewAttention = Literal["rcv", "extended", "none"]
Mode = Literal["distill", "teacher_only", "student_only"]
ReferenceEdit = Literal["edited", "source"]
Alignment = Literal["bilinear", "learned", "decode_encode"]
OutputDecoder = Literal["teacher", "seva"]
# adamw*: torch's AdamW (one update rule, three implementations); adamw_bf16_states: the lean mode's
# AdamW with bf16 moments (changes numerics, see imix2mix/optim.py).
OptimizerName = Literal["adamw", "adamw_fused", "adamw_foreach", "adamw_bf16_states"]
StudentPrecision = Literal["bf16_autocast", "fp32"]

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
        problems += [f"{name} must be a finite number (got {value})" for name, value in self._numbers()
                     if not math.isfinite(value)]
        if self.seed < 0:
            problems.append(f"seed must be ≥ 0 (got {self.seed})")
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

    def _numbers(self) -> list[tuple[str, float]]:
        """Every float setting, tuples included (``betas``), as (name, value)."""
        numbers = []
        for name in _field_types():
            value = getattr(self, name)
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, float):
                    numbers.append((name, item))
        return numbers

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
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise fail("a number")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except ValueError:
            raise fail("a number") from None
        if not math.isfinite(number):  # nan / inf would reach the loop (and the config hash's JSON) unnoticed
            raise fail("a finite number")
        return number
    if origin is tuple:
        items = [v for v in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise fail(f"{len(args)} comma-separated values")
        return tuple(_coerce(key, item, arg) for item, arg in zip(items, args))
    raise fail(str(kind))  # pragma: no cover - every field type is handled above


# ---------------------------------------------------------------------------------------------
# Presets' defaults and weight sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSources:
    """Where each model's weights come from: a Hugging Face id or a local path (file or folder)."""

    seva: str = "stabilityai/stable-virtual-camera"
    seva_filename: str = "modelv1.1.safetensors"
    seva_vae: str = "stabilityai/stable-diffusion-2-1-base"
    seva_vae_subfolder: str | None = "vae"
    clip_h: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    teacher: str = "timbrooks/instruct-pix2pix"
    clip_metrics: str = "openai/clip-vit-large-patch14"

    @classmethod
    def local(cls, folder: str | Path) -> "WeightSources":
        """The layout :func:`save_editor_weights` writes (and ``--weights-dir`` expects)::

            folder/seva/modelv1.1.safetensors   folder/seva_vae/    folder/clip_h/
            folder/teacher/ (diffusers IP2P pipeline)                folder/clip_metrics/
        """
        folder = Path(folder)
        return cls(
            seva=str(folder / "seva"), seva_vae=str(folder / "seva_vae"), seva_vae_subfolder=None,
            clip_h=str(folder / "clip_h"), teacher=str(folder / "teacher"), clip_metrics=str(folder / "clip_metrics"),
        )


PRESETS = ("full", "tiny")


def default_config(preset: str) -> EditConfig:
    """The EditConfig a preset runs with unless told otherwise.

    ``tiny``: 128² student images (16² latents), 96² teacher images (12² latents), and a short
    schedule (6 τ values, k_initial 4, k 2 → 14 iterations; 4 teacher steps) so a CPU run takes seconds.
    """
    if preset == "full":
        return EditConfig()
    if preset == "tiny":
        return EditConfig(
            student_image_size=128, teacher_image_size=96, distill_dt=195, k=2, k_initial=4, warmup_steps=4,
            teacher_steps=4, student_only_steps=4, log_every=1,
        )
    raise ConfigError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
