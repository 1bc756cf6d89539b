"""Self-Forcing: the causal self-rollout (exit steps shared by every rank, gradients through each chunk's exit step
only), frame-wise timesteps, and trainer runs (resume to identical weights; 2 processes = 1 process × 2 batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_trainer import CAPTIONS as DATASET_CAPTIONS
from test_trainer import free_port, max_diff, run_train, weights, write_dataset, write_recipe

from core.flow import add_noise, shift_sigma, x0_from_velocity
from core.recipe_loader import PROJECT_ROOT, RecipeError
from core.seeding import derive_seed, randn_per_sample, sample_generator
from distill.batch import Batch
from distill.config import load_recipe
from distill.dmd import dmd_generator_loss
from distill.flow_matching import flow_matching_loss
from distill.ode_regression import ODERegression
from distill.self_forcing import (
    CausalRollout,
    PerTokenTimesteps,
    SelfForcing,
    draw_exit_steps,
    draw_given_first_chunk,
    draw_window_end,
    per_token_timesteps,
)
from students.causal import sample_causal
from students.config import StudentConfig
from students.student import build_student
from teachers.config import TeacherConfig
from teachers.wan import WanTeacher

SHAPE = (4, 2, 2, 2)  # latents [C, F, H, W]: 5 frames of 16x16 px through the tiny VAE; 2 chunks of 1 frame
SIGMAS = [1.0, 0.75, 0.4]
CAPTIONS = ["a red cat moving left", "a blue square on white background", "a green dog", "a white circle"]


@pytest.fixture(scope="module")
def teacher(tiny_pipeline_dir):
    cfg = TeacherConfig(
        pretrained=str(tiny_pipeline_dir),
        dtype="float32",
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=4,
        guidance_scale=3.0,
        max_sequence_length=8,
        negative_prompt="blurry",
    )
    return WanTeacher.from_config(cfg, "cpu")


@pytest.fixture(scope="module")
def student(teacher):
    torch.manual_seed(0)
    s = build_student(
        StudentConfig(name="c", kind="causal", frames_per_block=1, context_noise=100, denoising_steps=[1000, 750, 400]),
        teacher.pipe.transformer,
    )
    with torch.no_grad():  # move off the teacher so the real and fake scores differ from the student
        for p in s.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return s


def make_batch(teacher, indices=(0, 1)) -> Batch:
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in indices]
    return Batch(
        x0=None,
        latent_shape=SHAPE,
        cond=teacher.encode(captions, "blurry noise"),
        generators=[sample_generator(0, i) for i in indices],
        indices=list(indices),
        captions=captions,
    )


def rollout_of(student, samples_per_step=4, **kw) -> CausalRollout:
    return CausalRollout(student.causal, SIGMAS, seed=0, samples_per_step=samples_per_step, **kw)


# ---- the exit steps -----------------------------------------------------------------------------------------
def test_exit_steps_depend_on_the_trainer_step_only(teacher, student):
    draws = [draw_exit_steps(0, s, 2, 3) for s in range(20)]
    assert draws[3] == draw_exit_steps(0, 3, 2, 3) and all(0 <= k < 3 for d in draws for k in d)
    assert len({tuple(d) for d in draws}) > 3 and draws != [draw_exit_steps(1, s, 2, 3) for s in range(20)]
    assert draw_exit_steps(0, 5, 3, 4, last_only=True) == [3, 3, 3]
    shared = [draw_exit_steps(0, s, 3, 4, same_across_chunks=True) for s in range(20)]
    assert all(d == [d[0]] * 3 for d in shared) and len({d[0] for d in shared}) == 4  # one draw, every chunk
    assert [d[0] for d in shared] == [draw_exit_steps(0, s, 3, 4)[0] for s in range(20)]
    # G = 4 samples per step: indices [0, 1] and [2, 3] are two ranks (or micro-batches) of step 0; [4, 5] is step 1
    rollout = rollout_of(student)
    seen = []
    with torch.no_grad():
        for indices in ((0, 1), (2, 3), (4, 5)):
            rollout(make_batch(teacher, indices))
            seen.append(rollout.last_exit_steps)
    assert seen[0] == seen[1] == draw_exit_steps(0, 0, 2, 3) and seen[2] == draw_exit_steps(0, 1, 2, 3)


def test_last_exit_rollout_is_the_inference_sampler(teacher, student):
    """Exit at the last step everywhere = `sample_causal` at inference on the sample's own noise and generator."""
    batch = make_batch(teacher)
    with torch.no_grad():
        out = rollout_of(student, last_only=True)(batch)
        gens = [sample_generator(0, i) for i in (0, 1)]
        noise = randn_per_sample(gens, SHAPE, "cpu")
        want = sample_causal(student.causal, batch.cond.prompt_embeds, noise, SIGMAS, generator=gens)
    assert torch.equal(out, want) and out.shape == (2, *SHAPE)
    # and the per-sample draws make it independent of the batch split
    with torch.no_grad():
        alone = rollout_of(student, last_only=True)(make_batch(teacher, (1,)))
    torch.testing.assert_close(alone[0], out[1], atol=1e-5, rtol=1e-5)


def test_gradients_flow_only_through_each_chunks_exit_step(teacher, student):
    causal = student.causal
    calls, real = [], causal.forward_chunk

    def spy(x, t, cache, frame_offset, update_cache):
        calls.append((frame_offset, round(float(t.flatten()[0])), torch.is_grad_enabled(), update_cache))
        return real(x, t, cache, frame_offset, update_cache)

    causal.forward_chunk = spy
    batch = make_batch(teacher)
    gens = [sample_generator(0, i) for i in (0, 1)]
    noise = randn_per_sample(gens, SHAPE, "cpu").requires_grad_(True)
    out = sample_causal(causal, batch.cond.prompt_embeds, noise, SIGMAS, generator=gens, exit_steps=[0, 2])
    (t0, t1, t2), ctx = [round(1000 * s) for s in SIGMAS], 100
    # chunk 0 exits at step 0 (its one forward keeps the graph); chunk 1 runs 2 forwards without grad, then its
    # exit step with grad; every cache write (at t = context_noise) without grad, and none after the last chunk
    assert calls == [
        (0, t0, True, False),
        (0, ctx, False, True),
        (1, t0, False, False),
        (1, t1, False, False),
        (1, t2, True, False),
    ]
    assert out.requires_grad
    out.sum().backward()
    # x at step 0 is the noise itself: chunk 0 (exit 0) passes gradient to its noise; chunk 1 reached its exit step
    # through no-grad steps and chunk 0 only through the (no-grad) cache, so its noise gets exactly none
    assert noise.grad[:, :, 0].abs().sum() > 0 and float(noise.grad[:, :, 1].abs().max()) == 0.0
    grads = [p.grad for p in student.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    student.zero_grad(set_to_none=True)


def test_grad_through_steps_keeps_every_steps_graph_and_the_same_sample(teacher, student):
    """`grad_through_steps`: every step of a chunk keeps its graph, so the gradient of chunk 1 (exit step 2) reaches
    its initial noise through two re-noisings: d out/d x_0 = prod over steps of d x0_i/d x_i · (1 - σ_{i+1})
    is not zero, where the truncated rollout gives exactly zero. The sample itself is the same."""
    causal = student.causal
    batch = make_batch(teacher)
    runs = {}
    for through in (False, True):
        gens = [sample_generator(0, i) for i in (0, 1)]
        noise = randn_per_sample(gens, SHAPE, "cpu").requires_grad_(True)
        out = sample_causal(
            causal,
            batch.cond.prompt_embeds,
            noise,
            SIGMAS,
            generator=gens,
            exit_steps=[2, 2],
            grad_through_steps=through,
        )
        out[:, :, 1].sum().backward()
        grad = torch.zeros_like(noise) if noise.grad is None else noise.grad  # None: no path from the noise at all
        runs[through] = (out.detach(), grad[:, :, 1].clone())
        student.zero_grad(set_to_none=True)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=0)
    assert float(runs[False][1].abs().max()) == 0.0 and float(runs[True][1].abs().sum()) > 0


def test_given_first_chunk_starts_the_rollout_from_the_datas_first_chunk(teacher, student):
    """given_first_chunk: on the steps drawn (the same for every rank), chunk 0 is the batch's clean latents, written
    into the cache as a stream with a prefix writes it, without a gradient; the rollout generates chunk 1 on."""
    from students.causal import CausalStream

    draws = [draw_given_first_chunk(0, s, 0.5) for s in range(40)]
    assert 10 < sum(draws) < 30 and draws == [draw_given_first_chunk(0, s, 0.5) for s in range(40)]
    assert not any(draw_given_first_chunk(0, s, 0.0) for s in range(40))
    step = draws.index(True)
    indices = (4 * step, 4 * step + 1)
    batch = make_batch(teacher, indices)
    batch.x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    rollout = rollout_of(student, last_only=True, given_first_chunk=0.5)
    out = rollout(batch)
    assert rollout.last_given and out.shape == (2, *SHAPE)
    assert torch.equal(out[:, :, :1], batch.x0[:, :, :1])
    gens = [sample_generator(0, i) for i in indices]
    noise = randn_per_sample(gens, SHAPE, "cpu")
    stream = CausalStream(student.causal, batch.cond.prompt_embeds, noise[:, :, 1:], SIGMAS, gens, batch.x0[:, :, :1])
    with torch.no_grad():
        torch.testing.assert_close(out[:, :, 1:], stream.next_chunk(), atol=1e-6, rtol=0)

    def grad_of(part):
        student.zero_grad(set_to_none=True)
        part.sum().backward(retain_graph=True)
        return sum(float(p.grad.abs().sum()) for p in student.trainable_parameters() if p.grad is not None)

    assert grad_of(out[:, :, :1]) == 0.0 and grad_of(out[:, :, 1:]) > 0  # only the generated chunk trains
    student.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="given_first_chunk: the first chunk comes from the data"):
        rollout(make_batch(teacher, indices))


def test_windowed_rollout_scores_a_window_of_a_longer_rollout(teacher, student):
    """dmd_window: roll out 4 chunks as at inference, return the 2 chunks of this step's window, graph only there."""
    ends = [draw_window_end(0, s, 4, 2) for s in range(40)]
    assert set(ends) == {2, 3, 4} and ends[7] == draw_window_end(0, 7, 4, 2)
    with pytest.raises(ValueError, match="dmd_window"):
        draw_window_end(0, 0, 2, 3)
    # the window's own exit steps are the ones an unwindowed rollout of `window` chunks would draw
    step = next(s for s, e in enumerate(ends) if e == 3)  # window = chunks 1, 2 of 4; chunk 3 is never rolled out
    causal, calls, real = student.causal, [], student.causal.forward_chunk

    def spy(x, t, cache, frame_offset, update_cache):
        calls.append((frame_offset, torch.is_grad_enabled(), update_cache))
        return real(x, t, cache, frame_offset, update_cache)

    rollout = CausalRollout(causal, SIGMAS, seed=0, samples_per_step=2, num_chunks=4, window=2)
    batch = make_batch(teacher, (2 * step, 2 * step + 1))
    causal.forward_chunk = spy
    try:
        out = rollout(batch)
    finally:
        causal.forward_chunk = real
    exits = draw_exit_steps(0, step, 2, 3)
    assert rollout.last_window == (1, 3) and rollout.last_exit_steps == exits
    assert out.shape == (2, SHAPE[0], 2, *SHAPE[2:]) and out.requires_grad
    # chunk 0: all 3 steps without grad, then its cache write; chunks 1, 2: exit step with grad; no chunk 3
    assert [c for c in calls if c[0] == 0] == [(0, False, False)] * 3 + [(0, False, True)]
    assert [c[0] for c in calls if c[1]] == [1, 2] and max(c[0] for c in calls) == 2
    # the same frames as the inference sampler on the same draws, with those exit steps, cut to the window
    gens = [sample_generator(0, i) for i in batch.indices]
    noise = randn_per_sample(gens, (SHAPE[0], 4, *SHAPE[2:]), "cpu")[:, :, :3]
    with torch.no_grad():
        want = sample_causal(causal, batch.cond.prompt_embeds, noise, SIGMAS, generator=gens, exit_steps=[2] + exits)
    torch.testing.assert_close(out.detach(), want[:, :, 1:], atol=1e-6, rtol=1e-6)
    # without a window the draws are unchanged: the whole rollout, exit steps for every chunk
    whole = rollout_of(student, samples_per_step=2, num_chunks=4)
    with torch.no_grad():
        assert whole(batch).shape[2] == 4 and whole.last_exit_steps == draw_exit_steps(0, step, 4, 3)
    with pytest.raises(ValueError, match="dmd_window"):
        SelfForcing.Config(num_chunks=2, dmd_window=3)


def test_window_min_start_keeps_chunk_0_out_of_dmd(teacher, student):
    """dmd_window_min_start=1: windows of 2 of 4 chunks end at 3 or 4 only (never chunks 0-1), drawn from the same
    stream, so the steps whose end was already >= 3 keep their window; chunk 0 is always a no-grad context chunk."""
    ends = [draw_window_end(0, s, 4, 2) for s in range(60)]
    late = [draw_window_end(0, s, 4, 2, min_start=1) for s in range(60)]
    assert set(late) == {3, 4} and set(ends) == {2, 3, 4}
    with pytest.raises(ValueError, match=r"dmd_window: must be in 1..2 \(the chunks rolled out, 4, less "):
        draw_window_end(0, 0, 4, 3, min_start=2)
    rollout = CausalRollout(
        student.causal, SIGMAS, seed=0, samples_per_step=2, num_chunks=4, window=2, window_min_start=1
    )
    for step in range(4):
        with torch.no_grad():
            rollout(make_batch(teacher, (2 * step, 2 * step + 1)))
        assert rollout.last_window[0] >= 1 and rollout.last_window[1] == late[step]
    with pytest.raises(ValueError, match="does not fit in num_chunks 4"):
        SelfForcing.Config(num_chunks=4, dmd_window=2, dmd_window_min_start=3)
    with pytest.raises(ValueError, match="needs dmd_window"):
        SelfForcing.Config(num_chunks=4, dmd_window_min_start=1)


def test_trainer_passes_the_window_min_start(tmp_path, tiny_pipeline_dir, monkeypatch):
    import distill.self_forcing as sf

    real, seen = sf.draw_window_end, []
    monkeypatch.setattr(sf, "draw_window_end", lambda *a: seen.append(a[-1]) or real(*a))
    write_dataset(tmp_path / "a" / "dataset")
    recipe = write_recipe(tmp_path / "a.yaml", tmp_path / "a", tiny_pipeline_dir, **SF_SECTIONS)
    run_train(
        recipe,
        "train.max_steps=1",
        "method.self_forcing.num_chunks=3",
        "method.self_forcing.dmd_window=1",
        "method.self_forcing.dmd_window_min_start=1",
    )
    assert seen and all(m == 1 for m in seen)


# ---- the SelfForcing losses ----------------------------------------------------------------------------------
def self_forcing(teacher, critic, rollout, **kw):
    cfg = SelfForcing.Config(guidance_scale=3.0, min_sigma=0.1, max_sigma=0.9, shift=2.0, **kw)
    return SelfForcing(cfg, teacher=teacher, critic=critic, rollout=rollout)


def test_generator_loss_is_dmd_on_the_whole_rollout(teacher, student):
    seen = {}

    def critic(x, t, c):
        seen.update(x=x, t=t)
        return 0.1 * x

    algo = self_forcing(teacher, critic, rollout_of(student))
    loss, logs = algo.generator_loss(make_batch(teacher))
    # redo every draw: the rollout (noise, renoises, context noises), then σ and ε', from each sample's stream
    gens = [sample_generator(0, i) for i in (0, 1)]
    batch = make_batch(teacher)
    with torch.no_grad():
        x0 = sample_causal(
            student.causal,
            batch.cond.prompt_embeds,
            randn_per_sample(gens, SHAPE, "cpu"),
            SIGMAS,
            generator=gens,
            exit_steps=draw_exit_steps(0, 0, 2, 3),
        )
    u = torch.cat([torch.rand(1, generator=g) for g in gens])
    sigma = 0.1 + 0.8 * shift_sigma(u, 2.0)
    x_t = add_noise(x0, randn_per_sample(gens, SHAPE, "cpu"), sigma)
    torch.testing.assert_close(seen["x"], x_t)
    real = x0_from_velocity(x_t, teacher.velocity(x_t, 1000 * sigma, batch.cond, 3.0), sigma)
    torch.testing.assert_close(loss, dmd_generator_loss(x0, real, x0_from_velocity(x_t, 0.1 * x_t, sigma)))
    assert float(logs["self_forcing/exit_step_mean"]) == sum(draw_exit_steps(0, 0, 2, 3)) / 2


def test_ode_anchor_adds_the_weighted_regression_on_the_stored_states(teacher, student):
    """generator loss with ode_regression_weight w = the DMD loss + w·mean‖x - σ·v(x, 1000σ) - x0_T‖², x one stored
    state per chunk (drawn after the DMD draws), v the student's block-causal forward: redone by hand."""
    w, states = 0.5, torch.tensor([1.0, 0.6, 0.0])
    traj = torch.randn((2, 3, *SHAPE), generator=torch.Generator().manual_seed(5))  # [B, S, C, F, H, W]

    def batch():
        b = make_batch(teacher)
        b.x0, b.trajectory, b.trajectory_sigmas = traj[:, -1], traj, states.repeat(2, 1)
        return b

    def critic(x, t, c):
        return 0.1 * x

    plain = self_forcing(teacher, critic, rollout_of(student))
    data = batch()
    dmd, _ = plain.generator_loss(data)  # leaves each sample's generator where the anchor draws from
    picks = torch.stack([torch.randint(2, (2,), generator=g) for g in data.generators])  # [B, chunks of 1 frame]
    x = torch.stack([torch.stack([traj[i, picks[i, f], :, f] for f in range(2)], dim=1) for i in range(2)])
    sigma = states[picks]  # [B, F]
    with torch.no_grad():
        v = student(x, 1000 * sigma, data.cond.prompt_embeds)
    by_hand = ((x - sigma[:, None, :, None, None] * v - traj[:, -1]) ** 2).mean()
    anchored = SelfForcing(
        SelfForcing.Config(guidance_scale=3.0, min_sigma=0.1, max_sigma=0.9, shift=2.0, ode_regression_weight=w),
        teacher=teacher,
        critic=critic,
        rollout=rollout_of(student),
        anchor=ODERegression(ODERegression.Config(), student=student, student_frames_per_block=1),
    )
    assert anchored.needs_trajectory and not plain.needs_trajectory
    loss, logs = anchored.generator_loss(batch())
    torch.testing.assert_close(logs["loss/ode_anchor"], by_hand)
    torch.testing.assert_close(loss, dmd + w * by_hand)
    with pytest.raises(ValueError, match="ode_regression_weight: must be a finite number >= 0"):
        SelfForcing.Config(ode_regression_weight=-1.0)


def test_frame_wise_timesteps_draw_one_sigma_per_chunk(teacher, student):
    seen = []

    def critic(x, t, c):  # a bidirectional Wan critic gets Wan's per-token timesteps
        seen.append(t)
        return 0.1 * x

    algo = self_forcing(teacher, critic, rollout_of(student), frame_wise_timesteps=True)
    loss, _ = algo.generator_loss(make_batch(teacher))
    c_loss, _ = algo.critic_loss(make_batch(teacher, (2, 3)))
    # σ per chunk (1 frame each here), then ε', after the rollout's draws, from each sample's stream
    gens = [sample_generator(0, i) for i in (0, 1)]
    batch = make_batch(teacher)
    with torch.no_grad():
        x0 = sample_causal(
            student.causal,
            batch.cond.prompt_embeds,
            randn_per_sample(gens, SHAPE, "cpu"),
            SIGMAS,
            generator=gens,
            exit_steps=draw_exit_steps(0, 0, 2, 3),
        )
    sigma = 0.1 + 0.8 * shift_sigma(torch.stack([torch.rand(2, generator=g) for g in gens]), 2.0)  # [B, chunks]
    assert float((sigma[:, 0] - sigma[:, 1]).abs().min()) > 1e-3  # chunks of one video sit at different levels
    x_t = add_noise(x0, randn_per_sample(gens, SHAPE, "cpu"), sigma)
    torch.testing.assert_close(seen[0], 1000 * sigma)  # [B, tokens]: 2x2 latent pixels are 1 token with patch (1, 2, 2)
    real = x0_from_velocity(x_t, teacher.velocity(x_t, 1000 * sigma, batch.cond, 3.0), sigma)  # per-frame t [B, F]
    torch.testing.assert_close(loss, dmd_generator_loss(x0, real, x0_from_velocity(x_t, 0.1 * x_t, sigma)))
    # the critic's flow matching uses the same per-chunk levels (batch of step 0, samples 2 and 3)
    gens = [sample_generator(0, i) for i in (2, 3)]
    batch = make_batch(teacher, (2, 3))
    with torch.no_grad():
        x0 = sample_causal(
            student.causal,
            batch.cond.prompt_embeds,
            randn_per_sample(gens, SHAPE, "cpu"),
            SIGMAS,
            generator=gens,
            exit_steps=draw_exit_steps(0, 0, 2, 3),
        )
    sigma = 0.1 + 0.8 * shift_sigma(torch.stack([torch.rand(2, generator=g) for g in gens]), 2.0)
    noise = randn_per_sample(gens, SHAPE, "cpu")
    want = flow_matching_loss(PerTokenTimesteps(lambda x, t, c: 0.1 * x, (1, 2, 2)), x0, noise, sigma, None)
    torch.testing.assert_close(c_loss, want)
    assert seen[1].shape == (2, 2)  # [B, tokens]


def test_per_token_timesteps_and_frame_wise_errors():
    t = torch.tensor([[100.0, 100.0, 100.0, 700.0, 700.0, 700.0]])
    x = torch.zeros(1, 3, 6, 8, 8)
    assert per_token_timesteps(t, x, (3, 4, 4)).tolist() == [[100.0] * 4 + [700.0] * 4]
    with pytest.raises(ValueError, match="must share a timestep"):
        per_token_timesteps(torch.tensor([[1.0, 2.0, 2.0]]), torch.zeros(1, 3, 3, 4, 4), (3, 4, 4))
    toy = SimpleNamespace(
        boundary=None, pipe=SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(patch_size=(3, 4, 4))))
    )  # the toy teacher's temporal patch
    with pytest.raises(ValueError, match="frame_wise_timesteps: the teacher takes per-frame timesteps only"):
        SelfForcing(SelfForcing.Config(frame_wise_timesteps=True), teacher=toy, critic=None, rollout=None)
    with pytest.raises(ValueError, match="num_chunks: must be >= 1"):
        SelfForcing.Config(num_chunks=0)


# ---- the trainer ----------------------------------------------------------------------------------------------
SF_SECTIONS = dict(
    student={"kind": "causal", "frames_per_block": 1, "denoising_steps": [1000, 750, 400]},
    method={
        "name": "self_forcing",
        "self_forcing": {"generator_update_interval": 1, "critic_lora_rank": 4, "critic_learning_rate": 3e-3},
    },
    train={
        "max_steps": 2,
        "gradient_accumulation_steps": 1,
        "checkpointing_steps": 1,
        "checkpoints_total_limit": 2,
        "lr_warmup_steps": 0,
        "ema": False,
    },
)


@pytest.fixture(scope="module")
def sf_run(tmp_path_factory, tiny_pipeline_dir):
    """2 uninterrupted steps, 1 process × batch 2, generator and critic every step."""
    root = tmp_path_factory.mktemp("sf")
    write_dataset(root / "a" / "dataset")
    recipe = write_recipe(root / "a.yaml", root / "a", tiny_pipeline_dir, **SF_SECTIONS)
    return root, recipe, run_train(recipe)


def test_trainer_resumes_self_forcing_to_identical_weights(sf_run, tmp_path, tiny_pipeline_dir, monkeypatch):
    root, _, final_a = sf_run
    w_a = weights(final_a)
    init = load_file(str(tiny_pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = w_a["expert_0/diffusion_pytorch_model.safetensors:proj_out.weight"]
    assert float((trained - init["proj_out.weight"]).abs().max()) > 0  # the generator trained
    critic = load_file(str(final_a.parent / "checkpoint-2" / "critic.safetensors"))
    assert critic and any(float(v.abs().max()) > 0 for k, v in critic.items() if "lora_B" in k)  # and the critic
    real, calls = SelfForcing.critic_loss, []

    def interrupted(self, batch):  # dies in step 1, after checkpoint-1
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("simulated crash")
        return real(self, batch)

    write_dataset(tmp_path / "b" / "dataset")
    recipe_b = write_recipe(tmp_path / "b.yaml", tmp_path / "b", tiny_pipeline_dir, **SF_SECTIONS)
    monkeypatch.setattr(SelfForcing, "critic_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(recipe_b)
    monkeypatch.setattr(SelfForcing, "critic_loss", real)
    final_b = run_train(recipe_b, "train.resume_from_checkpoint=latest")
    assert max_diff(w_a, weights(final_b)) == 0.0
    critic_b = load_file(str(final_b.parent / "checkpoint-2" / "critic.safetensors"))
    assert max_diff(critic, critic_b) == 0.0
    with pytest.raises(RecipeError, match="student.kind: method self_forcing trains only causal students"):
        load_recipe(recipe_b, ["student.kind=full"])


def test_captions_only_run_equals_the_dataset_run(sf_run, tmp_path, tiny_pipeline_dir):
    """`train.data_source: prompts` with the dataset's captions as prompts_file: every sample draws the line it drew
    as a row, and the stored latents only gave the rollout its shape, so the trained weights are the same bits."""
    _, _, final_a = sf_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# the dataset's captions, in its row order\n" + "\n".join(DATASET_CAPTIONS[:6]) + "\n")
    recipe = write_recipe(tmp_path / "p.yaml", tmp_path / "p", tiny_pipeline_dir, **SF_SECTIONS)
    final = run_train(recipe, "train.data_source=prompts", f"train.prompts_file={prompts}")
    assert not (tmp_path / "p" / "dataset").exists()
    assert max_diff(weights(final_a), weights(final)) == 0.0


def test_trainer_feeds_the_ode_anchor_the_datasets_trajectories(sf_run, tmp_path, tiny_pipeline_dir, monkeypatch):
    """With ode_regression_weight the trainer loads the trajectory column, the anchor's loss is logged, and the
    weights differ from the run without it; a dataset without trajectories stops with the anchor's message."""
    _, _, final_a = sf_run
    real, seen = SelfForcing.generator_loss, []

    def spy(self, batch):
        seen.append(batch.trajectory is not None)
        loss, logs = real(self, batch)
        seen.append("loss/ode_anchor" in logs)
        return loss, logs

    monkeypatch.setattr(SelfForcing, "generator_loss", spy)
    write_dataset(tmp_path / "a" / "dataset", trajectory_sigmas=[1.0, 0.5, 0.0])
    recipe = write_recipe(tmp_path / "a.yaml", tmp_path / "a", tiny_pipeline_dir, **SF_SECTIONS)
    final = run_train(recipe, "method.self_forcing.ode_regression_weight=1.0")
    assert seen and all(seen)
    assert max_diff(weights(final_a), weights(final)) > 0
    write_dataset(tmp_path / "b" / "dataset")  # no trajectory column
    recipe = write_recipe(tmp_path / "b.yaml", tmp_path / "b", tiny_pipeline_dir, **SF_SECTIONS)
    with pytest.raises(ValueError, match="the dataset has no `trajectory` column; set data.trajectory_steps"):
        run_train(recipe, "method.self_forcing.ode_regression_weight=1.0")


def test_trainer_passes_same_step_across_chunks(tmp_path, tiny_pipeline_dir, monkeypatch):
    import distill.self_forcing as sf

    real, seen = sf.draw_exit_steps, []

    def spy(*args):
        seen.append(args[-1])  # same_across_chunks
        return real(*args)

    monkeypatch.setattr(sf, "draw_exit_steps", spy)
    write_dataset(tmp_path / "a" / "dataset")
    recipe = write_recipe(tmp_path / "a.yaml", tmp_path / "a", tiny_pipeline_dir, **SF_SECTIONS)
    run_train(recipe, "train.max_steps=1", "method.self_forcing.same_step_across_chunks=true")
    assert seen and all(seen)


@pytest.mark.xdist_group("multiproc")
def test_two_ranks_draw_the_same_exit_steps_and_match_one_process(sf_run):
    """2 processes × batch 1 (gloo): each rank records its world size and exit steps; they agree with each other and
    with the 1-process × batch 2 run, whose weights the DDP run reproduces (the chunk forwards go through DDP)."""
    root, recipe, final_one = sf_run
    out2, probe = root / "two", root / "probe"
    (out2).mkdir()
    os.symlink(root / "a" / "dataset", out2 / "dataset")
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(launcher),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(PROJECT_ROOT / "tests" / "self_forcing_probe.py"),
        str(probe),
        str(recipe),
        f"output_dir={out2}",
        "train.batch_size=1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(c["world_size"] == 2 for calls in ranks for c in calls)
    # per step: the generator's rollout (grad) then the critic's (no grad), on sample r of the step
    assert [[c["indices"] for c in calls] for calls in ranks] == [[[0], [0], [2], [2]], [[1], [1], [3], [3]]]
    assert [c["grad"] for c in ranks[0]] == [True, False, True, False]
    exits = [[c["exit_steps"] for c in calls] for calls in ranks]
    assert exits[0] == exits[1] == [draw_exit_steps(0, s, 2, 3) for s in (0, 0, 1, 1)]
    diff = max_diff(weights(final_one), weights(out2 / "students" / "s" / "final"))
    print(f"1 process × batch 2 vs 2 processes × batch 1: max |Δw| = {diff:.3g}")
    # Measured: 1.1e-4 (batch-1 vs batch-2 rounding, through the DMD normaliser and 2 AdamW steps at lr 1e-2, whose
    # steps are ~lr whatever the gradient's size); chunk forwards that bypass DDP leave the ranks unsynchronised: 4e-2.
    assert diff <= 1e-3


# ---- streaming -------------------------------------------------------------------------------------------------
def test_streaming_decoder_equals_the_whole_video_decode(teacher):
    """Wan's 4x temporal VAE (tiny, random): chunks of 1, 2 and 3 latent frames decode to the whole video's frames."""
    from students.streaming import StreamingDecoder

    latents = torch.randn(1, 4, 6, 2, 2, generator=torch.Generator().manual_seed(4))
    whole = teacher.decode(latents)
    decoder = StreamingDecoder(teacher)
    parts = [decoder(latents[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 6))]
    decoder.close()
    assert [p.shape[2] for p in parts] == [1, 8, 12] and whole.shape[2] == 21
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-6, rtol=0)
    # decoding each chunk on its own (no cache) is NOT the same video: the VAE's temporal context matters
    alone = teacher.decode(latents[:, :, 3:6])
    assert alone.shape[2] == 9 and (alone[:, :, -8:] - whole[:, :, -8:]).abs().max() > 1e-3


def _toy_stream_setup(tmp_path):
    """A saved toy-layout teacher (identity VAE, temporal patch 3) and a saved causal student of it."""
    from conftest import TINY_WORDS

    from teachers.toyworld.pipeline import build_toy_pipeline, save_toy_pipeline

    pipe = build_toy_pipeline(
        TINY_WORDS,
        transformer_kwargs=dict(
            patch_size=(3, 4, 4),
            num_attention_heads=2,
            attention_head_dim=8,
            freq_dim=32,
            ffn_dim=32,
            num_layers=1,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=32,
        ),
        text_dim=16,
    )
    save_toy_pipeline(pipe, tmp_path / "toy")
    toy = WanTeacher.from_config(
        TeacherConfig(
            pretrained=str(tmp_path / "toy"),
            dtype="float32",
            height=16,
            width=16,
            num_frames=9,
            num_inference_steps=4,
            max_sequence_length=8,
        ),
        "cpu",
    )
    cfg = StudentConfig(
        name="sf",
        kind="causal",
        frames_per_block=3,
        local_window=6,
        sink=3,
        context_noise=50,
        denoising_steps=[1000, 500],
    )
    student = build_student(cfg, toy.pipe.transformer)
    student.save_pretrained(tmp_path / "sf")
    return toy, student


def test_stream_video_yields_the_frames_of_a_full_rollout(tmp_path):
    """Toy-world layout (identity VAE, temporal patch 3): 4 chunks streamed from a saved student = one
    `sample_causal` + decode of the whole video, frame for frame."""
    from core.seeding import sample_noise
    from students.streaming import stream_video

    toy, student = _toy_stream_setup(tmp_path)
    prompt, seed = "a red cat moving left", 11
    chunks = list(stream_video(toy, tmp_path / "sf", prompt, num_chunks=4, seed=seed))
    assert [c.shape for c in chunks] == [(3, 16, 16, 3)] * 4 and all(c.dtype == np.uint8 for c in chunks)
    with torch.no_grad():
        noise = sample_noise(seed, (3, 12, 16, 16))[None]
        gen = [torch.Generator().manual_seed(derive_seed(seed, 1))]
        latents = sample_causal(student.causal, toy.encode([prompt]).prompt_embeds, noise, [1.0, 0.75], generator=gen)
        want = toy.to_uint8(toy.decode(latents))[0]
    assert np.array_equal(np.concatenate(chunks), want)
    assert np.abs(chunks[3].astype(int) - chunks[0].astype(int)).mean() > 1  # not one chunk repeated


def test_stream_video_switches_prompts_and_continues_a_clip(tmp_path):
    """A switch at chunk 2 leaves chunks 0-1 as they were and changes what follows, differently with and without the
    KV re-cache; a continuation takes a clip of whole chunks (encoded by the VAE) and refuses what does not fit."""
    from students.streaming import stream_video

    toy, _ = _toy_stream_setup(tmp_path)
    a, b, seed = "a red cat moving left", "a blue dog on a white background", 11
    base = list(stream_video(toy, tmp_path / "sf", a, num_chunks=4, seed=seed))
    switched = list(stream_video(toy, tmp_path / "sf", a, num_chunks=4, seed=seed, switches=[(2, b)]))
    kept = list(stream_video(toy, tmp_path / "sf", a, 4, seed, switches=lambda i: b if i == 2 else None, recache=False))
    for run in (switched, kept):
        assert all(np.array_equal(x, y) for x, y in zip(run[:2], base[:2]))
        assert all(np.abs(x.astype(int) - y.astype(int)).max() > 0 for x, y in zip(run[2:], base[2:]))
    assert np.abs(switched[2].astype(int) - kept[2].astype(int)).max() > 0  # the re-cache changes the context
    from_b = list(stream_video(toy, tmp_path / "sf", b, num_chunks=1, seed=seed, switches=[(0, a)]))
    only_a = list(stream_video(toy, tmp_path / "sf", a, num_chunks=1, seed=seed))
    assert np.array_equal(from_b[0], only_a[0])  # a switch at chunk 0 is simply the starting prompt

    clip = np.concatenate(base[:3])  # 9 frames: 1 + 4·2 for the VAE's encoder, 3 whole chunks
    more = list(stream_video(toy, tmp_path / "sf", a, num_chunks=2, seed=seed, continue_from=clip))
    assert [c.shape for c in more] == [(3, 16, 16, 3)] * 2
    video = tmp_path / "clip.mp4"
    from synth_data.dataset import encode_video

    video.write_bytes(encode_video(clip, 8))
    from_file = list(stream_video(toy, tmp_path / "sf", a, num_chunks=1, seed=seed, continue_from=video))
    assert from_file[0].shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match=r"image-to-video needs a teacher with temporal patch 1"):
        list(stream_video(toy, tmp_path / "sf", a, num_chunks=1, seed=seed, continue_from=clip[:1]))
    with pytest.raises(ValueError, match=r"expected \[F, 16, 16, 3\]"):
        list(stream_video(toy, tmp_path / "sf", a, num_chunks=1, seed=seed, continue_from=clip[:, :8]))


def test_stream_stage_writes_the_mp4_as_the_cli_is_told(tmp_path, capsys):
    """`python -m distill stream` with stream.student, a switch and the default output: the mp4 holds the frames
    `stream_video` yields (H.264, lossy); bad input is one line and writes nothing."""
    import yaml

    from distill.cli import main
    from students.streaming import stream_video
    from synth_data.dataset import decode_video

    toy, _ = _toy_stream_setup(tmp_path)
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "data": {"vocabulary": "synth_data/vocab/toyworld.yaml", "num_prompts": 1, "fps": 8},
        "teacher": {k: getattr(toy.cfg, k) for k in ("pretrained", "dtype", "height", "width", "num_frames")}
        | {"num_inference_steps": 4, "max_sequence_length": 8},
        "stream": {"student": str(tmp_path / "sf"), "num_chunks": 3, "seed": 5},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["stream", str(tmp_path / "r.yaml")]) == 2
    assert "stream.prompt: not set" in capsys.readouterr().err
    assert not (tmp_path / "out" / "streams").exists() or not any((tmp_path / "out" / "streams").iterdir())
    a, b = "a red cat moving left", "a blue dog"
    assert main(["stream", str(tmp_path / "r.yaml"), f"stream.prompt={a}", f"stream.switches=[[2, {b}]]"]) == 0
    out = tmp_path / "out" / "streams" / "sf_seed5.mp4"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sf_seed5.mp4"]  # the .part file renamed into place
    got = decode_video(out.read_bytes())
    want = np.concatenate(list(stream_video(toy, tmp_path / "sf", a, 3, 5, switches=[(2, b)])))
    assert got.shape == want.shape == (9, 16, 16, 3)
    luma = np.array([0.299, 0.587, 0.114])  # yuv420p keeps luma at full resolution; random frames' chroma is lost
    err = np.abs(got @ luma - want @ luma).mean()
    other = np.concatenate(list(stream_video(toy, tmp_path / "sf", b, 3, 5)))
    assert err < 6 and np.abs(got @ luma - other @ luma).mean() > 2 * err  # closer to its stream than another
    assert main(["stream", str(tmp_path / "r.yaml"), f"stream.prompt={a}", "stream.switches=[[x, y]]"]) == 2
    assert "stream.switches[0]" in capsys.readouterr().err


@pytest.mark.parametrize("after", [False, True])
def test_critic_after_generator_rolls_out_the_updated_generator(after, tmp_path, tiny_pipeline_dir, monkeypatch):
    """`critic_after_generator`: the critic's loss of a generator step sees the student's weights after that step's
    update (Self-Forcing's order); by default it sees the same weights as the generator's loss."""
    seen = []
    real_gen, real_critic = SelfForcing.generator_loss, SelfForcing.critic_loss

    def weights_now(self):
        return float(sum(p.detach().double().sum() for p in self.rollout.model.causal.transformer.parameters()))

    def generator_loss(self, batch):
        seen.append(("generator", weights_now(self)))
        return real_gen(self, batch)

    def critic_loss(self, batch):
        seen.append(("critic", weights_now(self)))
        return real_critic(self, batch)

    monkeypatch.setattr(SelfForcing, "generator_loss", generator_loss)
    monkeypatch.setattr(SelfForcing, "critic_loss", critic_loss)
    write_dataset(tmp_path / "a" / "dataset")
    recipe = write_recipe(tmp_path / "a.yaml", tmp_path / "a", tiny_pipeline_dir, **SF_SECTIONS)
    run_train(recipe, "train.max_steps=1", f"method.self_forcing.critic_after_generator={str(after).lower()}")
    assert [who for who, _ in seen] == ["generator", "critic"]
    assert (seen[1][1] != seen[0][1]) == after
