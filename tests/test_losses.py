"""Property tests of the training losses: flow matching, KD (output / feature / data), trajectory."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from core.flow import add_noise, sample_training_sigmas, shift_sigma, timestep
from core.lora import lora_parameters
from core.seeding import randint_per_sample, sample_generator
from distill.batch import Batch
from distill.flow_matching import FlowMatching, draw_sigma_noise, drop_condition, flow_matching_loss
from distill.kd import KD, block_outputs, feature_kd_loss, teacher_velocity
from distill.trajectory import Trajectory, nearest_states, trajectory_loss
from students.config import StudentConfig
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


def make_batch(teacher, n=2, seed=0, trajectory=None, sigmas=None) -> Batch:
    g = torch.Generator().manual_seed(1000 + seed)
    captions = ["a red cat moving left", "a blue square on white background", "a green dog"][:n]
    return Batch(
        x0=torch.randn(n, *SHAPE, generator=g),
        cond=teacher.encode(captions, "blurry noise"),
        generators=[sample_generator(seed, i) for i in range(n)],
        indices=list(range(n)),
        captions=captions,
        trajectory=trajectory,
        trajectory_sigmas=sigmas,
    )


def student_of(teacher, kind="full", **kw):
    torch.manual_seed(0)
    cfg = StudentConfig(name="s", kind=kind, lora_rank=4, lora_alpha=4.0, **kw)
    return build_student(cfg, teacher.pipe.transformer)


def perturb(params, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def assert_grads_only_on_trainable(student, teacher):
    trainable = {id(p) for p in student.trainable_parameters()}
    assert trainable
    for p in student.parameters():
        assert (p.grad is not None) == (id(p) in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.trainable_parameters())
    for p in teacher.pipe.transformer.parameters():
        assert p.grad is None or id(p) in trainable


# ---- flow maths against diffusers ------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sigma_schedule_matches_diffusers(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    # training sigmas: the shifted 1000-step grid
    grid = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(sched.sigmas.double().flip(0), shift_sigma(grid, shift), atol=1e-6, rtol=0)
    # sampling sigmas: shift of the scheduler's unshifted linspace
    sched.set_timesteps(8)
    lin = torch.linspace(1.0, sched.sigma_min, 8, dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas[:-1].double(), shift_sigma(lin, shift), atol=1e-6, rtol=0)
    # our training draw is the same map of u
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    u = torch.rand(64, generator=g2).clamp(1e-4, 1.0)
    torch.testing.assert_close(sample_training_sigmas((64,), shift, generator=g1), shift_sigma(u, shift))


def test_flow_matching_target_matches_diffusers_scheduler():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, *SHAPE, generator=g), torch.randn(2, *SHAPE, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    i = 2
    t, sigma, sigma_next = sched.timesteps[i], sched.sigmas[i], sched.sigmas[i + 1]
    x_t = add_noise(x0, eps, sigma)
    torch.testing.assert_close(x_t, sched.scale_noise(x0, t[None], eps), atol=1e-6, rtol=0)
    # with the exact target v = ε - x0, the Euler step lands on the same straight line
    sched.set_begin_index(i)
    x_next = sched.step(eps - x0, t, x_t, return_dict=False)[0]
    torch.testing.assert_close(x_next, add_noise(x0, eps, sigma_next), atol=1e-5, rtol=0)
    # the loss: zero for the oracle, E‖ε - x0‖² for the zero model
    s = torch.full((2,), float(sigma))
    oracle = lambda x, tt, c: eps - x0  # noqa: E731
    assert flow_matching_loss(oracle, x0, eps, s, None) == 0
    zero = lambda x, tt, c: torch.zeros_like(x)  # noqa: E731
    torch.testing.assert_close(flow_matching_loss(zero, x0, eps, s, None), ((eps - x0) ** 2).mean())


def test_flow_matching_draws_are_per_sample_and_dropout_uses_negative(teacher):
    batch = make_batch(teacher, n=3)
    seen = {}

    def model(x, t, c):
        seen.update(x=x, t=t, c=c)
        return torch.zeros_like(x)

    loss, logs = FlowMatching(FlowMatching.Config(cfg_dropout=0.5), student=model, teacher_shift=3.0).loss(batch)
    # the same draws, redone by hand from each sample's generator: σ, ε, then the dropout coin
    sig, eps, drop = [], [], []
    for j in range(3):
        g = sample_generator(0, j)
        sig.append(sample_training_sigmas((1,), 3.0, generator=g))
        eps.append(torch.randn(SHAPE, generator=g))
        drop.append(bool(torch.rand(1, generator=g) < 0.5))
    sig, eps = torch.cat(sig), torch.stack(eps)
    torch.testing.assert_close(seen["t"], timestep(sig))
    torch.testing.assert_close(seen["x"], add_noise(batch.x0, eps, sig))
    torch.testing.assert_close(loss, ((eps - batch.x0) ** 2).mean())
    assert 0 < sum(drop) < 3  # this seed drops some rows and keeps others
    for j in range(3):
        want = batch.cond.negative_embeds[j] if drop[j] else batch.cond.prompt_embeds[j]
        assert torch.equal(seen["c"][j], want)
    assert float(logs["cfg_dropped"]) == pytest.approx(sum(drop) / 3)


def test_drop_condition_zero_and_rejects_missing_negative(teacher):
    batch = make_batch(teacher)
    embeds, dropped = drop_condition(batch.generators, batch.cond, 0.0)
    assert embeds is batch.cond.prompt_embeds and not dropped.any()
    no_neg = teacher.encode(batch.captions, None)
    with pytest.raises(ValueError, match="cfg_dropout"):
        drop_condition(batch.generators, no_neg, 0.3)


def test_flow_matching_grads_reach_only_lora(teacher):
    student = student_of(teacher, "lora")
    try:
        loss, _ = FlowMatching(FlowMatching.Config(), student=student, teacher_shift=3.0).loss(make_batch(teacher))
        loss.backward()
        assert loss > 0
        assert_grads_only_on_trainable(student, teacher)
    finally:
        teacher.pipe.transformer.delete_adapters(student.adapter_names)


# ---- KD --------------------------------------------------------------------------------------------
def kd(teacher, student, guidance=1.0, **kw):
    blocks = student.transformers()[0].blocks
    return KD(KD.Config(guidance_scale=guidance, **kw), student=student, teacher=teacher, student_blocks=blocks)


def test_kd_zero_for_identical_student(teacher):
    student = student_of(teacher, "full")
    loss, logs = kd(teacher, student, feature_weight=1.0, layer_map={0: 0, 1: 1}).loss(make_batch(teacher))
    assert float(logs["loss/kd_output"]) == 0.0 and float(logs["loss/kd_feature"]) == 0.0
    assert float(loss.detach()) == 0.0
    # a perturbed copy is not zero, and its gradients reach only its own weights
    perturb(student.trainable_parameters())
    loss, logs = kd(teacher, student, feature_weight=1.0, layer_map={0: 0, 1: 1}).loss(make_batch(teacher))
    assert float(logs["loss/kd_output"]) > 0 and float(logs["loss/kd_feature"]) > 0
    loss.backward()
    assert_grads_only_on_trainable(student, teacher)


def test_kd_with_lora_sharing_the_teacher(teacher):
    batch = make_batch(teacher)
    x, t = batch.x0, torch.tensor([900.0, 300.0])
    before = teacher.velocity(x, t, batch.cond, 3.0)
    student = student_of(teacher, "lora")
    try:
        # lora_B = 0 at init: the student is the teacher
        assert float(kd(teacher, student).loss(batch)[0].detach()) == 0.0
        perturb(lora_parameters(teacher.pipe.transformer), std=0.3)
        # the teacher's answers ignore the adapters injected into its own module
        torch.testing.assert_close(teacher_velocity(teacher, x, t, batch.cond, 3.0), before, atol=0, rtol=0)
        loss, logs = kd(teacher, student, guidance=3.0, feature_weight=0.5, layer_map={1: 1}).loss(batch)
        assert float(logs["loss/kd_output"]) > 0 and float(logs["loss/kd_feature"]) > 0
        loss.backward()
        assert_grads_only_on_trainable(student, teacher)
        assert all(p.requires_grad for p in student.trainable_parameters())  # flags restored after teacher calls
    finally:
        teacher.pipe.transformer.delete_adapters(student.adapter_names)


def test_kd_output_term_is_guided_teacher_and_data_term_is_flow_matching(teacher):
    batch = make_batch(teacher)
    seen = {}

    def zero_student(x, tt, c):
        seen.update(x=x, t=tt)
        return torch.zeros_like(x)

    algo = KD(KD.Config(guidance_scale=3.0, data_weight=2.0), student=zero_student, teacher=teacher)
    loss, logs = algo.loss(batch)
    v_t = teacher.velocity(seen["x"], seen["t"], batch.cond, 3.0)
    torch.testing.assert_close(logs["loss/kd_output"], (v_t**2).mean())
    sigma, eps = draw_sigma_noise([sample_generator(0, j) for j in range(2)], batch.x0, teacher.cfg.shift, "uniform")
    torch.testing.assert_close(seen["x"], add_noise(batch.x0, eps, sigma))
    torch.testing.assert_close(logs["loss/kd_data"], ((eps - batch.x0) ** 2).mean())
    torch.testing.assert_close(loss, logs["loss/kd_output"] + 2.0 * logs["loss/kd_data"])
    # feature KD with CFG: features from the conditional branch, velocity still guided
    student = student_of(teacher, "full")
    _, logs_f = kd(teacher, student, guidance=3.0, feature_weight=1.0, layer_map={0: 0}).loss(batch)
    assert float(logs_f["loss/kd_feature"]) == 0.0 and float(logs_f["loss/kd_output"]) > 0


def test_feature_kd_closed_form_and_hooks(teacher):
    a = {0: torch.zeros(2, 3, 4), 1: torch.ones(2, 3, 4)}
    b = {0: torch.full((2, 3, 4), 2.0), 1: torch.ones(2, 3, 4)}
    torch.testing.assert_close(feature_kd_loss(a, b, {0: 0, 1: 1}), torch.tensor(2.0))  # (4 + 0) / 2
    torch.testing.assert_close(feature_kd_loss(a, b, {1: 0}), torch.tensor(1.0))
    blocks = teacher.pipe.transformer.blocks
    batch = make_batch(teacher)
    with block_outputs(blocks, [1]) as feats:
        teacher.velocity(batch.x0, torch.tensor([500.0, 500.0]), batch.cond, 1.0)
    assert list(feats) == [1] and feats[1].shape[0] == 2
    assert all(not b._forward_hooks for b in blocks)  # removed on exit


def test_kd_layer_map_errors(teacher):
    pruned = student_of(teacher, "pruned", keep_blocks=[1])
    with pytest.raises(ValueError, match=r"method\.kd\.layer_map: student block 5 .*1 blocks"):
        kd(teacher, pruned, feature_weight=1.0, layer_map={5: 0})
    with pytest.raises(ValueError, match=r"method\.kd\.layer_map: teacher block 7"):
        kd(teacher, pruned, feature_weight=1.0, layer_map={0: 7})
    with pytest.raises(ValueError, match="layer_map"):
        KD.Config(feature_weight=1.0)
    with pytest.raises(ValueError, match="all three KD weights are 0"):
        KD.Config(output_weight=0.0)
    # pruned [1] with map {0: 1}: same weights, different inputs -> a positive feature loss
    _, logs = kd(teacher, pruned, feature_weight=1.0, layer_map={0: 1}).loss(make_batch(teacher))
    assert float(logs["loss/kd_feature"]) > 0


# ---- trajectory ------------------------------------------------------------------------------------
def stored(teacher, n=2, sigmas=(1.0, 0.75, 0.4, 0.0)):
    g = torch.Generator().manual_seed(5)
    traj = torch.randn(n, len(sigmas), *SHAPE, generator=g)
    return traj, torch.tensor(sigmas).repeat(n, 1)


def test_trajectory_zero_for_endpoint_student_and_closed_form(teacher):
    traj, sig = stored(teacher)
    batch = make_batch(teacher, trajectory=traj, sigmas=sig)
    seen = {}

    def endpoint(x, t, c):  # v such that x - σ·v is exactly the stored endpoint
        seen.update(x=x, t=t)
        return (x - traj[:, -1]) / (t / 1000).view(-1, 1, 1, 1, 1)

    algo = Trajectory(Trajectory.Config(), student=endpoint, student_sigmas=[1.0, 0.76])
    loss, logs = algo.loss(batch)
    assert float(loss) < 1e-10
    # inputs are the stored states nearest the student's σ's, at their own σ
    picks = [[1.0, 0.76][i] for i in randint_per_sample([sample_generator(0, j) for j in range(2)], 2)]
    k = nearest_states(sig, torch.tensor(picks))
    torch.testing.assert_close(seen["t"], sig[torch.arange(2), k] * 1000)
    torch.testing.assert_close(seen["x"], traj[torch.arange(2), k])
    assert float(logs["sigma/gap_max"]) <= 0.01 + 1e-6
    # closed form: the zero-velocity student's loss is ‖x_σ - x0_T‖²
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    x_t, target = traj[:, 1], traj[:, -1]
    torch.testing.assert_close(
        trajectory_loss(zero, x_t, torch.tensor([0.75, 0.75]), None, target), ((x_t - target) ** 2).mean()
    )


def test_trajectory_never_picks_the_endpoint_and_checks_the_gap(teacher):
    sig = torch.tensor([[1.0, 0.5, 0.0]])
    assert nearest_states(sig, torch.tensor([0.01])).item() == 1
    traj, sig = stored(teacher, sigmas=(1.0, 0.4, 0.0))
    algo = Trajectory(Trajectory.Config(max_sigma_gap=0.05), student=lambda x, t, c: x, student_sigmas=[0.75])
    with pytest.raises(ValueError, match=r"data\.trajectory_steps: the student's σ=0\.75"):
        algo.loss(make_batch(teacher, trajectory=traj, sigmas=sig))
    with pytest.raises(ValueError, match="trajectory"):
        algo.loss(make_batch(teacher))


def test_trajectory_grads_reach_only_lora(teacher):
    traj, sig = stored(teacher)
    student = student_of(teacher, "lora", denoising_steps=[1000, 750])
    try:
        algo = Trajectory(Trajectory.Config(max_sigma_gap=0.2), student=student, student_sigmas=[1.0, 0.75])
        loss, _ = algo.loss(make_batch(teacher, trajectory=traj, sigmas=sig))
        loss.backward()
        assert_grads_only_on_trainable(student, teacher)
    finally:
        teacher.pipe.transformer.delete_adapters(student.adapter_names)
