"""DMD2 (generator and critic losses, the exit-step rollout) and ODE regression: closed forms, gradient routing,
and 2-step trainer runs (DMD resume with both optimizers; ODE regression smoke)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import max_diff, run_train, weights, write_dataset, write_recipe

from core.flow import add_noise, expand_sigma, shift_sigma, timestep, x0_from_velocity
from core.lora import add_lora, lora_parameters
from core.seeding import rand_per_sample, randint_per_sample, randn_per_sample, sample_generator
from distill.batch import Batch
from distill.dmd import (
    DMD,
    FewStepRollout,
    dmd_critic_loss,
    dmd_generator_loss,
    dmd_gradient,
    exit_step_rollout,
)
from distill.flow_matching import flow_matching_loss
from distill.kd import teacher_velocity
from distill.ode_regression import ODERegression, chunk_states
from students.config import StudentConfig
from students.sampling import sample_student
from students.student import build_student
from teachers.config import TeacherConfig
from teachers.wan import WanTeacher

SHAPE = (4, 2, 2, 2)  # latents [C, F, H, W] of 5 frames at 16x16 px for the tiny VAE


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


def make_batch(teacher, n=2, trajectory=None, sigmas=None) -> Batch:
    captions = ["a red cat moving left", "a blue square on white background", "a green dog"][:n]
    return Batch(
        x0=torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(7)),
        cond=teacher.encode(captions, "blurry noise"),
        generators=[sample_generator(0, i) for i in range(n)],
        indices=list(range(n)),
        captions=captions,
        trajectory=trajectory,
        trajectory_sigmas=sigmas,
    )


# ---- the pure DMD losses ----------------------------------------------------------------------------
def test_dmd_gradient_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 1, 2, 1, 2, generator=g).requires_grad_(True)
    real, fake = torch.randn(2, 1, 2, 1, 2, generator=g), torch.randn(2, 1, 2, 1, 2, generator=g)
    loss = dmd_generator_loss(x0, real, fake)
    loss.backward()
    # by hand: per-sample normaliser mean|x0 - real| over its 4 elements; ∂L/∂x0 = grad / numel (= 8)
    norm = (x0.detach() - real).abs().flatten(1).mean(1).view(2, 1, 1, 1, 1)
    grad = (fake - real) / norm
    torch.testing.assert_close(x0.grad, grad / 8, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(loss, 0.5 * (grad**2).mean())
    torch.testing.assert_close(dmd_gradient(x0, real, fake), grad)
    print(
        f"normalisers {norm.flatten().tolist()}, loss {float(loss.detach()):.6f}, "
        f"max |∂L/∂x0 - grad/8| = {float((x0.grad - grad / 8).abs().max()):.2e}"
    )
    # the normaliser is clamped away from 0 (x0 == real), and fake == real gives zero loss and gradient
    assert torch.isfinite(dmd_gradient(real, real, fake)).all()
    x1 = x0.detach().clone().requires_grad_(True)
    zero = dmd_generator_loss(x1, real, real)
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(x1.grad.abs().max()) == 0.0


def test_dmd_gradient_per_chunk_normaliser_by_hand():
    """group_frames=2 over 4 frames: each sample's two chunks get their own mean|x0 - real| (LongLive)."""
    g = torch.Generator().manual_seed(1)
    x0, real, fake = (torch.randn(2, 3, 4, 2, 2, generator=g) for _ in range(3))
    x0[0, :, 2:] = real[0, :, 2:] + 0.01  # sample 0's second chunk sits almost on the teacher's x0
    expected = torch.empty_like(x0)
    for b in range(2):
        for first in (0, 2):
            frames = slice(first, first + 2)
            norm = float((x0[b, :, frames] - real[b, :, frames]).abs().mean())
            expected[b, :, frames] = (fake[b, :, frames] - real[b, :, frames]) / norm
    torch.testing.assert_close(dmd_gradient(x0, real, fake, group_frames=2), expected)
    # one normaliser per video differs: the near chunk's small error no longer scales its own gradient up
    assert not torch.allclose(dmd_gradient(x0, real, fake), expected)
    assert float(dmd_gradient(x0, real, fake, group_frames=2)[0, :, 2:].abs().mean()) > 10 * float(
        dmd_gradient(x0, real, fake)[0, :, 2:].abs().mean()
    )
    with pytest.raises(ValueError, match="whole groups of 3"):
        dmd_gradient(x0, real, fake, group_frames=3)


def test_critic_loss_is_flow_matching_on_detached_samples():
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.tensor(0.3))
    critic = lambda x, t, c: w * x  # noqa: E731
    x0 = torch.randn(2, *SHAPE, generator=g).requires_grad_(True)
    noise, sigma = torch.randn(2, *SHAPE, generator=g), torch.tensor([0.2, 0.9])
    loss = dmd_critic_loss(critic, x0, noise, sigma, None)
    torch.testing.assert_close(loss, flow_matching_loss(critic, x0.detach(), noise, sigma, None))
    loss.backward()
    assert x0.grad is None and w.grad is not None and float(w.grad) != 0


# ---- the exit-step rollout ---------------------------------------------------------------------------
def test_exit_step_rollout_keeps_one_step_and_matches_the_sampler():
    calls = []

    def model(x, t, c):
        calls.append(torch.is_grad_enabled())
        return 0.5 * x + t.view(-1, 1, 1, 1, 1) / 1000

    g = torch.Generator().manual_seed(2)
    sigmas = [1.0, 0.7, 0.3]
    noise, renoise = torch.randn(3, *SHAPE, generator=g), [torch.randn(3, *SHAPE, generator=g) for _ in range(2)]
    # the chain by hand: x0 predicted at each step
    x, x0s = noise, []
    for i, s in enumerate(sigmas):
        x0s.append(x0_from_velocity(x, model(x, torch.full((3,), s * 1000), None), s))
        if i < 2:
            x = add_noise(x0s[-1], renoise[i], sigmas[i + 1])
    calls.clear()
    out = exit_step_rollout(model, None, noise, renoise, sigmas, torch.tensor([0, 2, 1]))
    assert calls == [False, False, True]  # n-1 forwards without grad, one with
    for j, k in enumerate([0, 2, 1]):
        torch.testing.assert_close(out[j], x0s[k][j])
    # all exits at the last step equal students.sampling's renoise sampler with the same noises
    gens = [torch.Generator().manual_seed(10 + j) for j in range(3)]
    copies = [torch.Generator().set_state(gen.get_state()) for gen in gens]
    want = sample_student(model, None, None, noise, sigmas, generator=copies, mode="renoise")
    draws = [randn_per_sample(gens, SHAPE, "cpu") for _ in range(2)]
    torch.testing.assert_close(exit_step_rollout(model, None, noise, draws, sigmas, torch.tensor([2, 2, 2])), want)


def test_few_step_rollout_draws_per_sample(teacher):
    batch = make_batch(teacher, n=2)
    seen = {}

    def model(x, t, c):
        seen.setdefault("t", []).append(t)
        return torch.zeros_like(x)

    out = FewStepRollout(model, [1.0, 0.5], "random")(batch)
    # redo the draws: noise, one renoise, then the exit step, each from the sample's own stream
    gens = [sample_generator(0, j) for j in range(2)]
    noise = randn_per_sample(gens, SHAPE, "cpu")
    renoise = randn_per_sample(gens, SHAPE, "cpu")
    exits = randint_per_sample(gens, 2)
    torch.testing.assert_close(seen["t"][1], torch.tensor([[1000.0, 500.0][k] for k in exits]))
    for j, k in enumerate(exits):  # zero velocity: x0 = x at the exit step
        torch.testing.assert_close(out[j], noise[j] if k == 0 else add_noise(noise[j], renoise[j], 0.5))
    with pytest.raises(ValueError, match="all must be > 0"):
        FewStepRollout(model, [1.0, 0.0])


# ---- the DMD class ----------------------------------------------------------------------------------
def dmd(teacher, critic, rollout, **kw):
    return DMD(DMD.Config(guidance_scale=3.0, **kw), teacher=teacher, critic=critic, rollout=rollout)


def test_generator_loss_wires_teacher_critic_and_sigma(teacher):
    batch = make_batch(teacher)
    sample = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    seen = {}

    def critic(x, t, c):
        seen.update(x=x, t=t, c=c)
        return 0.1 * x

    algo = dmd(teacher, critic, lambda b: sample, min_sigma=0.1, max_sigma=0.9, shift=2.0)
    loss, logs = algo.generator_loss(batch)
    loss.backward()
    # σ and ε' redone by hand from each sample's stream (the stub rollout draws nothing)
    gens = [sample_generator(0, j) for j in range(2)]
    sigma = 0.1 + 0.8 * shift_sigma(rand_per_sample(gens), 2.0)
    noise = randn_per_sample(gens, SHAPE, "cpu")
    x_t = add_noise(sample.detach(), noise, sigma)
    torch.testing.assert_close(seen["x"], x_t)
    torch.testing.assert_close(seen["t"], timestep(sigma))
    assert torch.equal(seen["c"], batch.cond.prompt_embeds)
    real = x0_from_velocity(x_t, teacher.velocity(x_t, timestep(sigma), batch.cond, 3.0), sigma)
    fake = x0_from_velocity(x_t, 0.1 * x_t, sigma)
    torch.testing.assert_close(loss, dmd_generator_loss(sample, real, fake))
    torch.testing.assert_close(sample.grad, dmd_gradient(sample, real, fake) / sample.numel())
    assert 0.1 <= float(sigma.min()) and float(sigma.max()) <= 0.9
    assert float(logs["dmd/grad_abs_mean"]) > 0
    # the critic loss: flow matching of the critic on the (detached) sample, draws continuing the same streams
    batch2 = make_batch(teacher)
    c_loss, _ = algo.critic_loss(batch2)
    gens = [sample_generator(0, j) for j in range(2)]
    sigma2 = 0.1 + 0.8 * shift_sigma(rand_per_sample(gens), 2.0)
    torch.testing.assert_close(
        c_loss,
        flow_matching_loss(
            critic, sample.detach(), randn_per_sample(gens, SHAPE, "cpu"), sigma2, batch2.cond.prompt_embeds
        ),
    )
    assert algo.trains_generator(0) and not algo.trains_generator(4) and algo.trains_generator(5)


def test_gradients_reach_only_their_player(teacher):
    """LoRA student, LoRA critic and teacher share one base: each loss trains only its own adapter."""
    from students.critic import Critic

    torch.manual_seed(0)
    student = build_student(
        StudentConfig(name="s", kind="lora", lora_rank=4, lora_alpha=4.0, denoising_steps=[1000, 500]),
        teacher.pipe.transformer,
    )
    base = teacher.pipe.transformer
    batch = make_batch(teacher)
    x, t = batch.x0, torch.tensor([900.0, 300.0])
    before = teacher_velocity(teacher, x, t, batch.cond, 3.0)
    try:
        add_lora(base, 4, 4.0, ["attn1.to_q", "ffn.net.2"], "critic")
        critic = Critic(base, "critic")
        with torch.no_grad():  # make both adapters non-trivial
            for p in lora_parameters(base):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        torch.testing.assert_close(teacher_velocity(teacher, x, t, batch.cond, 3.0), before, atol=0, rtol=0)
        algo = dmd(teacher, critic, FewStepRollout(student, [1.0, 0.75]))
        s_params, c_params = student.trainable_parameters(), critic.trainable_parameters()
        assert s_params and c_params and not {id(p) for p in s_params} & {id(p) for p in c_params}

        def grads(loss_fn):
            for p in s_params + c_params:
                p.grad = None
            loss_fn(make_batch(teacher))[0].backward()
            return [None if p.grad is None else p.grad.clone() for p in s_params + c_params]

        g_gen, g_critic = grads(algo.generator_loss), grads(algo.critic_loss)
        g_s, g_c = g_gen[: len(s_params)], g_gen[len(s_params) :]
        assert all(g is not None for g in g_s) and any(g.abs().sum() > 0 for g in g_s)
        assert all(g is None for g in g_c)
        assert all(p.grad is None for n, p in base.named_parameters() if "lora_" not in n)
        g_s, g_c = g_critic[: len(s_params)], g_critic[len(s_params) :]
        assert all(g is None for g in g_s)
        assert all(g is not None for g in g_c) and any(g.abs().sum() > 0 for g in g_c)
        assert all(p.requires_grad for p in s_params + c_params)  # flags survive the adapter switches
        # gradient checkpointing re-runs forwards in backward: each player's adapter must still be the active one
        base.enable_gradient_checkpointing()
        for before_ckpt, after_ckpt in zip(g_gen + g_critic, grads(algo.generator_loss) + grads(algo.critic_loss)):
            assert (before_ckpt is None) == (after_ckpt is None)
            if before_ckpt is not None:
                torch.testing.assert_close(after_ckpt, before_ckpt, atol=1e-6, rtol=1e-5)
    finally:
        base.disable_gradient_checkpointing()
        base.delete_adapters([*student.adapter_names, "critic"])


def test_generator_gradient_does_not_depend_on_the_batch_split(teacher):
    """Every draw is per sample, so batch [0, 1] gives the mean gradient of batches [0] and [1] (N processes × b
    equal 1 × N·b). Rounding only: batched forwards round differently."""
    from students.critic import Critic

    torch.manual_seed(0)
    student = build_student(StudentConfig(name="s", kind="full", denoising_steps=[1000, 500]), teacher.pipe.transformer)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    critic = Critic(build_student(StudentConfig(name="c", kind="full"), teacher.pipe.transformer).experts[0], None)
    algo = dmd(teacher, critic, FewStepRollout(student, [1.0, 0.75]))
    full = make_batch(teacher)

    def grad(rows):
        b = Batch(
            x0=full.x0[rows],
            cond=full.cond[rows],
            generators=[sample_generator(0, j) for j in rows],
            indices=rows,
            captions=[full.captions[j] for j in rows],
        )
        student.zero_grad(set_to_none=True)
        algo.generator_loss(b)[0].backward()
        return torch.cat([p.grad.flatten() for p in student.trainable_parameters()])

    whole, split = grad([0, 1]), (grad([0]) + grad([1])) / 2
    print(f"max |g| {float(whole.abs().max()):.3g}, max |Δg| {float((whole - split).abs().max()):.3g}")
    assert float(whole.abs().max()) > 1e-4
    torch.testing.assert_close(whole, split, atol=1e-7, rtol=1e-4)


# ---- ODE regression ---------------------------------------------------------------------------------
def stored(n=2, sigmas=(1.0, 0.75, 0.4, 0.0)):
    traj = torch.randn(n, len(sigmas), *SHAPE, generator=torch.Generator().manual_seed(5))
    return traj, torch.tensor(sigmas).repeat(n, 1)


def test_ode_regression_picks_a_state_per_chunk_and_exact_v_gives_zero(teacher):
    traj, sig = stored()
    batch = make_batch(teacher, trajectory=traj, sigmas=sig)
    seen = {}

    def exact(x, t, c):  # v such that x - σ·v is the endpoint, per frame
        seen.update(x=x, t=t)
        return (x - traj[:, -1]) / expand_sigma(t / 1000, x)

    loss, logs = ODERegression(ODERegression.Config(frames_per_block=1), student=exact).loss(batch)
    assert float(loss) < 1e-10
    # one state per chunk (= per frame here), redrawn by hand from each sample's stream, never the endpoint
    picks = torch.stack([torch.randint(3, (2,), generator=sample_generator(0, j)) for j in range(2)])
    assert seen["t"].shape == (2, 2)
    torch.testing.assert_close(seen["t"], sig.gather(1, picks) * 1000)
    for j in range(2):
        for f in range(2):
            torch.testing.assert_close(seen["x"][j, :, f], traj[j, picks[j, f], :, f])
    assert picks.unique().numel() > 1  # this seed mixes levels
    # chunks of 2 frames: both frames of a chunk share a state; a single chunk calls the student with t [B]
    x, s = chunk_states(traj, sig, torch.tensor([[2], [0]]), 2)
    torch.testing.assert_close(s, torch.tensor([[0.4, 0.4], [1.0, 1.0]]))
    assert torch.equal(x[0], traj[0, 2]) and torch.equal(x[1], traj[1, 0])
    ODERegression(ODERegression.Config(), student=exact).loss(make_batch(teacher, trajectory=traj, sigmas=sig))
    assert seen["t"].shape == (2,)
    # closed form: the zero-velocity student's loss is ‖x - x0_T‖²
    zero = ODERegression(ODERegression.Config(), student=lambda x, t, c: torch.zeros_like(x))
    loss0, _ = zero.loss(make_batch(teacher, trajectory=traj, sigmas=sig))
    k = [int(torch.randint(3, (1,), generator=sample_generator(0, j))) for j in range(2)]
    x_in = torch.stack([traj[j, k[j]] for j in range(2)])
    torch.testing.assert_close(loss0, ((x_in - traj[:, -1]) ** 2).mean())
    with pytest.raises(ValueError, match="ode_regression needs the dataset's `trajectory` column"):
        zero.loss(make_batch(teacher))
    with pytest.raises(ValueError, match="frames_per_block"):
        ODERegression.Config(frames_per_block=0)


def test_ode_regression_given_first_chunk_with_an_independent_first_frame(teacher):
    """Chunks [0, 1), [1, 4) (CausVid's independent first frame), and half the samples start from their clean first
    frame at σ = 0, out of the loss: the zero-velocity student's loss, redrawn by hand."""
    c, _, h, w = SHAPE
    sig = torch.tensor([1.0, 0.75, 0.4, 0.0]).repeat(3, 1)
    traj = torch.randn(3, 4, c, 4, 7, w, generator=torch.Generator().manual_seed(6))  # F = 4, H = 7: distinct
    seen = {}

    def zero(x, t, cond):
        seen.update(x=x, t=t)
        return torch.zeros_like(x)

    config = ODERegression.Config(frames_per_block=3, given_first_chunk=0.5)
    method = ODERegression(config, student=zero, first_block_frames=1)
    loss, logs = method.loss(make_batch(teacher, n=3, trajectory=traj, sigmas=sig))
    x_in, errors, count = [], 0.0, 0
    for j in range(3):
        g = sample_generator(0, j)
        picks = torch.randint(3, (2,), generator=g)  # one state per chunk, in chunk order
        given = bool(torch.rand(1, generator=g)[0] < 0.5)  # then the given-first-chunk draw
        frame0 = traj[j, -1, :, :1] if given else traj[j, picks[0], :, :1]
        x = torch.cat([frame0, traj[j, picks[1], :, 1:]], dim=1)
        t0 = torch.tensor(0.0) if given else sig[j, picks[0]] * 1000
        torch.testing.assert_close(seen["t"][j], torch.stack([t0] + [sig[j, picks[1]] * 1000] * 3))
        x_in.append(x)
        scored = x[:, 1:] if given else x
        target = traj[j, -1, :, 1:] if given else traj[j, -1]
        errors, count = errors + float(((scored - target) ** 2).sum()), count + scored.numel()
    torch.testing.assert_close(seen["x"], torch.stack(x_in))
    torch.testing.assert_close(loss, torch.tensor(errors / count))
    assert 0 < float(logs["ode/given_first_chunk"]) < 1  # this seed gives some samples and not others
    with pytest.raises(ValueError, match="given_first_chunk: must be a probability"):
        ODERegression.Config(given_first_chunk=1.5)


def test_ode_regression_grads_reach_only_lora(teacher):
    traj, sig = stored()
    torch.manual_seed(0)
    student = build_student(StudentConfig(name="s", kind="lora", lora_rank=4, lora_alpha=4.0), teacher.pipe.transformer)
    try:
        loss, _ = ODERegression(ODERegression.Config(), student=student).loss(
            make_batch(teacher, trajectory=traj, sigmas=sig)
        )
        loss.backward()
        trainable = {id(p) for p in student.trainable_parameters()}
        assert all((p.grad is not None) == (id(p) in trainable) for p in student.parameters())
        assert any(p.grad.abs().sum() > 0 for p in student.trainable_parameters())
    finally:
        teacher.pipe.transformer.delete_adapters(student.adapter_names)


# ---- trainer ----------------------------------------------------------------------------------------
DMD_SECTIONS = dict(
    student={"denoising_steps": [1000, 500]},
    method={
        "name": "dmd",
        "dmd": {"generator_update_interval": 2, "critic_lora_rank": 4, "critic_learning_rate": 3e-3},
    },
    train={
        "max_steps": 3,
        "gradient_accumulation_steps": 1,
        "checkpointing_steps": 1,
        "checkpoints_total_limit": 3,
        "lr_warmup_steps": 0,
    },
)


def test_dmd_trainer_checkpoints_both_players_and_resumes(tmp_path, tiny_pipeline_dir, monkeypatch):
    """3 steps (generator on steps 0 and 2, critic every step); a crash in step 1 resumes to identical weights."""
    write_dataset(tmp_path / "a" / "dataset")
    recipe = write_recipe(tmp_path / "a.yaml", tmp_path / "a", tiny_pipeline_dir, **DMD_SECTIONS)
    final_a = run_train(recipe)
    ckpt = final_a.parent / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"} <= names, names
    critic_a = load_file(str(ckpt / "critic.safetensors"))
    assert critic_a and all(".lora_" in k for k in critic_a)
    assert any(float(v.abs().max()) > 0 for k, v in critic_a.items() if "lora_B" in k)  # the critic trained
    student_b = [v for k, v in weights(final_a).items() if "lora_B" in k]
    assert student_b and all(float(v.abs().max()) > 0 for v in student_b)  # the generator trained
    assert torch.load(ckpt / "optimizer.bin", weights_only=False)["state"]  # both optimizers have moments
    assert torch.load(ckpt / "optimizer_1.bin", weights_only=False)["state"]

    from distill.dmd import DMD as Algo

    real, calls = Algo.critic_loss, []

    def interrupted(self, batch):  # dies in step 1 (a critic-only step), after checkpoint-1
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("simulated crash")
        return real(self, batch)

    write_dataset(tmp_path / "b" / "dataset")
    recipe_b = write_recipe(tmp_path / "b.yaml", tmp_path / "b", tiny_pipeline_dir, **DMD_SECTIONS)
    monkeypatch.setattr(Algo, "critic_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(recipe_b)
    monkeypatch.setattr(Algo, "critic_loss", real)
    final_b = run_train(recipe_b, "train.resume_from_checkpoint=latest")
    assert max_diff(weights(final_a), weights(final_b)) == 0.0
    assert max_diff(weights(final_a.parent / "final_ema"), weights(final_b.parent / "final_ema")) == 0.0
    critic_b = load_file(str(final_b.parent / "checkpoint-3" / "critic.safetensors"))
    assert max_diff(critic_a, critic_b) == 0.0


def test_ode_regression_trainer_smoke(tmp_path, tiny_pipeline_dir):
    write_dataset(tmp_path / "out" / "dataset", trajectory_sigmas=[1.0, 0.75, 0.0])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        method={"name": "ode_regression", "ode_regression": {"frames_per_block": 2}},
        train={"max_steps": 2, "gradient_accumulation_steps": 1, "ema": False},
    )
    final = run_train(recipe)
    lora_b = [v for k, v in weights(final).items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)


def test_few_step_rollout_takes_its_shape_from_a_captions_only_batch(teacher):
    from distill.dmd import FewStepRollout

    torch.manual_seed(0)
    student = build_student(StudentConfig(name="s", kind="full", denoising_steps=[1000, 500]), teacher.pipe.transformer)
    rollout = FewStepRollout(student, [1.0, 0.5])
    full = make_batch(teacher)
    bare = Batch(
        x0=None,
        latent_shape=SHAPE,
        cond=full.cond,
        generators=[sample_generator(0, i) for i in range(2)],
        indices=full.indices,
        captions=full.captions,
    )
    with torch.no_grad():
        a, b = rollout(full), rollout(bare)
    assert b.shape == (2, *SHAPE) and torch.equal(a, b)  # x0's values never entered the rollout
    with pytest.raises(ValueError, match="needs latent_shape"):
        Batch(x0=None, cond=full.cond, generators=[], indices=[], captions=[])
