"""The distillation loop against the official I-Mix2Mix loop (fixtures in shared/parity/loop).

The fixture recorded every intermediate of the official loop on tiny deterministic models (fp32, CPU):
9 SDS updates at τ = 999, 599, 199, two Euler steps and the final decode, with every random draw.
Here the same models are built with the fixture's ``make_loop_models.py``, the recorded draws are
injected through :class:`~imix2mix.randomness.RecordedRandomness` (the public seam every draw of a run
goes through), the fixture's student conditioning is injected (the SEVA VAE and CLIP stand-ins of its
README §1), and an observer collects our tensors; every recorded quantity is compared at the tolerances
of the fixture's README §6.  The teacher's text and image conditioning are our own
(:meth:`InstructPix2PixTeacher.prepare`), checked against the recording first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PARITY, SCENES
from safetensors.torch import load_file

from imix2mix.config import EditConfig
from imix2mix.edits import Edit
from imix2mix.editor import to_uint8_image
from imix2mix.modes.distill import Distillation, EulerRecord, IterationRecord
from imix2mix.preprocess import prepare_views
from imix2mix.randomness import RecordedRandomness, RunRandomness
from imix2mix.scene import load_scene
from imix2mix.schedules import StudentSchedule
from imix2mix.seva import Seva, SevaConfig
from imix2mix.seva.camera import build_student_conditioning
from imix2mix.seva.schedule import SevaConditioning
from imix2mix.students import SevaStudent
from imix2mix.teachers.ip2p import InstructPix2PixTeacher

LOOP = PARITY / "loop"


def load_generator():
    """The fixture's ``make_loop_models.py``, imported by path (it is not a package)."""
    spec = importlib.util.spec_from_file_location("make_loop_models", LOOP / "make_loop_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_loop_models", module)
    spec.loader.exec_module(module)
    return module


def loop_config(run: dict) -> EditConfig:
    """Our settings for the recorded run (official option names → our flat setting names); every other
    setting keeps its default, so the four official behaviours are tested as the defaults."""
    return EditConfig().overridden(dict(
        seed=run["seed"], text_cfg=run["teacher_cfg"], image_cfg=run["image_cfg"], t_max=run["t_max"],
        t_min=run["t_min"], distill_dt=run["distill_dt"], k=run["n_distill_per_timestep"],
        k_initial=run["n_distill_initial_timestep"], lr=run["lr"], final_lr=run["final_lr"], min_lr=run["min_lr"],
        warmup_steps=run["n_warmup_steps"], weight_decay=run["weight_decay"], grad_clip=run["grad_clip"],
        teacher_t_upper=run["teacher_upper"], teacher_t_shape_factor=run["teacher_timestep_shape_factor"],
        student_image_size=run["student_image_size"], teacher_image_size=run["teacher_image_size"],
        # torch's single-tensor AdamW, as the recording ran (README §1); the default fused kernel
        # rounds differently (docs/architecture.md, "Differences from the official loop")
        optimizer="adamw", student_precision="fp32", log_every=1,
    ))


def recorded_randomness(ref: dict[str, torch.Tensor], config: EditConfig, reference: int) -> RecordedRandomness:
    return RecordedRandomness(
        seed=config.seed, device=torch.device("cpu"), reference=reference, initial=ref["inputs.init_randn"],
        teacher_timesteps=ref["iter.t"].tolist(), key_views=ref["iter.kappa"].tolist(),
        sds_noises=list(ref["iter.eps"]), euler_noises=list(ref["euler.eps"]),
    )


def recorded_conditioning(ref: dict[str, torch.Tensor]) -> SevaConditioning:
    return SevaConditioning(
        crossattn=ref["cond.crossattn"], replace=ref["cond.replace"], concat=ref["cond.concat"],
        dense_vector=ref["cond.dense_vector"],
    )


@pytest.fixture(scope="module")
def fixture():
    ref = load_file(str(LOOP / "official_reference.safetensors"))
    draws = json.loads((LOOP / "official_draws.json").read_text())
    return ref, draws


@pytest.fixture(scope="module")
def models(fixture):
    """The fixture's tiny student (our Seva with its weights) and tiny teacher (our wrapper around its pipeline)."""
    generator = load_generator()
    student = Seva(SevaConfig.tiny(attention_resolutions=(4,)))
    student.load_state_dict(generator.seva_tiny_weights(), strict=True)
    teacher = InstructPix2PixTeacher(generator.build_teacher_pipeline())
    return generator, SevaStudent(student), teacher


@pytest.fixture(scope="module")
def scene_inputs(fixture):
    ref, draws = fixture
    config = loop_config(draws["run"])
    scene = load_scene(SCENES / draws["scene"])
    prepared = prepare_views(scene, config.method.student_image_size)
    assert draws["run"]["frame_indices"] == list(range(len(prepared)))
    crops = torch.stack([view.image for view in prepared])  # [N, 3, 576, 576] in [−1, 1]
    return config, scene, prepared, crops


def run_parity_loop(ref: dict[str, torch.Tensor], draws: dict, models, scene_inputs, config: EditConfig | None = None) -> dict:
    """Our loop on the recorded draws: every observed record, parameter fingerprints after every update,
    the final images.  ``config`` defaults to the recorded run's; the student is reset first."""
    generator, student, teacher = models
    default_config, scene, prepared, crops = scene_inputs
    config = config or default_config
    randomness = recorded_randomness(ref, config, draws["reference_frame_index"])
    reference = randomness.reference_choice(len(prepared))
    conditioning = build_student_conditioning(
        np.stack([v.c2w for v in scene.views]), np.stack([p.K_normalized for p in prepared]), reference,
        ref["inputs.z_ref"], ref["inputs.context"].reshape(-1), config.method.camera_scale,
    )
    computed_cond = conditioning.cond
    conditioning = dataclasses.replace(conditioning, cond=recorded_conditioning(ref))
    context = teacher.prepare(Edit(draws["run"]["editing_prompt"]), crops, config.teacher)
    teacher.set_cross_view_attention(config.ablation.cross_view_attention)

    iterations: list[IterationRecord] = []
    euler: list[EulerRecord] = []
    fingerprints: list[torch.Tensor] = []

    def observe(record):
        if isinstance(record, IterationRecord):
            iterations.append(record)
            fingerprints.append(generator.fingerprint(student.network.named_parameters())[1])
        else:
            euler.append(record)

    student.reset()
    run = Distillation(
        student=student, conditioning=conditioning, teacher=teacher, teacher_context=context, config=config,
        randomness=randomness, observer=observe,
    )
    initial_latent = run.latents.clone()
    try:
        estimate, log = run.run()
        images = teacher.decode(run.align(estimate))  # the Editor's final decode (output_decoder "teacher")
    finally:
        teacher.set_cross_view_attention("none")
    return dict(
        run=run, reference=reference, computed_cond=computed_cond, context=context, initial_latent=initial_latent,
        iterations=iterations, euler=euler, fingerprints=torch.stack(fingerprints), log=log, images=images,
        names=generator.fingerprint(student.network.named_parameters())[0],
    )


@pytest.fixture(scope="module")
def loop(fixture, models, scene_inputs):
    ref, draws = fixture
    return run_parity_loop(ref, draws, models, scene_inputs)


def stacked(records, name: str) -> torch.Tensor:
    return torch.stack([getattr(record, name) for record in records])


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------------------------
# Inputs: the teacher's conditioning, the student's conditioning, the seeded draws
# ---------------------------------------------------------------------------------------------


def test_teacher_source_latents_follow_the_official_image_path(fixture, models, scene_inputs):
    """Truncated uint8 crops → PIL bicubic to 512² → VaeImageProcessor → VAE mode (README §5 item 1)."""
    ref, draws = fixture
    _, _, teacher = models
    config, _, _, crops = scene_inputs
    context = teacher.prepare(Edit(draws["run"]["editing_prompt"]), crops, config.teacher)
    expected = ref["teacher.source_image_latents"]
    peak = float(expected.abs().max())
    difference = max_abs(context.image_latents, expected)
    assert difference <= 1e-5 * peak, f"source latents: max |ours − official| {difference:.3g} (peak {peak:.3g})"
    difference = max_abs(context.text_embeddings, ref["teacher.prompt_embeds"])
    assert difference <= 1e-6, f"prompt embeddings: max |ours − official| {difference:.3g}"


def test_student_conditioning_and_crops_match_the_recording(fixture, loop, scene_inputs):
    ref, draws = fixture
    _, _, _, crops = scene_inputs
    assert loop["reference"] == draws["reference_frame_index"] == 0
    layout = [loop["reference"], *range(len(crops))]
    torch.testing.assert_close(F.avg_pool2d(crops[layout], 8), ref["cond.cond_frames_pooled8"], rtol=0, atol=1e-6)
    cond = loop["computed_cond"]
    for name in ("crossattn", "replace", "concat", "dense_vector"):
        torch.testing.assert_close(getattr(cond, name), ref[f"cond.{name}"], rtol=0, atol=1e-5, msg=lambda m: f"cond.{name}: {m}")


def test_seeded_teacher_timesteps_are_the_official_draws(fixture, scene_inputs):
    """Our default stream for t is the official one (numpy default_rng(seed), truncnorm, int cast)."""
    ref, draws = fixture
    config = scene_inputs[0]
    sample = RunRandomness(config.seed, torch.device("cpu")).teacher_timestep_sampler(config)
    schedule = StudentSchedule.from_method(config.method)
    taus = [tau for tau, count in zip(schedule.taus, schedule.updates_per_tau) for _ in range(count)]
    assert schedule.taus == draws["taus"]
    assert [sample(tau) for tau in taus] == ref["iter.t"].tolist()


# ---------------------------------------------------------------------------------------------
# The loop (README §6 tolerances)
# ---------------------------------------------------------------------------------------------


def test_initial_latent_is_exact(fixture, loop):
    ref, _ = fixture
    assert torch.equal(loop["initial_latent"], ref["init_latent"])


def test_iterations_follow_the_recorded_schedule(fixture, loop):
    ref, _ = fixture
    iterations = loop["iterations"]
    assert [r.iteration for r in iterations] == list(range(9))
    assert [r.t for r in iterations] == ref["iter.t"].tolist()
    assert [r.key_view for r in iterations] == ref["iter.kappa"].tolist()
    np.testing.assert_allclose([r.lr for r in iterations], ref["iter.lr"].numpy(), rtol=1e-9, atol=0, err_msg="lr")
    assert [e["lr"] for e in loop["log"]] == [r.lr for r in iterations]


@pytest.mark.parametrize(
    "ours, theirs, atol",
    [("estimate", "iter.x0_full", 5e-3), ("aligned", "iter.x0_aligned", 5e-3), ("noisy", "iter.z_t", 5e-3),
     ("guided_noise", "iter.eps_guided", 1e-4)],
)
def test_iteration_tensors(fixture, loop, ours, theirs, atol):
    ref, _ = fixture
    values = stacked(loop["iterations"], ours)
    per_iteration = [max_abs(values[i], ref[theirs][i]) for i in range(len(values))]
    assert max(per_iteration) <= atol, f"{theirs}: max |ours − official| per iteration {['%.3g' % d for d in per_iteration]}"


@pytest.mark.parametrize("name", ["loss", "grad_norm"])
def test_iteration_scalars(fixture, loop, name):
    ref, _ = fixture
    values = torch.stack([getattr(r, name) for r in loop["iterations"]]).double()
    np.testing.assert_allclose(values.numpy(), ref[f"iter.{name}"].numpy(), rtol=2e-6, atol=0, err_msg=name)


def test_parameters_after_every_update(fixture, loop):
    ref, draws = fixture
    assert loop["names"] == draws["param_names"]
    per_iteration = [max_abs(loop["fingerprints"][i], ref["iter.param_fp"][i]) for i in range(9)]
    assert max(per_iteration) <= 5e-3, f"param_fp: max |ours − official| per iteration {['%.3g' % d for d in per_iteration]}"
    checksums = loop["fingerprints"][:, :, 0].sum(dim=1)  # Σ of all parameters (float64)
    np.testing.assert_allclose(checksums.numpy(), ref["iter.param_checksum"].numpy(), rtol=2e-6, atol=0, err_msg="param_checksum")


def test_euler_steps(fixture, loop):
    ref, _ = fixture
    euler = loop["euler"]
    assert [(e.tau, e.tau_next) for e in euler] == [(999, 599), (599, 199)]
    for name, key in (("denoised", "euler.x0"), ("latents", "euler.latent_after")):
        per_step = [max_abs(getattr(e, name), ref[key][j]) for j, e in enumerate(euler)]
        assert max(per_step) <= 5e-3, f"{key}: max |ours − official| per step {['%.3g' % d for d in per_step]}"


def test_final_images(fixture, loop):
    ref, _ = fixture
    images = loop["images"]  # [4, 3, 512, 512] in [−1, 1]
    pooled = F.avg_pool2d((images + 1) / 2, 8)
    difference = max_abs(pooled, ref["final.images_pooled8"])
    assert difference <= 3e-4, f"final.images_pooled8: max |ours − official| {difference:.3g}"
    ours = torch.stack([torch.from_numpy(to_uint8_image(image)).permute(2, 0, 1) for image in images])
    levels = int((ours.int() - ref["final.uint8"].int()).abs().max())
    assert levels <= 1, f"final.uint8: {levels} levels apart"
