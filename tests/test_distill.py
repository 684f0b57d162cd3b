"""The I-Mix2Mix loop on tiny random models: config, SDS surrogate, Tweedie, clipping, reset, ablations."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SCENES

from imix2mix.attention import ExtendedAttnProcessor, RandomCrossViewAttnProcessor
from imix2mix.accel import ExecutionPlan, LoopNeeds
from imix2mix.config import EditConfig
from imix2mix.edits import Edit
from imix2mix.modes.distill import Distillation, LearnedAlignment, sds_surrogate_loss
from imix2mix.randomness import RunRandomness
from imix2mix.students import SevaStudent
from imix2mix.config import MethodConfig
from imix2mix.errors import ConfigError
from imix2mix.presets import TeacherArchitecture, build_random_teacher_pipeline
from imix2mix.schedules import LearningRateSchedule, StudentSchedule, TauMatchedTimesteps, TruncatedNormalTimesteps, UniformTimesteps
from imix2mix.scene import load_scene
from imix2mix.seva import Seva, SevaConfig
from imix2mix.seva.camera import build_student_conditioning
from imix2mix.seva.schedule import SevaDenoiser, SevaSchedule
from imix2mix.preprocess import prepare_views
from imix2mix.teachers.ip2p import InstructPix2PixTeacher

# ---------------------------------------------------------------------------------------------
# EditConfig
# ---------------------------------------------------------------------------------------------


def test_defaults_equal_method_md():
    """Expected values typed from METHOD.md §1.1–§1.7, §2, §8.2 (not from the code)."""
    expected = dict(
        seed=42, text_cfg=7.5, image_cfg=1.5, reference_index=None, teacher_steps=100, t_max=999, t_min=25,
        distill_dt=25, k=50, k_initial=200, lr=1e-4, final_lr=5e-5, min_lr=1e-9, warmup_steps=200,
        weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, grad_clip=0.5, teacher_t_upper=950,
        teacher_t_shape_factor=0.5, camera_scale=2.0, student_image_size=576, teacher_image_size=512,
        output_decoder="teacher", teacher_t_schedule="truncnorm", cross_view_attention="rcv",
        reference_edit="edited", alignment="bilinear", student_query_steps=1, mode="distill", sds_weight=1.0,
        gradient_checkpointing=False, compile=False,
    )
    config = EditConfig()
    assert {key: config.setting(key) for key in expected} == expected
    assert config.total_iterations == 2150
    assert len(StudentSchedule.from_method(config.method).taus) == 40
    assert LearningRateSchedule.from_method(config.method).decay_steps == 1800


def test_overridden_parses_strings_and_validates():
    config = EditConfig().overridden(
        {"k": "7", "lr": "2e-4", "compile": "true", "reference_index": "2", "betas": "0.8,0.99", "alignment": "learned"}
    )
    assert (config.method.k, config.method.lr, config.acceleration.compile, config.reference_index, config.method.betas,
            config.ablation.alignment) == (7, 2e-4, True, 2, (0.8, 0.99), "learned")
    assert config.overridden({"reference_index": "none"}).reference_index is None
    assert EditConfig().overridden({"lr": 3}).method.lr == 3.0
    assert EditConfig().overridden({"method.k": "9"}).method.k == 9  # dotted paths name the same settings
    with pytest.raises(ConfigError, match="unknown setting 'iterations'"):
        EditConfig().overridden({"iterations": 5})
    with pytest.raises(ConfigError, match="'k' expects an integer"):
        EditConfig().overridden({"k": "many"})
    with pytest.raises(ConfigError, match="alignment"):
        EditConfig().overridden({"alignment": "nearest"})
    with pytest.raises(ConfigError, match="true or false"):
        EditConfig().overridden({"compile": "maybe"})
    with pytest.raises(ConfigError, match="k must be"):
        EditConfig().overridden({"k": 0})
    with pytest.raises(ConfigError, match="an integer"):
        EditConfig().overridden({"seed": True})
    for key, value in (("lr", "nan"), ("text_cfg", "inf"), ("lr", float("nan")), ("grad_clip", "-inf")):
        with pytest.raises(ConfigError, match=f"'{key}' expects a finite number"):
            EditConfig().overridden({key: value})
    with pytest.raises(ConfigError, match="seed must be ≥ 0"):
        EditConfig().overridden({"seed": "-1"})
    with pytest.raises(ConfigError, match="finite"):
        EditConfig(method=MethodConfig(lr=float("inf")))


def test_config_round_trips_through_its_dict():
    config = EditConfig().overridden({"k": 3, "cross_view_attention": "none", "cuda_graphs": False, "teacher_id": "/w/ip2p"})
    assert EditConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["method"]["k"] == 3 and config.to_dict()["teacher"]["model_id"] == "/w/ip2p"


def test_registries_and_their_torch_free_name_lists_agree():
    from imix2mix.config import MODE_NAMES, TEACHER_NAMES
    from imix2mix.modes import mode_names
    from imix2mix.teachers import teacher_names

    assert sorted(MODE_NAMES) == sorted(mode_names())
    assert sorted(TEACHER_NAMES) == sorted(teacher_names())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lr": "nan"}, "'lr' expects a finite number, got 'nan'"),
    ({"text_cfg": "inf"}, "'text_cfg' expects a finite number"),
    ({"image_cfg": float("-inf")}, "'image_cfg' expects a finite number"),
    ({"lr": float("nan")}, "'lr' expects a finite number, got nan"),
    ({"betas": "0.9,nan"}, "'betas' expects a finite number"),
    ({"seed": "-1"}, "seed must be ≥ 0 \\(got -1\\)"),
])
def test_non_finite_and_out_of_range_settings_are_refused_when_parsed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        EditConfig().overridden(overrides)


def test_a_config_built_directly_refuses_non_finite_numbers():
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        EditConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match="betas must be a finite number"):
        EditConfig(betas=(0.9, float("nan")))


def test_config_hash_is_stable_and_tracks_results_only():
    base = EditConfig()
    assert base.config_hash() == EditConfig().config_hash()
    assert len(base.config_hash()) == 64
    assert base.overridden({"seed": 1}).config_hash() != base.config_hash()
    assert base.overridden({"cross_view_attention": "none"}).config_hash() != base.config_hash()
    assert base.overridden({"log_every": 1, "time_phases": True}).config_hash() == base.config_hash()
    # every acceleration option is outside the identity by construction, gradient checkpointing included
    result_preserving = {"cuda_graphs": False, "offload_after_use": True, "gradient_checkpointing": True,
                         "channels_last": False, "bf16_weight_copies": False, "compile": True}
    assert base.overridden(result_preserving).config_hash() == base.config_hash()
    assert base.overridden({"optimizer": "adamw_bf16_states"}).config_hash() != base.config_hash()  # changes numerics
    assert base.to_dict()["method"]["betas"] == [0.9, 0.999]


def _plan(overrides: dict | None = None, device: str = "cuda", query_steps: int = 1) -> ExecutionPlan:
    config = EditConfig().overridden(overrides or {})
    return ExecutionPlan.resolve(config, torch.device(device), LoopNeeds(trains_student=True, student_calls_per_step=query_steps))


def test_cuda_graphs_replay_the_student_only_where_a_capture_is_valid():
    assert _plan().graph_student and _plan().graph_teacher
    assert not _plan(device="cpu").graph_student
    for overrides in ({"cuda_graphs": False}, {"compile": True}, {"gradient_checkpointing": True}):
        assert not _plan(overrides).graph_student, overrides
    assert not _plan(query_steps=3).graph_student
    assert _plan(query_steps=3).graph_teacher
    assert not _plan({"compile": True}).graph_teacher


def test_compiled_code_replays_as_inductor_graphs_only_with_cuda_graphs_on_cuda():
    """With compile, our own capture is off and inductor's CUDA graphs ("reduce-overhead") take over."""
    assert _plan({"compile": True}).inductor_graphs
    assert _plan({"compile": True}, device="cpu").compile_mode == "default"
    assert not _plan({"compile": True, "cuda_graphs": False}).inductor_graphs
    assert _plan().compile_mode is None  # the default: our capture, eager kernels
    # a mode that trains nothing is never compiled
    config = EditConfig().overridden({"compile": True})
    assert ExecutionPlan.resolve(config, torch.device("cuda"), LoopNeeds(trains_student=False)).compile_mode is None


def test_edit_values_override_the_config():
    config = EditConfig().for_edit(Edit("turn him into a knight", text_cfg=6.0, seed=7))
    assert (config.teacher.text_cfg, config.teacher.image_cfg, config.seed) == (6.0, 1.5, 7)
    with pytest.raises(ConfigError):
        Edit("  ")


# ---------------------------------------------------------------------------------------------
# Pieces of one iteration
# ---------------------------------------------------------------------------------------------


def test_sds_surrogate_gradient_is_the_noise_residual_over_numel():
    estimate = torch.randn(2, 4, 3, 3, requires_grad=True)
    guided, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    guided[0, 0, 0, 0] = float("nan")
    sds_surrogate_loss(estimate, guided, noise).backward()
    expected = torch.nan_to_num(guided - noise, nan=0.0) / estimate.numel()
    torch.testing.assert_close(estimate.grad, expected)
    assert estimate.grad[0, 0, 0, 0] == 0


def test_learned_alignment_starts_as_bilinear():
    align = LearnedAlignment(size=6)
    latents = torch.randn(3, 4, 8, 8)
    bilinear = F.interpolate(latents, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(align(latents), bilinear)
    assert sum(p.numel() for p in align.parameters()) == 4 * 4 * 25 + 4


def test_reference_choice_matches_python_random():
    import random

    random.seed(42)
    official = random.choice([0, 1, 2, 3])
    assert RunRandomness(42, torch.device("cpu")).reference_choice(4) == official


# ---------------------------------------------------------------------------------------------
# The loop on tiny models (student image 64 → latent 8, teacher image 32 → latent 4)
# ---------------------------------------------------------------------------------------------

SHORT = dict(student_image_size=64, teacher_image_size=32, t_max=999, t_min=25, distill_dt=325, k=2, k_initial=3,
             warmup_steps=2, teacher_steps=2, log_every=1)


@pytest.fixture(scope="module")
def models():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        student = Seva(SevaConfig.tiny())
    teacher = InstructPix2PixTeacher(build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=0))
    scene = load_scene(SCENES / "face")
    return student, teacher, scene


def make_distillation(models, **overrides) -> Distillation:
    student, teacher, scene = models
    config = EditConfig().overridden({**SHORT, **overrides})
    prepared = prepare_views(scene, config.method.student_image_size)
    originals = torch.stack([p.image for p in prepared])
    generator = torch.Generator().manual_seed(5)
    z_ref = torch.randn(1, 4, 8, 8, generator=generator)
    embedding = torch.randn(32, generator=generator)
    conditioning = build_student_conditioning(
        np.stack([v.c2w for v in scene.views]), np.stack([p.K_normalized for p in prepared]), 1, z_ref, embedding
    )
    student.requires_grad_(True)
    teacher.set_cross_view_attention(config.ablation.cross_view_attention)
    return Distillation(
        student=SevaStudent(student), conditioning=conditioning, teacher=teacher,
        teacher_context=teacher.prepare(Edit("make it snowy"), originals, config.teacher), config=config,
        randomness=RunRandomness(config.seed, torch.device("cpu")),
    )


@pytest.fixture()
def pristine(models):
    student = models[0]
    state = {k: v.clone() for k, v in student.state_dict().items()}
    yield
    with torch.no_grad():
        for k, v in student.state_dict().items():
            v.copy_(state[k])
    models[1].set_cross_view_attention("none")


def test_tweedie_estimate_is_latent_minus_sigma_times_eps(models, pristine):
    run = make_distillation(models)
    tau = run.tau
    sigma = run.denoiser.schedule.sigmas[tau]
    with torch.no_grad():
        estimate = run.student_estimate(run.latents, tau)
        replaced = run.latents.clone()
        replaced[0] = run.cond.replace[0, :4]  # the clean reference latent in slot 0
        net_in = torch.cat([replaced / (sigma**2 + 1) ** 0.5, run.cond.concat], dim=1)
        eps = models[0](net_in, torch.full((run.num_frames,), tau), run.cond.crossattn, run.cond.dense_vector, num_frames=run.num_frames)
    torch.testing.assert_close(estimate, replaced - sigma * eps, rtol=1e-4, atol=1e-3)  # |x| ~ σ ≈ 85


def test_initial_latent_has_sigma_max_scale(models, pristine):
    run = make_distillation(models)
    sigma_max = float(SevaSchedule().sigmas[999])
    assert run.latents.shape == (5, 4, 8, 8)
    assert run.latents.std().item() == pytest.approx((1 + sigma_max**2) ** 0.5, rel=0.15)


def test_step_clips_the_gradient_and_updates_the_student(models, pristine):
    run = make_distillation(models, warmup_steps=0, lr=1e-3, final_lr=1e-3)
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    outcome = run.step()
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.trainable_parameters if p.grad is not None]))
    assert outcome.grad_norm.item() > 0.5  # σ_τ ≈ 85 makes the raw gradient large …
    assert total.item() <= 0.5 + 1e-5  # … and the clip brings it to 0.5
    changed = [k for k, v in models[0].state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert outcome.t == 950 and outcome.tau == 999  # τ ≥ 950 → t = 950
    assert 0 <= outcome.key_view < 4


def test_run_follows_the_schedule(models, pristine):
    run = make_distillation(models)
    events = []
    estimate, log = run.run(events.append)
    taus = [e.tau for e in events]
    assert run.taus == [999, 674, 349, 25]
    assert taus == [999] * 3 + [674] * 2 + [349] * 2 + [25] * 2
    assert [e.iteration for e in events] == list(range(1, 10)) and events[-1].total == 9
    assert all(e.loss is not None for e in events) and len(log) == 9
    assert [e.lr for e in events][:3] == pytest.approx([1e-9, 1e-9 + (1e-4 - 1e-9) / 2, 1e-4])
    for event in events:
        assert event.tau <= event.t <= 949 or (event.tau >= 950 and event.t == 950)
    assert estimate.shape == (4, 4, 8, 8)
    assert run.tau == 25 and not run.advance()  # no step after the last τ


def test_same_seed_same_run(models, pristine):
    student = models[0]
    state = {k: v.clone() for k, v in student.state_dict().items()}
    first, _ = make_distillation(models).run()
    with torch.no_grad():
        for k, v in student.state_dict().items():
            v.copy_(state[k])
    second, _ = make_distillation(models).run()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# -- ablation switches: each changes its own piece and leaves the random streams alone -----------


def test_teacher_t_schedule_switch(models, pristine):
    kinds = {"truncnorm": TruncatedNormalTimesteps, "uniform": UniformTimesteps, "tau_matched": TauMatchedTimesteps}
    for name, kind in kinds.items():
        run = make_distillation(models, teacher_t_schedule=name)
        assert isinstance(run.sample_t, kind)
    matched = make_distillation(models, teacher_t_schedule="tau_matched")
    matched.tau_position = 2
    assert matched.step().t == 349


def test_cross_view_attention_switch_changes_only_the_teacher(models, pristine):
    teacher = models[1]
    results = {}
    for mode, processor in (("rcv", RandomCrossViewAttnProcessor), ("extended", ExtendedAttnProcessor), ("none", None)):
        run = make_distillation(models, cross_view_attention=mode)
        self_attention = [p for n, p in teacher.unet.attn_processors.items() if n.endswith("attn1.processor")]
        assert all(type(p) is processor for p in self_attention) if processor else all(
            type(p).__name__ == "AttnProcessor2_0" for p in self_attention)
        with torch.no_grad():
            aligned = run.align(run.student_estimate(run.latents, run.tau)[1:])
        noisy = teacher.add_noise(aligned, 500, torch.zeros_like(aligned))
        results[mode] = teacher.predict_noise(noisy, 500, run.teacher_context, key_view=2)
        run.step()
        results[mode + "_draws"] = (run.teacher_timesteps, run.key_views)
    assert not torch.allclose(results["rcv"], results["none"], atol=1e-5)
    assert not torch.allclose(results["extended"], results["none"], atol=1e-5)
    assert results["rcv_draws"] == results["none_draws"] == results["extended_draws"]


def test_alignment_switch(models, pristine):
    bilinear = make_distillation(models)
    learned = make_distillation(models, alignment="learned")
    assert len(learned.trainable_parameters) == len(bilinear.trainable_parameters) + 2  # conv weight and bias join the AdamW
    assert learned.optimizer.param_groups[0]["params"][-1] is learned.alignment.conv.bias
    x = torch.randn(4, 4, 8, 8)
    torch.testing.assert_close(learned.align(x), bilinear.align(x))
    assert bilinear.align(x).shape == (4, 4, 4, 4)


def test_student_query_steps_switch(models, pristine):
    one = make_distillation(models)
    three = make_distillation(models, student_query_steps=3)
    with torch.no_grad():
        tweedie = one.student_estimate(one.latents, 674)
        trajectory = three.student_estimate(three.latents, 674)
        # by hand: σ at indices 674, 449, 224, then 0
        sig = SevaSchedule().sigmas
        x = three.latents
        for i, j in ((674, 449), (449, 224)):
            d = three.denoiser(x, sig[i], three.cond, 5)
            x = x + (sig[j] - sig[i]) * (x - d) / sig[i]
        expected = three.denoiser(x, sig[224], three.cond, 5)
    torch.testing.assert_close(trajectory, expected)
    assert not torch.allclose(tweedie, trajectory)


@pytest.mark.parametrize("name, flags", [("adamw", {}), ("adamw_foreach", {"foreach": True}), ("adamw_fused", {"fused": True})])
def test_optimizer_variants(models, pristine, name, flags):
    run = make_distillation(models, optimizer=name, weight_decay=0.02, betas=(0.8, 0.95), eps=1e-7)
    group = run.optimizer.param_groups[0]
    assert isinstance(run.optimizer, torch.optim.AdamW)
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.02, (0.8, 0.95), 1e-7)
    for key, value in flags.items():
        assert group[key] is value
    assert torch.isfinite(run.step().loss)
