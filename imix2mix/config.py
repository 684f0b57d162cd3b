"""The configuration of one edit run, torch-free (the orchestration process reads it without the engine).

:class:`EditConfig` is composed of sections, each a frozen dataclass with the official defaults
(METHOD.md §1, §2, §8.2):

* :class:`TeacherConfig`: which 2D editor teaches (a name in :mod:`imix2mix.teachers`) and its guidance;
* :class:`MethodConfig`: the paper's hyper-parameters (student, τ schedule, teacher t, optimiser, LR);
* :class:`AblationConfig`: the switches of the paper's Table 3;
* :class:`BaselineConfig`: the settings of the comparison modes (student-only sampler, …);
* :class:`RuntimeConfig`: runtime choices that change the numbers (student precision, optimizer variant);
* :class:`AccelerationConfig`: speed and memory options that compute the same function (CUDA graphs,
  channels-last, bf16 weight copies, compile, gradient checkpointing, offloading);
* :class:`LoggingConfig`: how a run is observed.

Beside it, the presets' :func:`default_config` and :class:`WeightSources` (where each model's weights
come from), so that flows and the planner read defaults without importing torch.

The run's identity (:meth:`EditConfig.identity`, hashed by :meth:`EditConfig.config_hash`) is every
section that can change the result: acceleration and logging are outside it by construction.

Memory profiles (:data:`MEMORY_PROFILES`, ``--memory``) name bundles of those settings for a GPU
memory budget, plus the allocator configuration of the GPU process.

Overrides (``--set key=value``, ``config:`` in edits files) name a setting by its flat name (``k``,
``text_cfg``, ``cuda_graphs``; the teacher's are ``teacher``, ``teacher_id``, ``teacher_steps``,
``teacher_image_size``) or by its dotted path (``method.k``); strings are parsed to the field's type;
unknown keys, unparsable, non-finite or out-of-range values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imix2mix.errors import ConfigError

# Registered names (torch-free copies of the registries in imix2mix.modes and imix2mix.teachers; a test
# checks they agree).
MODE_NAMES = ("distill", "teacher_only", "student_only", "t2vz", "sdedit")
TEACHER_NAMES = ("ip2p", "controlnet_canny", "controlnet_depth")

ReferenceEdit = Literal["edited", "source"]
Alignment = Literal["bilinear", "learned", "decode_encode"]
OutputDecoder = Literal["teacher", "seva"]
TeacherTimestepSchedule = Literal["truncnorm", "uniform", "tau_matched"]
CrossViewAttention = Literal["rcv", "extended", "none"]
# adamw*: torch's AdamW (one update rule, three implementations); adamw_bf16_states: AdamW with bf16
# moments (the lean and 24gb memory profiles; changes numerics, see imix2mix/optim.py).
OptimizerName = Literal["adamw", "adamw_fused", "adamw_foreach", "adamw_bf16_states"]
# The optimizers whose update can also write the bf16 weight copies (one fused Triton pass).
COPY_OPTIMIZERS = ("adamw_fused", "adamw_bf16_states")
StudentPrecision = Literal["bf16_autocast", "fp32"]
# Which kernels the models' fused ops run (imix2mix.kernels.dispatch; see AccelerationConfig.kernels).
KernelChoice = Literal["auto", "torch", "triton"]
# The fused ops (a torch-free copy of imix2mix.kernels.dispatch.OPS; a test checks they agree).
KERNEL_OPS = ("group_norm", "layer_norm", "linear", "geglu", "short_attention")


def _key(name: str) -> dict[str, str]:
    """Field metadata: the flat override name of a section field whose own name is ambiguous."""
    return {"key": name}


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen 2D editor: its registry name, weights and guidance (METHOD.md §1.1)."""

    name: str = field(default="ip2p", metadata=_key("teacher"))
    # None: the preset's weights for ``name``; ip2p: any StableDiffusionInstructPix2PixPipeline (hub id or
    # folder); controlnet_*: the ControlNet (SD-1.5 and the depth estimator stay the preset's)
    model_id: str | None = field(default=None, metadata=_key("teacher_id"))
    text_cfg: float = 7.5  # s_T (the ControlNet teachers' only guidance scale)
    image_cfg: float = 1.5  # s_I (image-conditioned teachers only: ip2p)
    steps: int = field(default=100, metadata=_key("teacher_steps"))  # full-pipeline edits: diffusers default
    image_size: int = field(default=512, metadata=_key("teacher_image_size"))

    def problems(self) -> list[str]:
        found = []
        if self.name not in TEACHER_NAMES:
            found.append(f"teacher must be one of {', '.join(TEACHER_NAMES)} (got {self.name!r})")
        if self.steps < 1:
            found.append(f"teacher_steps must be ≥ 1 (got {self.steps})")
        if self.image_size < 16 or self.image_size % 16:
            found.append(f"teacher_image_size must be a positive multiple of 16 (got {self.image_size})")
        return found


@dataclass(frozen=True)
class MethodConfig:
    """The paper's hyper-parameters: student, τ schedule, teacher t, SDS and optimiser."""

    # student (SEVA) and its τ schedule
    student_image_size: int = 576
    camera_scale: float = 2.0
    t_max: int = 999
    t_min: int = 25
    distill_dt: int = 25
    k: int = 50
    k_initial: int = 200
    # teacher timestep t
    teacher_t_upper: int = 950
    teacher_t_lower: int = 50  # lower end of the uniform and τ-matched ablations (t ∈ [0.05, 0.95])
    teacher_t_shape_factor: float = 0.5  # f
    sds_weight: float = 1.0  # w(t), constant
    # The Euler step between τ adds fresh noise ε·√(σ̂² − σ²), σ̂ = σ + 1e-6, before denoising, as the
    # official step does (exactly 0 in fp32 for τ ≥ 814, 0.03–0.23 % of σ at the default τ below); false: the plain ODE step.
    euler_noise: bool = True
    # optimiser and learning rate
    lr: float = 1e-4
    final_lr: float = 5e-5
    min_lr: float = 1e-9
    warmup_steps: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.5

    def problems(self) -> list[str]:
        found = [f"{name} must be ≥ 1 (got {getattr(self, name)})" for name in ("distill_dt", "k", "k_initial") if getattr(self, name) < 1]
        if not 0 <= self.t_min <= self.t_max <= 999:
            found.append(f"need 0 ≤ t_min ≤ t_max ≤ 999 (got t_min={self.t_min}, t_max={self.t_max})")
        if not 0 <= self.teacher_t_lower < self.teacher_t_upper <= 999:
            found.append(f"need 0 ≤ teacher_t_lower < teacher_t_upper ≤ 999 (got {self.teacher_t_lower}, {self.teacher_t_upper})")
        found += [f"{name} must be > 0" for name in ("teacher_t_shape_factor", "lr", "final_lr", "min_lr", "grad_clip", "eps") if getattr(self, name) <= 0]
        if self.weight_decay < 0 or self.warmup_steps < 0:
            found.append("weight_decay and warmup_steps must be ≥ 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            found.append(f"betas must be two values in [0, 1) (got {self.betas})")
        if self.student_image_size < 64 or self.student_image_size % 64:  # VAE ×8, then SEVA's three stride-2 levels
            found.append(f"student_image_size must be a positive multiple of 64 (got {self.student_image_size})")
        return found


@dataclass(frozen=True)
class AblationConfig:
    """The switches of the paper's Table 3; the defaults are I-Mix2Mix."""

    reference_edit: ReferenceEdit = "edited"
    alignment: Alignment = "bilinear"
    teacher_t_schedule: TeacherTimestepSchedule = "truncnorm"
    cross_view_attention: CrossViewAttention = "rcv"
    student_query_steps: int = 1  # 1: single-step Tweedie; n > 1: n Euler steps τ → 0 with gradients
    output_decoder: OutputDecoder = "teacher"  # teacher: its VAE at the teacher size; seva: SEVA's VAE at the student size

    def problems(self) -> list[str]:
        return [f"student_query_steps must be ≥ 1 (got {self.student_query_steps})"] if self.student_query_steps < 1 else []


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the comparison modes (METHOD.md §5.1)."""

    # student_only: SEVA samples all views from the edited reference (SEVA demo defaults)
    student_only_steps: int = 50
    student_only_cfg: float = 2.0
    student_only_cfg_min: float = 1.2
    # t2vz: the teacher's pipeline on all N views at once, cross-frame attention to frame 0
    t2vz_steps: int = 100
    # sdedit (App. E.1): independent teacher edits noised to t (the paper: 250, 500, 750), then SEVA's
    # sampler from t, with MultiviewCFG (cfg_min on frames at an input camera)
    sdedit_t: int = 500
    sdedit_steps: int = 50
    sdedit_cfg: float = 2.0
    sdedit_cfg_min: float = 1.2

    def problems(self) -> list[str]:
        found = [f"{name} must be ≥ 1" for name in ("student_only_steps", "t2vz_steps", "sdedit_steps") if getattr(self, name) < 1]
        if not 1 <= self.sdedit_t <= 999:
            found.append(f"sdedit_t must be in 1..999 (got {self.sdedit_t})")
        return found


@dataclass(frozen=True)
class RuntimeConfig:
    """Runtime choices that change the numbers (so they are part of the run's identity)."""

    student_precision: StudentPrecision = "bf16_autocast"  # CPU always runs fp32
    optimizer: OptimizerName = "adamw_fused"  # the official AdamW update, one fused kernel (docs/benchmarks.md)

    def problems(self) -> list[str]:
        return []


@dataclass(frozen=True)
class AccelerationConfig:
    """Speed and memory options that compute the same function as the plain eager run (up to reduction
    order, as eager differs from eager): outside the run's identity.  :mod:`imix2mix.accel` resolves them
    into an execution plan for the device."""

    # Replay the student's forward + backward and the teacher's UNet pass as CUDA graphs (CUDA only;
    # the student's graph needs one student call per step and no checkpointing).  1.44× (docs/benchmarks.md).
    cuda_graphs: bool = True
    # NHWC convolutions and fused NHWC GroupNorm kernels in the student and the teacher (CUDA).
    channels_last: bool = True
    # bf16 copies of the student's Linear/Conv weights written by the fused AdamW pass (CUDA, bf16 autocast).
    bf16_weight_copies: bool = True
    # With the copies: keep each fp32 master as its copy plus an int16 residual of the bits (the same
    # fp32 number, 2 bytes per parameter less; imix2mix/kernels/adamw.py).
    split_master_weights: bool = False
    # torch.compile the student and the teacher's noise prediction (minutes of warm-up with a cold cache).
    compile: bool = False
    # Recompute the student's activations in backward: less memory, slower, the same values.
    gradient_checkpointing: bool = False
    # Move CLIP-H, SEVA's VAE and the text encoder off the GPU once used, and return the setup's cached blocks to
    # the driver before the loop (the CUDA graphs' private pools cannot reuse them).
    offload_after_use: bool = False
    # The kernels of the student's and the teacher's fused ops (GroupNorm, LayerNorm, Linear bias
    # gradient, GEGLU, short attention) and of the bf16 weight copies' AdamW.  "auto": the Triton
    # kernels in the passes replayed from CUDA graphs, torch's ops elsewhere (eagerly each Triton launch
    # costs more Python than the kernel saves); "torch": torch's ops only (no weight copies);
    # "triton": the Triton kernels in every pass of the run, eager ones included.
    kernels: KernelChoice = "auto"
    # Ops that run on torch's ops whatever ``kernels`` says, comma-separated (before/after measurements).
    torch_ops: str = ""

    def problems(self) -> list[str]:
        unknown = sorted(set(self.torch_op_names()) - set(KERNEL_OPS))
        if unknown:
            return [f"torch_ops: unknown ops {', '.join(unknown)}; ops: {', '.join(KERNEL_OPS)}"]
        return []

    def torch_op_names(self) -> tuple[str, ...]:
        return tuple(op.strip() for op in self.torch_ops.split(",") if op.strip())


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 10  # loss and grad norm read (a device sync) every log_every iterations
    time_phases: bool = False  # per-phase timings (synchronises the device around each phase)

    def problems(self) -> list[str]:
        return [f"log_every must be ≥ 1 (got {self.log_every})"] if self.log_every < 1 else []


_SECTIONS = ("teacher", "method", "ablation", "baselines", "runtime", "acceleration", "logging")
# Sections outside the run's identity: they never change the result.
_RESULT_PRESERVING = frozenset({"acceleration", "logging"})


@dataclass(frozen=True)
class EditConfig:
    """Every setting of one edit run, in sections; defaults are the official release's."""

    mode: str = "distill"  # a name in imix2mix.modes: distill | teacher_only | student_only | t2vz | sdedit
    seed: int = 42
    reference_index: int | None = None  # None: seeded uniform choice, as random.seed(seed); random.choice(views)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    acceleration: AccelerationConfig = field(default_factory=AccelerationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODE_NAMES:
            problems.append(f"mode must be one of {', '.join(MODE_NAMES)} (got {self.mode!r})")
        if self.seed < 0:
            problems.append(f"seed must be ≥ 0 (got {self.seed})")
        if self.reference_index is not None and self.reference_index < 0:
            problems.append(f"reference_index must be ≥ 0 (got {self.reference_index})")
        for section in _SECTIONS:
            value = getattr(self, section)
            problems += value.problems()
            problems += _literal_and_finite_problems(value)
        if problems:
            raise ConfigError("EditConfig: " + "; ".join(problems))

    # -- derived -----------------------------------------------------------------------------------
    @property
    def total_iterations(self) -> int:
        """Distillation updates of the run (0 for modes that do not distil)."""
        if self.mode != "distill":
            return 0
        from imix2mix.schedules import StudentSchedule  # numpy only

        return StudentSchedule.from_method(self.method).total_iterations

    # -- overrides ---------------------------------------------------------------------------------
    def overridden(self, overrides: dict[str, Any] | None = None) -> "EditConfig":
        """A copy with ``overrides`` applied (flat or dotted keys; strings parsed to the field's type)."""
        if not overrides:
            return self
        changes: dict[str | None, dict[str, Any]] = {}
        for key, value in overrides.items():
            section, name, kind = _resolve_key(key)
            changes.setdefault(section, {})[name] = _coerce(key, value, kind)
        top = changes.pop(None, {})
        sections = {section: dataclasses.replace(getattr(self, section), **values) for section, values in changes.items()}
        return dataclasses.replace(self, **top, **sections)

    def setting(self, key: str) -> Any:
        """The value of one setting by its flat or dotted name (as overrides name it)."""
        section, name, _ = _resolve_key(key)
        return getattr(self if section is None else getattr(self, section), name)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name (help texts, tables)."""
        return {key: self.setting(key) for key in setting_names()}

    def for_edit(self, edit: Any) -> "EditConfig":
        """The config with the edit's own CFG scales and seed (where it sets them) applied."""
        own = {name: getattr(edit, name) for name in ("text_cfg", "image_cfg", "seed") if getattr(edit, name) is not None}
        return self.overridden(own)

    # -- identity ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain data (JSON-ready): the top-level settings and one mapping per section."""
        return _plain(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """What can change the result: every section but acceleration and logging."""
        return {key: value for key, value in self.to_dict().items() if key not in _RESULT_PRESERVING}

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`identity`."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditConfig":
        """Inverse of :meth:`to_dict` (e.g. a run.json's config); sections may be partial."""
        flat = {key: value for key, value in data.items() if key not in _SECTIONS}
        for section in _SECTIONS:
            flat.update({f"{section}.{name}": value for name, value in (data.get(section) or {}).items()})
        return cls().overridden(flat)


# ---------------------------------------------------------------------------------------------------
# Memory profiles
# ---------------------------------------------------------------------------------------------------

# The CUDA caching allocator's configuration variable.  torch reads it when the process first
# initialises CUDA, so it is a setting of the process (the CLI's, a benchmark's, a Ray EditWorker's),
# never of one run: see :func:`apply_allocator`.
ALLOCATOR_ENV = "PYTORCH_CUDA_ALLOC_CONF"


@dataclass(frozen=True)
class MemoryProfile:
    """A named bundle for a GPU memory budget: EditConfig settings (flat names, applied under the
    run's own ``--set``), and the allocator configuration of the GPU process ("" leaves torch's)."""

    settings: dict[str, Any]
    allocator: str = ""
    summary: str = ""


MEMORY_PROFILES: dict[str, MemoryProfile] = {
    "default": MemoryProfile({}, summary="fastest; about 24 GiB allocated, 32 GiB reserved at N = 4 (40 GB+ cards)"),
    # Keeps CUDA graphs, channels-last, the Triton kernels and the bf16 weight copies; saves half of the
    # AdamW moments (bf16: 4.7 of 9.4 GiB, a named numerics change); half of the fp32 master weights'
    # memory (split into the copy plus an int16 residual: the same numbers, 2.35 GiB); the frozen
    # encoders' residency after setup (CLIP-H, the teacher's text encoder); and the allocator's
    # fragmentation (expandable segments, and the setup's cache returned before the CUDA graphs' pools
    # are made).  No gradient checkpointing: that is lean's cost in speed.
    "24gb": MemoryProfile(
        {"optimizer": "adamw_bf16_states", "split_master_weights": True, "offload_after_use": True},
        allocator="expandable_segments:True",
        summary="24 GB cards: bf16 AdamW moments, split fp32 masters, encoders offloaded after setup, expandable segments",
    ),
    # The smallest footprint: the 24gb profile plus whole-block gradient checkpointing (no CUDA graph
    # of the student: about 3× slower per iteration).
    "lean": MemoryProfile(
        {"optimizer": "adamw_bf16_states", "offload_after_use": True, "gradient_checkpointing": True, "compile": False},
        allocator="expandable_segments:True",
        summary="smallest footprint: the 24gb profile plus gradient checkpointing (about 3× slower)",
    ),
}


def memory_profile(name: str) -> MemoryProfile:
    """The profile called ``name`` (:data:`MEMORY_PROFILES`)."""
    try:
        return MEMORY_PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown memory profile '{name}'; choose one of {', '.join(MEMORY_PROFILES)}") from None


def memory_settings(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The profile's EditConfig settings with ``overrides`` (the run's own) on top."""
    return {**memory_profile(name).settings, **(overrides or {})}


def apply_allocator(name: str, environ: dict[str, str]) -> str | None:
    """Set the profile's allocator configuration in ``environ`` (``os.environ`` before the process
    first touches CUDA, or a Ray worker's env vars); a value the user set already wins.  Returns
    what ``environ`` now holds for :data:`ALLOCATOR_ENV`."""
    allocator = memory_profile(name).allocator
    if allocator and not environ.get(ALLOCATOR_ENV):
        environ[ALLOCATOR_ENV] = allocator
    return environ.get(ALLOCATOR_ENV)


def setting_names() -> list[str]:
    """Every flat override name, sorted (for help texts and error messages)."""
    return sorted(key for key in _setting_index() if "." not in key)


# ---------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


@functools.cache
def _setting_index() -> dict[str, tuple[str | None, str, Any]]:
    """Flat name and dotted path → (section or None, field name, annotated type)."""
    index: dict[str, tuple[str | None, str, Any]] = {}
    top_types = typing.get_type_hints(EditConfig)
    for name in ("mode", "seed", "reference_index"):
        index[name] = (None, name, top_types[name])
    for section in _SECTIONS:
        section_class = top_types[section]
        hints = typing.get_type_hints(section_class)
        for item in dataclasses.fields(section_class):
            entry = (section, item.name, hints[item.name])
            flat = item.metadata.get("key", item.name)
            if flat in index:  # pragma: no cover - a programming error caught by the tests
                raise AssertionError(f"two settings are called {flat!r}")
            index[flat] = entry
            index[f"{section}.{item.name}"] = entry
    return index


def _resolve_key(key: str) -> tuple[str | None, str, Any]:
    try:
        return _setting_index()[key]
    except KeyError:
        raise ConfigError(f"EditConfig: unknown setting '{key}'. Known settings: {', '.join(setting_names())}.") from None


def _literal_and_finite_problems(section: Any) -> list[str]:
    hints = typing.get_type_hints(type(section))
    found = []
    for item in dataclasses.fields(section):
        value, kind = getattr(section, item.name), hints[item.name]
        name = item.metadata.get("key", item.name)
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            found.append(f"{name} must be one of {', '.join(map(str, typing.get_args(kind)))} (got {value!r})")
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            found.append(f"{name} must be a finite number (got {value!r})")
    return found


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
    if kind is str:
        if not isinstance(value, str):
            raise fail("a string")
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
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except ValueError:
            raise fail("a number") from None
        if not math.isfinite(number):
            raise fail("a finite number")
        return number
    if origin is tuple:
        items = [v for v in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise fail(f"{len(args)} comma-separated values")
        return tuple(_coerce(key, item, arg) for item, arg in zip(items, args))
    raise fail(str(kind))  # pragma: no cover - every field type is handled above


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
    # the ControlNet teachers: SD-1.5, each ControlNet, and the depth control's estimator
    sd15: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    controlnet_canny: str = "lllyasviel/sd-controlnet-canny"
    controlnet_depth: str = "lllyasviel/sd-controlnet-depth"
    depth_estimator: str = "depth-anything/Depth-Anything-V2-base-hf"

    @classmethod
    def local(cls, folder: str | Path) -> "WeightSources":
        """The layout :func:`save_editor_weights` writes (and ``--weights-dir`` expects)::

            folder/seva/modelv1.1.safetensors   folder/seva_vae/    folder/clip_h/
            folder/teacher/ (diffusers IP2P pipeline)                folder/clip_metrics/
            folder/sd15/ (diffusers SD-1.5 pipeline)   folder/controlnet_canny/   folder/controlnet_depth/
            folder/depth/ (transformers depth-estimation model)

        (the ControlNet teachers' folders are read only by runs that use them).
        """
        folder = Path(folder)
        return cls(
            seva=str(folder / "seva"), seva_vae=str(folder / "seva_vae"), seva_vae_subfolder=None,
            clip_h=str(folder / "clip_h"), teacher=str(folder / "teacher"), clip_metrics=str(folder / "clip_metrics"),
            sd15=str(folder / "sd15"), controlnet_canny=str(folder / "controlnet_canny"),
            controlnet_depth=str(folder / "controlnet_depth"), depth_estimator=str(folder / "depth"),
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
        return EditConfig().overridden(dict(
            student_image_size=128, teacher_image_size=96, distill_dt=195, k=2, k_initial=4, warmup_steps=4,
            teacher_steps=4, student_only_steps=4, t2vz_steps=4, sdedit_steps=4, log_every=1,
        ))
    raise ConfigError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
