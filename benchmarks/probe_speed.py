"""Where the distillation iteration's GPU time goes, and what each candidate change buys.

Measures, at full size with random weights (T = 5 frames at 72² for the student, the teacher's
12-image batch at 64²):

* the two ceilings of the machine (a large bf16 matrix product, a large device-to-device copy);
* the student's forward + backward replayed as CUDA graphs (launch gaps removed, so the numbers are
  GPU time) for variants: as now; channels-last; each SDPA backend; bf16 weight copies; together;
* a kernel-level profile of one eager forward + backward, summed by kind (matrix, convolution,
  attention, normalisation, elementwise, copies/casts);
* the teacher's UNet pass (fp16, inference mode) as a CUDA graph, as now and channels-last;
* the clip + optimizer phase: clip_grad_norm_ then fused AdamW, against the clip folded into the
  fused AdamW's ``grad_scale``, and against AdamWWithComputeCopies (bf16 gradients and copies);
* GroupNorm + SiLU forward + backward at the student's shapes: torch's NCHW kernel against the fused
  NHWC Triton kernel (``--parts group_norm``).

    python benchmarks/probe_speed.py --out results/                # GPU
    python benchmarks/probe_speed.py --preset tiny --device cpu      # smoke test (eager only)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from imix2mix.seva import Seva, SevaConfig  # noqa: E402

RESULTS: dict[str, Any] = {}


def log(key: str, value: Any) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- ceilings ---------------------------------------------------------------------------------

def ceilings(device: torch.device) -> None:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: torch.mm(a, b), device, 20)
    log("ceiling_bf16_matmul_tflops", round(2 * n**3 / seconds / 1e12, 1))
    src = torch.randn(256 * 2**20, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, 20)
    log("ceiling_copy_tbps", round(2 * src.numel() * 4 / seconds / 1e12, 2))


# -- kernel classification ----------------------------------------------------------------------

KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated_fort_native_sdpa"),
    ("convolution", r"conv|implicit|fprop|dgrad|wgrad|xmma_fprop|cudnn|nchwToNhwc|nhwcToNchw"),
    ("matmul", r"gemm|sm90_xmma|cutlass|ampere_|sm80_|nvjet|cublas"),
    ("normalisation", r"norm|welford|moments|_stats_kernel|_backward_(sums|group|dx)_kernel"),  # ours: imix2mix/kernels
    ("copy_cast", r"copy|cast|transpose|permute|cat|Copy|contiguous"),
    ("optimizer", r"adam|foreach|multi_tensor|norm_kernel"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|reduce"),
]


def kernel_table(prof, top: int = 45) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue  # record_function ranges mirrored on the GPU timeline are not kernels
        seconds = event.device_time_total / 1e6 if hasattr(event, "device_time_total") else event.cuda_time_total / 1e6
        name = event.name
        kernels[name][0] += seconds
        kernels[name][1] += 1
        for kind, pattern in KINDS:
            if re.search(pattern, name, re.IGNORECASE):
                totals[kind] += seconds
                break
        else:
            totals["other"] += seconds
    ranked = sorted(((name[:140], round(t, 5), int(c)) for name, (t, c) in kernels.items()), key=lambda r: -r[1])
    return {k: round(v, 5) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}, ranked[:top]


# -- the student ------------------------------------------------------------------------------

class _Bound(torch.nn.Module):
    def __init__(self, network: Seva, frames: int):
        super().__init__()
        self.network, self.frames = network, frames

    def forward(self, x, t, y, dense):
        return self.network(x, t, y, dense, num_frames=self.frames)


def student_inputs(config: SevaConfig, frames: int, latent: int, device: torch.device, channels_last: bool):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(frames, config.in_channels, latent, latent, generator=g, device=device)
    dense = torch.randn(frames, config.dense_in_channels, latent, latent, generator=g, device=device)
    if channels_last:
        x, dense = x.contiguous(memory_format=torch.channels_last), dense.contiguous(memory_format=torch.channels_last)
    t = torch.full((frames,), 500, dtype=torch.long, device=device)
    y = torch.randn(frames, 1, config.context_dim, generator=g, device=device)
    return x, t, y, dense


def sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, backend)])


def student_variant(network: Seva, config: SevaConfig, args, device, *, channels_last=False, sdpa=None, bf16_weights=False,
                    regional_compile=False, patches=(), profile_path=None, reference=None):
    """Median seconds of one forward + backward replayed as CUDA graphs (eager on CPU)."""
    network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    master = None
    if bf16_weights:  # timing only: what the fp32→bf16 weight casts cost
        master = {n: p.detach().clone() for n, p in network.named_parameters()}
        for module in network.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.to(torch.bfloat16)
    inputs = student_inputs(config, args.frames, args.latent, device, channels_last)
    gradient = torch.randn(args.frames, config.out_channels, args.latent, args.latent, device=device)
    def autocast():  # a fresh object each time: torch.autocast instances must not be nested
        if device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)

    bound = _Bound(network, args.frames)
    undo = [u for name in patches for u in PATCHES[name](network)]
    try:
        with torch.no_grad(), autocast():
            output = bound(*inputs).float()
        if reference is not None:
            log(f"student_output_rel_diff[{'+'.join(patches) or 'none'}]", f"{float((output - reference).norm() / reference.norm()):.2e}")
        compiled = []
        if regional_compile:
            from imix2mix.seva.attention import MultiviewTransformer
            from imix2mix.seva.layers import ResBlock

            compiled = [m for m in network.modules() if isinstance(m, (ResBlock, MultiviewTransformer))]
            for module in compiled:
                module.compile()
            started = time.perf_counter()
            with autocast():
                out = bound(*inputs)
            out.float().backward(gradient)
            sync(device)
            log("student_regional_compile_first_step_s", round(time.perf_counter() - started, 1))
        with sdpa_context(sdpa), autocast():
            model = (
                torch.cuda.make_graphed_callables(bound, inputs, allow_unused_input=True)
                if device.type == "cuda" and not args.eager else bound
            )

            def step():
                network.zero_grad(set_to_none=True)
                with autocast():
                    out = model(*inputs)
                out.float().backward(gradient)

            seconds = median_seconds(step, device, args.repeats)
            if profile_path is not None:
                from torch.profiler import ProfilerActivity, profile

                eager = bound
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    network.zero_grad(set_to_none=True)
                    with autocast():
                        out = eager(*inputs)
                    out.float().backward(gradient)
                    sync(device)
                totals, top = kernel_table(prof)
                profile_path.write_text(json.dumps({"by_kind": totals, "top_kernels": top}, indent=1))
                log(f"student_profile_by_kind[{profile_path.stem}]", totals)
        del model
    finally:
        for u in undo:
            u()
    for module in compiled:
        module._compiled_call_impl = None
    network.zero_grad(set_to_none=True)
    if master is not None:
        network.float()
        with torch.no_grad():
            for n, p in network.named_parameters():
                p.copy_(master[n])
    network.to(memory_format=torch.contiguous_format)
    release()
    return seconds, output


# -- candidate changes, applied by monkeypatching for the measurement only ----------------------

def _patch(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


def patch_geglu_split(network):
    """GEGLU as two half-width matmuls: the gate and value come out contiguous (vectorised kernels)."""
    from imix2mix.seva.attention import GEGLU

    def forward(self, x):
        half = self.proj.out_features // 2
        w, b = self.proj.weight, self.proj.bias
        return F.linear(x, w[:half], b[:half]) * F.gelu(F.linear(x, w[half:], b[half:]))
    return [_patch(GEGLU, "forward", forward)]


def patch_layernorm_mixed(network):
    """LayerNorm on the bf16 activations with fp32 statistics and weights, bf16 out (no casts)."""
    def forward(self, x):
        if x.dtype == torch.bfloat16 and torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    return [_patch(torch.nn.LayerNorm, "forward", forward)]


def patch_groupnorm_mixed(network):
    from imix2mix.seva.layers import GroupNorm32

    def forward(self, x):
        if x.dtype == torch.bfloat16:
            with torch.autocast("cuda", enabled=False):
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).type(x.dtype)
    return [_patch(GroupNorm32, "forward", forward)]


def patch_timemix_backend(backend):
    def apply(network):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from imix2mix.seva.attention import SdpaAttnProcessor, TransformerBlockTimeMix

        class Pinned(SdpaAttnProcessor):
            def __call__(self, attn, x, context):
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    return super().__call__(attn, x, context)
        blocks = [m for m in network.modules() if isinstance(m, TransformerBlockTimeMix)]
        for block in blocks:
            block.attn1.set_processor(Pinned())
        return [lambda: [b.attn1.set_processor(SdpaAttnProcessor()) for b in blocks]]
    return apply


PATCHES = {
    "geglu_split": patch_geglu_split,
    "layernorm_mixed": patch_layernorm_mixed,
    "groupnorm_mixed": patch_groupnorm_mixed,
    "timemix_math": patch_timemix_backend("MATH"),
    "timemix_efficient": patch_timemix_backend("EFFICIENT_ATTENTION"),
}


def student(args, device: torch.device) -> None:
    config = SevaConfig() if args.preset == "full" else SevaConfig.tiny()
    with device:
        network = Seva(config)
    network.train()
    variants = {
        "as_now": {},
        "channels_last": {"channels_last": True},
        "sdpa_flash": {"sdpa": "FLASH_ATTENTION"},
        "sdpa_efficient": {"sdpa": "EFFICIENT_ATTENTION"},
        "sdpa_cudnn": {"sdpa": "CUDNN_ATTENTION"},
        "bf16_weights": {"bf16_weights": True},
        "channels_last+bf16_weights": {"channels_last": True, "bf16_weights": True},
        "regional_compile": {"regional_compile": True},
        **{name: {"patches": (name,)} for name in PATCHES},
        "as_now_again": {},
        "all_patches": {"patches": ("geglu_split", "layernorm_mixed", "groupnorm_mixed", "timemix_efficient")},
    }
    variants = {k: v for k, v in variants.items() if k in args.student_variants.split(",")}
    if device.type != "cuda":
        variants = {k: v for k, v in variants.items() if "sdpa" not in k}
    reference = None
    for name, kwargs in variants.items():
        profile_path = None
        if name in ("as_now", "all_patches") and args.out is not None:
            profile_path = args.out / f"profile_student_{name}.json"
        try:
            seconds, output = student_variant(network, config, args, device, profile_path=profile_path, reference=reference, **kwargs)
            if reference is None:
                reference = output
            log(f"student_fwd_bwd_s[{name}]", round(seconds, 5))
        except Exception as exc:  # a backend may not support a shape: record it and go on
            log(f"student_fwd_bwd_s[{name}]", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            release()
    if not args.skip_attention_shapes:
        attention_shapes(config, args, device)
    del network
    release()


def attention_shapes(config: SevaConfig, args, device: torch.device) -> None:
    """SDPA forward + backward at the student's shapes, per backend (bf16)."""
    if device.type != "cuda":
        return
    latent, frames = args.latent, args.frames
    shapes = {
        # name: (batch, heads, q_len, kv_len, head_dim)
        "spatial_ds1": (frames, 5, latent * latent, latent * latent, 64),
        "3d_ds2": (1, 10, frames * (latent // 2) ** 2, frames * (latent // 2) ** 2, 64),
        "timemix_ds1": (latent * latent, 5, frames, frames, 64),
        "cross_ds1": (frames, 5, latent * latent, 1, 64),
    }
    for shape_name, (b, h, lq, lk, d) in shapes.items():
        q = torch.randn(b, h, lq, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, h, lk, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, h, lk, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(b, h, lq, d, device=device, dtype=torch.bfloat16)
        flops = 4 * b * h * lq * lk * d * 3.5  # forward + backward (2.5× forward)
        for backend in (None, "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            def step():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                out.backward(grad)
            try:
                with sdpa_context(backend):
                    seconds = median_seconds(step, device, 10)
                log(f"attention_s[{shape_name},{backend or 'default'}]", f"{seconds * 1e3:.3f} ms, {flops / seconds / 1e12:.0f} TFLOP/s")
            except Exception as exc:
                log(f"attention_s[{shape_name},{backend or 'default'}]", f"failed: {str(exc).splitlines()[0][:120]}")
        del q, k, v, grad
        release()


# -- the teacher ------------------------------------------------------------------------------

def teacher(args, device: torch.device) -> None:
    from imix2mix.presets import TeacherArchitecture, build_random_teacher_pipeline

    arch = TeacherArchitecture.sd15() if args.preset == "full" else TeacherArchitecture.tiny()
    pipeline = build_random_teacher_pipeline(arch, device=device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = pipeline.unet.to(dtype).eval()
    size = arch.unet["sample_size"]
    batch = 12
    model_input = torch.randn(batch, 8, size, size, device=device, dtype=dtype)
    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    text = torch.randn(batch, 77, arch.unet["cross_attention_dim"], device=device, dtype=dtype)
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from imix2mix.kernels.triton_support import triton_kernels_for_graph_capture
    from imix2mix.teachers.ip2p import InstructPix2PixTeacher

    unet = InstructPix2PixTeacher(pipeline, device=device, dtype=dtype).unet  # our norms, GEGLUs, layouts
    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    ours = [block.__dict__.pop("_get_output_for_continuous_inputs") for block in blocks]
    # diffusers_output: diffusers' own block output (NHWC tokens copied to NCHW before proj_out)
    for name, channels_last, diffusers_output in (("nchw", False, True), ("channels_last_diffusers_output", True, True),
                                                  ("channels_last", True, False)):
        for block, method in zip(blocks, ours):
            block.__dict__.pop("_get_output_for_continuous_inputs", None)
            if not diffusers_output:
                block._get_output_for_continuous_inputs = method
        unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        x = model_input.contiguous(memory_format=torch.channels_last) if channels_last else model_input
        with torch.inference_mode(), triton_kernels_for_graph_capture():
            if device.type == "cuda" and not args.eager:
                for _ in range(2):
                    unet(x, timestep, encoder_hidden_states=text, return_dict=False)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    unet(x, timestep, encoder_hidden_states=text, return_dict=False)
                seconds = median_seconds(graph.replay, device, args.repeats)
                del graph
            else:
                seconds = median_seconds(lambda: unet(x, timestep, encoder_hidden_states=text, return_dict=False), device, args.repeats)
        log(f"teacher_unet_s[{name}]", round(seconds, 5))
        release()
    if device.type == "cuda" and args.out is not None:
        from torch.profiler import ProfilerActivity, profile

        unet.to(memory_format=torch.contiguous_format)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            unet(model_input, timestep, encoder_hidden_states=text, return_dict=False)
            sync(device)
        totals, top = kernel_table(prof)
        (args.out / "profile_teacher.json").write_text(json.dumps({"by_kind": totals, "top_kernels": top}, indent=1))
        log("teacher_profile_by_kind", totals)
    del pipeline, unet
    release()


# -- clip + optimizer -------------------------------------------------------------------------

def optimizer(args, device: torch.device) -> None:
    config = SevaConfig() if args.preset == "full" else SevaConfig.tiny()
    with device:
        network = Seva(config)
    params = list(network.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=fused)

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=True)
        opt.step()

    def folded():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        opt.grad_scale = torch.clamp((norm + 1e-6) / 0.5, min=1.0)
        opt.step()
        del opt.grad_scale

    variants = (("clip_then_fused_step", clip_then_step), ("norm_then_fused_step_with_grad_scale", folded))
    for name, fn in variants[: 2 if fused else 1]:
        log(f"optimizer_s[{name}]", round(median_seconds(fn, device, args.repeats), 5))
        log(f"optimizer_kernel_ms[{name}]", kernel_milliseconds(fn, device, args.repeats))
    del opt, network, params
    release()

    # AdamWWithComputeCopies (the default): bf16 gradients of the matrix weights, their bf16 copies
    # written by the update, the clip folded in.  CUDA only: interpreted, one step of the tiny
    # student takes two minutes.
    from imix2mix.optim import matrix_parameters
    from imix2mix.kernels.adamw import fused_adamw_available
    from imix2mix.optim import AdamWWithComputeCopies

    if device.type != "cuda" or not fused_adamw_available(device):
        return
    with device:
        network = Seva(config)
    copies = matrix_parameters(network)
    ours = AdamWWithComputeCopies(network.parameters(), lr=1e-5, weight_decay=0.01, compute_copies=copies)
    for p in network.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    log("optimizer_s[compute_copies_clip_and_step]", round(median_seconds(lambda: ours.clip_and_step(0.5), device, args.repeats), 5))
    log("optimizer_kernel_ms[compute_copies_clip_and_step]", kernel_milliseconds(lambda: ours.clip_and_step(0.5), device, args.repeats))
    log("optimizer_copied_parameters", sum(p.numel() for p in copies))
    # Chunk and block sizes of the update kernel (elements per program, per loop step; warps).
    import imix2mix.kernels.adamw as kernels

    chosen = (kernels.CHUNK, kernels.BLOCK, kernels.NUM_WARPS)
    for sizes in [chosen, (8192, 1024, 4), (16384, 2048, 8), (65536, 1024, 4), (32768, 2048, 8), (32768, 512, 4), (32768, 1024, 8)]:
        kernels.CHUNK, kernels.BLOCK, kernels.NUM_WARPS = sizes
        ours.release()
        ours = AdamWWithComputeCopies(network.parameters(), lr=1e-5, weight_decay=0.01, compute_copies=copies)
        for p in network.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        log(f"optimizer_kernel_ms[compute_copies chunk={sizes[0]} block={sizes[1]} warps={sizes[2]}]",
            kernel_milliseconds(lambda: ours.clip_and_step(0.5), device, args.repeats))
    kernels.CHUNK, kernels.BLOCK, kernels.NUM_WARPS = chosen
    del ours, network, copies
    release()


def kernel_milliseconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Device time of ``fn``'s kernels per call (profiler), without the host's launch overhead, which
    CUDA-graph replay removes in the iteration; wall milliseconds on the CPU."""
    if device.type != "cuda":
        return median_seconds(fn, device, repeats) * 1e3
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # Triton compiles, cuDNN picks its kernels
        fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    totals, _ = kernel_table(prof)
    return round(sum(totals.values()) / repeats * 1e3, 4)


# -- GroupNorm at the student's shapes -----------------------------------------------------------

def group_norm(args, device: torch.device) -> None:
    """GroupNorm32 + SiLU forward + backward, bf16 activations: torch's NCHW kernel under autocast's
    casts (with the NCHW↔NHWC transposes cuDNN would add around it, timed separately) against the
    fused NHWC Triton kernel, at every (channels, size) of the full student with T frames: kernel
    milliseconds per forward + backward."""
    from imix2mix.kernels.group_norm import fused_group_norm_available
    from imix2mix.seva.layers import GroupNorm32

    latent = args.latent
    shapes = [(320, latent), (640, latent // 2), (1280, latent // 4), (1280, latent // 8),
              (640, latent), (960, latent // 2), (1920, latent // 4), (2560, latent // 8)]

    for channels, size in shapes:
        norm = GroupNorm32(32, channels).to(device)
        x = torch.randn(args.frames, channels, size, size, device=device, dtype=torch.bfloat16)
        gradient = torch.randn_like(x)
        results = {}
        for name, memory_format in (("nchw", torch.contiguous_format), ("nhwc_fused", torch.channels_last)):
            source = x.contiguous(memory_format=memory_format).requires_grad_(True)
            grad = gradient.contiguous(memory_format=memory_format)
            if name == "nhwc_fused" and not fused_group_norm_available(source, 32):
                continue
            results[name] = kernel_milliseconds(lambda: norm(source, silu=True).backward(grad), device, args.repeats)
        transpose = kernel_milliseconds(lambda: x.contiguous(memory_format=torch.channels_last), device, args.repeats)
        log(f"group_norm_ms[C={channels},{size}x{size}]",
            {**{k: round(v, 3) for k, v in results.items()}, "one_layout_transpose": round(transpose, 3)})


# -- the feed-forward's GEGLU gate and the linear layers' bias gradient at the student's shapes ----

def feed_forward(args, device: torch.device) -> None:
    """Kernel milliseconds, bf16, at each transformer level of the full student with T frames:
    the GEGLU gate forward + backward (torch's ops on the halves vs the fused kernel), the bias
    gradient's column sum (torch's ``sum(0)`` vs the Triton kernel), and a whole FeedForward forward +
    backward under autocast with both kernels on and off."""
    import imix2mix.seva.attention as attention
    import imix2mix.seva.layers as layers
    import imix2mix.kernels.geglu as geglu_kernels
    from imix2mix.kernels.geglu import geglu, geglu_reference
    from imix2mix.kernels.linear import column_sum
    from imix2mix.kernels.triton_support import triton_kernels_for_graph_capture

    levels = [(320, args.latent), (640, args.latent // 2), (1280, args.latent // 4)]
    for channels, size in levels:
        rows = args.frames * size * size
        h = torch.randn(rows, 8 * channels, device=device, dtype=torch.bfloat16)
        dout = torch.randn(rows, 4 * channels, device=device, dtype=torch.bfloat16)
        gate = {}
        for name, fn in (("torch", geglu_reference), ("fused", geglu)):
            source = h.clone().requires_grad_(True)
            gate[name] = kernel_milliseconds(lambda: fn(source).backward(dout), device, args.repeats)
        # Tile shapes of the fused gate: (BLOCK_F, TILE, NUM_WARPS).
        defaults = (geglu_kernels.BLOCK_F, geglu_kernels.TILE, geglu_kernels.NUM_WARPS)
        for variant in ((512, 4096, 4), (128, 2048, 4), (1024, 8192, 8), (512, 8192, 8), (256, 4096, 4), (128, 1024, 4)):
            geglu_kernels.BLOCK_F, geglu_kernels.TILE, geglu_kernels.NUM_WARPS = variant
            source = h.clone().requires_grad_(True)
            gate["fused" + str(variant)] = kernel_milliseconds(lambda: geglu(source).backward(dout), device, args.repeats)
        geglu_kernels.BLOCK_F, geglu_kernels.TILE, geglu_kernels.NUM_WARPS = defaults
        narrow = torch.randn(rows, channels, device=device, dtype=torch.bfloat16)
        sums = {
            "torch": kernel_milliseconds(lambda: h.sum(0), device, args.repeats),
            "fused": kernel_milliseconds(lambda: column_sum(h, torch.bfloat16), device, args.repeats),
            "torch_C": kernel_milliseconds(lambda: narrow.sum(0), device, args.repeats),
            "fused_C": kernel_milliseconds(lambda: column_sum(narrow, torch.bfloat16), device, args.repeats),
        }
        ff = attention.FeedForward(channels).to(device)
        x = torch.randn(rows, channels, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)

        def ff_step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = ff(x)
            out.backward(grad)

        with triton_kernels_for_graph_capture():  # the layers take their kernels as in a graph capture
            whole = {"fused": kernel_milliseconds(ff_step, device, args.repeats)}
        restore = [_patch(attention, "fused_geglu_available", lambda h: False),
                   _patch(layers, "fused_bias_grad_available", lambda x, b: False)]
        whole["torch"] = kernel_milliseconds(ff_step, device, args.repeats)
        for undo in restore:
            undo()
        bytes_gate = 3 * h.numel() * 2 + 2 * dout.numel() * 2  # fwd: h + out; bwd: h + dout + dh
        log(f"feed_forward_ms[C={channels},rows={rows}]", {
            "gate_fwd_bwd": {k: round(v, 3) for k, v in gate.items()},
            "gate_floor_at_2.9TB/s": round(bytes_gate / 2.9e12 * 1e3, 3),
            "bias_column_sum_8C_and_C": {k: round(v, 3) for k, v in sums.items()},
            "sum_floor_at_2.9TB/s": round(h.numel() * 2 / 2.9e12 * 1e3, 3),
            "feed_forward_fwd_bwd": {k: round(v, 3) for k, v in whole.items()},
        })
        del h, dout, x, grad, ff, narrow
        release()


def short_attention(args, device: torch.device) -> None:
    """The time-mix self-attention (T frames, SEVA's heads) at each level of the full student:
    kernel milliseconds of forward + backward through SDPA (with the head transposes) vs the
    short-sequence Triton kernel, bf16."""
    import imix2mix.kernels.short_attention as kernels
    from imix2mix.kernels.short_attention import short_attention as kernel
    from imix2mix.kernels.short_attention import short_attention_reference

    for channels, size, heads in ((320, args.latent, 5), (640, args.latent // 2, 10), (1280, args.latent // 4, 20)):
        q, k, v = (torch.randn(size * size, args.frames, channels, device=device, dtype=torch.bfloat16) for _ in range(3))
        do = torch.randn_like(q)
        times = {}
        default_block, default_warps = kernels.BLOCK_B, kernels.NUM_WARPS
        for name, fn, block in (("sdpa", short_attention_reference, None), ("kernel", kernel, default_block),
                                ("kernel_block_4", kernel, 4), ("kernel_block_16", kernel, 16),
                                ("kernel_block_16_8_warps", kernel, -16)):
            kernels.BLOCK_B = abs(block or default_block)
            kernels.NUM_WARPS = 8 if block is not None and block < 0 else default_warps
            ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
            times[name] = round(kernel_milliseconds(lambda: fn(*ins, heads).backward(do), device, args.repeats), 3)
        kernels.BLOCK_B, kernels.NUM_WARPS = default_block, default_warps
        floor = 8 * q.numel() * 2 / 2.9e12 * 1e3  # q, k, v, o, do read; o, dq, dk, dv written: at least 8 passes
        log(f"short_attention_ms[C={channels},{size}x{size},T={args.frames}]", {**times, "floor_at_2.9TB/s": round(floor, 3)})
        del q, k, v, do
        release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=["full", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--latent", type=int, default=72)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--parts", default="ceilings,student,teacher,optimizer")
    parser.add_argument("--student-variants", default="as_now,channels_last,bf16_weights,regional_compile")
    parser.add_argument("--skip-attention-shapes", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log("gpu", torch.cuda.get_device_name(device))
        log("torch", torch.__version__)
    parts = {"ceilings": ceilings, "student": student, "teacher": teacher, "optimizer": optimizer, "group_norm": group_norm,
             "feed_forward": feed_forward, "short_attention": short_attention}
    for part in args.parts.split(","):
        started = time.perf_counter()
        try:
            parts[part](args, device) if part != "ceilings" else (ceilings(device) if device.type == "cuda" else None)
        except Exception as exc:
            log(f"{part}_error", f"{type(exc).__name__}: {exc}")
        log(f"{part}_wall_s", round(time.perf_counter() - started, 1))
        if args.out is not None:
            (args.out / "probe_speed.json").write_text(json.dumps(RESULTS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
