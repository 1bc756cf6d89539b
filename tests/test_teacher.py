"""WanTeacher against diffusers' WanPipeline on the same tiny random weights (fp32, CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

from teachers.config import TeacherConfig
from teachers.wan import Cond, WanTeacher

PROMPTS = ["a red cat moving left", "a blue square on black background"]
NEG = "blurry noise"
SEQ = 16
SHIFT = 5.0
FRAMES, HEIGHT, WIDTH = 9, 64, 64


def make_cfg(path, **kw) -> TeacherConfig:
    base = dict(
        pretrained=str(path),
        dtype="float32",
        max_sequence_length=SEQ,
        shift=SHIFT,
        guidance_scale=4.0,
        num_inference_steps=4,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
    )
    return TeacherConfig(**{**base, **kw})


def reference(path, scheduler_cls=FlowMatchEulerDiscreteScheduler, shift_key="shift", pipeline_cls=WanPipeline):
    pipe = pipeline_cls.from_pretrained(path)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **{shift_key: SHIFT})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_latents(pipe, noise, guidance, steps=4, **kw):
    return pipe(
        prompt=PROMPTS,
        negative_prompt=NEG,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=noise,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        max_sequence_length=SEQ,
        output_type="latent",
        **kw,
    ).frames


def make_noise(teacher, batch=2, seed=0):
    shape = teacher.latent_shape(FRAMES, HEIGHT, WIDTH)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher(tiny_pipeline_dir):
    return WanTeacher.from_config(make_cfg(tiny_pipeline_dir))


@pytest.fixture(scope="module")
def ref(tiny_pipeline_dir):
    return reference(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def teacher22(tiny_two_expert_dir):
    return WanTeacher.from_config(make_cfg(tiny_two_expert_dir, guidance_scale_2=2.0))


# ---- sampling parity --------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_sample_matches_pipeline(teacher, ref, guidance):
    noise = make_noise(teacher)
    cond = teacher.encode(PROMPTS, NEG)
    out = teacher.sample(cond, noise, guidance=guidance, save_at=[0, 2, 4])
    expected = pipe_latents(ref, noise, guidance)
    assert (out.latents - expected).abs().max() <= 1e-4
    assert out.latents.abs().max() > 0.1 and not torch.allclose(out.latents, noise)
    assert out.trajectory.shape == (2, 3, *noise.shape[1:])
    assert torch.equal(out.trajectory[:, 0], noise) and torch.equal(out.trajectory[:, 2], out.latents)
    assert len(out.timesteps) == 4 and out.timesteps[0] == 1000 and len(out.sigmas) == 5


def test_sample_from_a_later_step_continues_the_full_run(teacher, ref):
    """start_step k from the full run's state before step k ends on the pipeline's latents (the Euler steps need no
    history); the sigmas returned are the schedule's from k on."""
    noise = make_noise(teacher)
    cond = teacher.encode(PROMPTS, NEG)
    full = teacher.sample(cond, noise, save_at=[2])
    part = teacher.sample(cond, full.trajectory[:, 0], start_step=2)
    assert (part.latents - pipe_latents(ref, noise, 4.0)).abs().max() <= 1e-4
    assert torch.equal(part.timesteps, full.timesteps[2:]) and torch.equal(part.sigmas, full.sigmas[2:])
    with pytest.raises(ValueError, match="start_step must be in"):
        teacher.sample(cond, noise, start_step=4)


def test_sample_uses_recipe_shift(teacher, ref):
    noise = make_noise(teacher)
    cond = teacher.encode(PROMPTS, NEG)
    a = teacher.sample(cond, noise, steps=2, shift=1.0).latents
    b = teacher.sample(cond, noise, steps=2).latents
    assert (a - b).abs().max() > 1e-3
    assert (b - pipe_latents(ref, noise, 4.0, steps=2)).abs().max() <= 1e-4


def test_unipc_scheduler_gets_flow_shift(tmp_path, tiny_pipeline_dir):
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    pipe.save_pretrained(tmp_path / "unipc")
    t = WanTeacher.from_config(make_cfg(tmp_path / "unipc"))
    assert isinstance(t.scheduler, UniPCMultistepScheduler) and t.scheduler.config.flow_shift == SHIFT
    noise = make_noise(t)
    out = t.sample(t.encode(PROMPTS, NEG), noise, steps=3)
    ref = reference(tmp_path / "unipc", UniPCMultistepScheduler, "flow_shift")
    assert (out.latents - pipe_latents(ref, noise, 4.0, steps=3)).abs().max() <= 1e-4


# ---- velocity ---------------------------------------------------------------------------------
def direct(model, x, t, embeds):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]


def test_velocity_cfg_batched_equals_unbatched_and_closed_form(teacher):
    x, t = make_noise(teacher), torch.tensor([700.0, 300.0])
    cond = teacher.encode(PROMPTS, NEG)
    unbatched = WanTeacher(teacher.pipe, dataclasses.replace(teacher.cfg, cfg_batch=False))
    v_b = teacher.velocity(x, t, cond, guidance=3.0)
    v_u = unbatched.velocity(x, t, cond, guidance=3.0)
    assert (v_b - v_u).abs().max() <= 1e-5
    model = teacher.pipe.transformer
    vc, vu = direct(model, x, t, cond.prompt_embeds), direct(model, x, t, cond.negative_embeds)
    assert torch.allclose(v_b, vu + 3.0 * (vc - vu), atol=1e-5)
    assert (v_b - vc).abs().max() > 1e-3  # guidance did something
    # w == 1 or no negatives: the conditional branch only
    assert torch.allclose(teacher.velocity(x, t, cond, guidance=1.0), vc, atol=1e-6)
    assert torch.allclose(teacher.velocity(x, t, Cond(prompt_embeds=cond.prompt_embeds)), vc, atol=1e-6)


def test_velocity_per_frame_timesteps(teacher):
    x = make_noise(teacher)
    cond = teacher.encode(PROMPTS, NEG)
    t = torch.tensor([600.0, 250.0])
    frames = x.shape[2]
    v = teacher.velocity(x, t, cond)
    v_frames = teacher.velocity(x, t[:, None].expand(-1, frames), cond)
    assert (v - v_frames).abs().max() <= 1e-4
    mixed = t[:, None].repeat(1, frames)
    mixed[:, 0] = 10.0  # a clean context frame, later frames noisier (diffusion forcing)
    v_mixed = teacher.velocity(x, mixed, cond)
    assert (v_mixed - v).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"\[B, F\]"):
        teacher.velocity(x, torch.full((2, frames + 1), 500.0), cond)


def test_velocity_per_frame_timesteps_reach_their_frames():
    """With no transformer blocks every token is processed alone, so frame f must see exactly t[:, f]."""
    from teachers.tiny import tiny_pipeline, words_of

    local = WanTeacher(tiny_pipeline(words_of(PROMPTS), num_layers=0), make_cfg("unused"))
    x = make_noise(local)
    cond = local.encode(PROMPTS)
    per_frame = torch.tensor([[100.0, 400.0, 700.0], [900.0, 50.0, 500.0]])
    v = local.velocity(x, per_frame, cond)
    for f in range(x.shape[2]):
        uniform = local.velocity(x, per_frame[:, f], cond)
        assert (v[:, :, f] - uniform[:, :, f]).abs().max() <= 1e-5
        assert (v[:, :, f] - local.velocity(x, per_frame[:, f - 1], cond)[:, :, f]).abs().max() > 1e-3


def test_two_expert_boundary(teacher22):
    pipe = teacher22.pipe
    assert teacher22.boundary == pytest.approx(875.0)
    assert teacher22.transformer_for(900.0) is pipe.transformer
    assert teacher22.transformer_for(875.0) is pipe.transformer
    assert teacher22.transformer_for(874.0) is pipe.transformer_2
    x = make_noise(teacher22)
    cond = teacher22.encode(PROMPTS)
    for t, model, other in (
        (900.0, pipe.transformer, pipe.transformer_2),
        (800.0, pipe.transformer_2, pipe.transformer),
    ):
        tt = torch.full((2,), t)
        v = teacher22.velocity(x, tt, cond)
        assert torch.allclose(v, direct(model, x, tt, cond.prompt_embeds), atol=1e-6)
        assert (v - direct(other, x, tt, cond.prompt_embeds)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="boundary"):
        teacher22.velocity(x, torch.tensor([900.0, 800.0]), cond)


def test_two_expert_guidance_2(teacher22):
    x, t = make_noise(teacher22), torch.full((2,), 500.0)
    cond = teacher22.encode(PROMPTS, NEG)
    m = teacher22.pipe.transformer_2
    vc, vu = direct(m, x, t, cond.prompt_embeds), direct(m, x, t, cond.negative_embeds)
    # low-noise expert: teacher.guidance_scale_2 (2.0) by default, an explicit guidance_2 wins
    assert torch.allclose(teacher22.velocity(x, t, cond), vu + 2.0 * (vc - vu), atol=1e-5)
    assert torch.allclose(teacher22.velocity(x, t, cond, guidance_2=6.0), vu + 6.0 * (vc - vu), atol=1e-5)


def test_two_expert_sample_matches_pipeline(teacher22, tiny_two_expert_dir):
    ref = reference(tiny_two_expert_dir)
    noise = make_noise(teacher22)
    cond = teacher22.encode(PROMPTS, NEG)
    out = teacher22.sample(cond, noise, guidance=4.0, guidance_2=2.0)
    ts = out.timesteps
    assert (ts >= 875).any() and (ts < 875).any()  # both experts are used
    expected = pipe_latents(ref, noise, 4.0, guidance_scale_2=2.0)
    assert (out.latents - expected).abs().max() <= 1e-4
    # guidance_scale_2 matters: the default (teacher.guidance_scale_2 = 2.0) gives the same, 4.0 differs
    assert (teacher22.sample(cond, noise).latents - expected).abs().max() <= 1e-4
    assert (pipe_latents(ref, noise, 4.0) - expected).abs().max() > 1e-3


# ---- text -------------------------------------------------------------------------------------
def test_encode_cache_and_semantics(tiny_pipeline_dir, ref):
    teacher = WanTeacher.from_config(make_cfg(tiny_pipeline_dir))
    calls = []
    teacher.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    cond = teacher.encode(PROMPTS, NEG)
    assert len(calls) == 1  # the two prompts and the negative in one batch
    expected, expected_neg = ref.encode_prompt(PROMPTS, [NEG, NEG], max_sequence_length=SEQ)
    assert torch.allclose(cond.prompt_embeds, expected, atol=1e-6)
    assert torch.allclose(cond.negative_embeds, expected_neg, atol=1e-6)
    again = teacher.encode([PROMPTS[1], PROMPTS[0], PROMPTS[1]], NEG)
    assert len(calls) == 1
    assert torch.equal(again.prompt_embeds[1], cond.prompt_embeds[0])
    assert teacher.encode(PROMPTS).negative_embeds is None
    assert cond.prompt_embeds.shape == (2, SEQ, 32)


def test_cond_helpers(teacher):
    cond = teacher.encode(PROMPTS, NEG)
    one = cond[1]
    assert len(one) == 1 and torch.equal(one.prompt_embeds[0], cond.prompt_embeds[1])
    both = Cond.cat([cond.index(0), one])
    assert torch.equal(both.prompt_embeds, cond.prompt_embeds)
    assert torch.equal(both.negative_embeds, cond.negative_embeds)
    assert both.to(dtype=torch.float64).negative_embeds.dtype == torch.float64
    with pytest.raises(ValueError, match="negative"):
        Cond.cat([cond, Cond(prompt_embeds=cond.prompt_embeds)])


# ---- frozen -----------------------------------------------------------------------------------
def test_frozen_and_no_grad(teacher):
    for name, comp in teacher.pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            assert not comp.training, name
            assert all(not p.requires_grad for p in comp.parameters()), name
    x = make_noise(teacher).requires_grad_(True)
    with torch.enable_grad():
        cond = teacher.encode(PROMPTS, NEG)
        v = teacher.velocity(x, torch.full((2,), 500.0), cond)
        out = teacher.sample(cond, x, steps=1, save_at=[0])
        video = teacher.decode(x[:1])
    for tensor in (cond.prompt_embeds, v, out.latents, out.trajectory, video):
        assert tensor.grad_fn is None and not tensor.requires_grad


# ---- pixels -----------------------------------------------------------------------------------
def test_decode_matches_pipeline(teacher, ref):
    noise = make_noise(teacher, batch=1)
    cond = teacher.encode(PROMPTS[:1], NEG)
    latents = teacher.sample(cond, noise, steps=2).latents
    video = teacher.decode(latents)
    assert video.shape == (1, 3, FRAMES, HEIGHT, WIDTH) and video.min() >= -1 and video.max() <= 1
    frames = ref(
        prompt=PROMPTS[:1],
        negative_prompt=NEG,
        num_inference_steps=2,
        guidance_scale=4.0,
        latents=noise,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        max_sequence_length=SEQ,
        output_type="pt",
    ).frames
    # the pipeline's "pt" output is [B, F, 3, H, W] in [0, 1]
    assert (frames - (video / 2 + 0.5).permute(0, 2, 1, 3, 4)).abs().max() <= 1e-4
    u8 = teacher.to_uint8(video)
    assert u8.dtype == np.uint8 and u8.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    assert np.array_equal(u8[0, 3, 5, 7], ((video[0, :, 3, 5, 7] + 1) * 127.5).round().byte().numpy())


def test_encode_video_inverts_decode_on_identity_vae(tmp_path):
    from teachers.toyworld.pipeline import build_toy_pipeline, save_toy_pipeline

    kwargs = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        ffn_dim=16,
        num_layers=1,
        freq_dim=16,
        rope_max_seq_len=32,
    )
    save_toy_pipeline(build_toy_pipeline(["red", "cat"], transformer_kwargs=kwargs, latents_std=0.5), tmp_path)
    t = WanTeacher.from_config(TeacherConfig(pretrained=str(tmp_path), dtype="float32"))
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = t.encode_video(video)
    assert torch.allclose(latents, video / 0.5, atol=1e-4)  # (x - mean) / std with mean 0, std 0.5
    assert torch.allclose(t.decode(latents), video, atol=1e-4)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        t.encode_video(video[:, :, :4])


def test_latent_shape(teacher):
    assert teacher.latent_shape(9, 64, 32) == (4, 3, 8, 4)
    with pytest.raises(ValueError, match="1 \\+ 4"):
        teacher.latent_shape(8, 64, 64)


# ---- loading errors ---------------------------------------------------------------------------
def test_missing_model_index(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json.*Wan-AI/Wan2.1-T2V-1.3B-Diffusers") as e:
        WanTeacher.from_config(TeacherConfig(pretrained=str(tmp_path)))
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize(
    "lever, match",
    [
        ({"offload": "model"}, "teacher.offload"),
        ({"offload": "group"}, "teacher.offload"),
        ({"quantize": "int8"}, "teacher.quantize.*gpu"),
        ({"quantize": "nf4"}, "teacher.quantize.*gpu"),
    ],
)
def test_memory_levers_need_an_accelerator(tiny_pipeline_dir, lever, match):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    with pytest.raises(ValueError, match=match):
        WanTeacher.from_config(make_cfg(tiny_pipeline_dir, **lever), device="cpu")


def test_guidance_scale_2_needs_two_experts(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="teacher.guidance_scale_2"):
        WanTeacher.from_config(make_cfg(tiny_pipeline_dir, guidance_scale_2=2.0))


def test_teacher_ignores_a_lora_student_sharing_its_transformer(tiny_pipeline_dir):
    """LCM-LoRA trick: the student's adapter lives in the teacher's module; the teacher answers without it."""
    from students.config import StudentConfig
    from students.student import build_student

    teacher = WanTeacher.from_config(TeacherConfig(pretrained=str(tiny_pipeline_dir), dtype="float32"))
    cond = teacher.encode(["a red cat"], "blurry")
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    before = teacher.velocity(x, t, cond, guidance=3.0)
    student = build_student(StudentConfig(name="s", kind="lora", lora_rank=4), teacher.pipe.transformer)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.5)  # make the adapter matter
        v_student = student(x, t, cond.prompt_embeds)
    assert torch.equal(teacher.velocity(x, t, cond, guidance=3.0), before)
    with torch.no_grad():
        v_base = teacher.velocity(x, t, cond, guidance=1.0)
    assert (v_student - v_base).abs().max() > 1e-3  # the student itself does use the adapter


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "teacher.num_frames=10",
            r"teacher.num_frames: gives 10 latent frames, not a multiple of the transformer's patch 3",
        ),
        (
            "teacher.height=30",
            r"teacher.height: gives 30 latent px, not a multiple of the transformer's "
            r"patch 4",
        ),
        (
            "teacher.num_frames=7",
            r"teacher.num_frames: gives 7 latent frames, not a multiple of the transformer's patch 3",
        ),
    ],
)
def test_a_shape_the_teacher_cannot_take_fails_before_any_weights_load(override, message, monkeypatch):
    """The toy teacher (VAE factors 1/1, patch (3, 4, 4)): a wrong frame count or side is one line naming the key,
    raised from the folder's config.json before diffusers loads a single weight."""
    from diffusers import AutoencoderKLWan

    from distill.config import load_recipe
    from teachers.wan import WanTeacher

    monkeypatch.setattr(AutoencoderKLWan, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    recipe = load_recipe("recipes/toyworld.yaml", [override])
    with pytest.raises(ValueError, match=message):
        WanTeacher.from_config(recipe.teacher, "cpu")


def test_check_video_shape_by_hand():
    """Wan2.1's VAE (4x time, 8x space) and patch (1, 2, 2): 81 frames of 480x832 fit; 80 frames and 470 px don't."""
    from teachers.config import TeacherConfig
    from teachers.wan import check_video_shape

    vae, tr = {"scale_factor_temporal": 4, "scale_factor_spatial": 8}, [{"patch_size": [1, 2, 2]}]
    check_video_shape(TeacherConfig(pretrained="x", num_frames=81, height=480, width=832), vae, tr)
    with pytest.raises(
        ValueError,
        match=r"teacher.num_frames: 80 does not fit the VAE, which needs 1 \+ 4·k frames; "
        r"use 77 or 81",
    ):
        check_video_shape(TeacherConfig(pretrained="x", num_frames=80, height=480, width=832), vae, tr)
    with pytest.raises(ValueError, match=r"teacher.height: 470 px is not a multiple of the VAE's 8; use 464 or 472"):
        check_video_shape(TeacherConfig(pretrained="x", num_frames=81, height=470, width=832), vae, tr)
    with pytest.raises(
        ValueError,
        match=r"teacher.width: gives 101 latent px, not a multiple of the transformer's "
        r"patch 2",
    ):
        check_video_shape(TeacherConfig(pretrained="x", num_frames=81, height=480, width=808), vae, tr)
