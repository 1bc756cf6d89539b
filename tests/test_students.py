"""Students: pruned copies, LoRA on the shared teacher, timestep experts, the Student object, sampling."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from core.flow import shift_sigma
from core.lora import adapters_disabled, add_lora, lora_parameters, set_active_adapter
from students.config import StudentConfig
from students.experts import expert_index, expert_index_of_timestep, sigma_interval
from students.pruned import prune_transformer
from students.sampling import sample_student, student_sigmas
from students.student import Student, build_student
from teachers.tiny import tiny_transformer as build_tiny


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 2, 4, 4, generator=g)
    ehs = torch.randn(batch, 6, 32, generator=g)
    t = torch.linspace(950.0, 300.0, batch)
    return x, t, ehs


@torch.no_grad()
def run(module, x, t, ehs):
    return module(hidden_states=x, timestep=t, encoder_hidden_states=ehs, return_dict=False)[0]


def perturb_lora(module, adapter=None, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(module, adapter):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_cfg(**kw):
    return StudentConfig(**{"name": "s", "kind": "lora", "lora_rank": 4, "lora_alpha": 8.0, **kw})


# ---- pruned --------------------------------------------------------------------------------------------
def test_pruned_keeping_all_blocks_equals_teacher(tiny_transformer):
    x, t, ehs = inputs()
    ref = run(tiny_transformer, x, t, ehs)
    for keep in (None, [0, 1]):
        student = prune_transformer(tiny_transformer, keep)
        assert (run(student, x, t, ehs) - ref).abs().max() <= 1e-6
        # A copy, never shared storage with the teacher.
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(student.parameters(), tiny_transformer.parameters()))


def test_pruned_copies_the_chosen_blocks_and_changes_the_output(tiny_transformer):
    x, t, ehs = inputs()
    student = prune_transformer(tiny_transformer, [1])
    assert student.config.num_layers == 1 and len(student.blocks) == 1
    torch.testing.assert_close(student.blocks[0].attn1.to_q.weight, tiny_transformer.blocks[1].attn1.to_q.weight)
    torch.testing.assert_close(student.proj_out.weight, tiny_transformer.proj_out.weight)
    assert (run(student, x, t, ehs) - run(tiny_transformer, x, t, ehs)).abs().max() > 1e-3


def test_pruned_block_out_of_range_names_the_key(tiny_transformer):
    with pytest.raises(ValueError, match=r"student\.keep_blocks.*teacher has 2 blocks"):
        prune_transformer(tiny_transformer, [0, 2])


# ---- LoRA ----------------------------------------------------------------------------------------------
def test_lora_init_disabled_and_perturbed(tiny_transformer):
    x, t, ehs = inputs()
    ref = run(tiny_transformer, x, t, ehs)
    ptrs = {n: p.data_ptr() for n, p in tiny_transformer.named_parameters()}
    add_lora(tiny_transformer, 4, 8.0, ["attn1.to_q", "attn2.to_v", "ffn.net.2"], "student")
    assert torch.equal(run(tiny_transformer, x, t, ehs), ref)  # lora_B = 0 at init
    perturb_lora(tiny_transformer)
    assert (run(tiny_transformer, x, t, ehs) - ref).abs().max() > 1e-2
    with adapters_disabled(tiny_transformer):
        assert torch.equal(run(tiny_transformer, x, t, ehs), ref)  # the base IS the teacher
    assert (run(tiny_transformer, x, t, ehs) - ref).abs().max() > 1e-2  # re-enabled on exit
    trainable = {n for n, p in tiny_transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # A and B, 3 modules, 2 blocks
    # The base weights are the very tensors of the original transformer (one copy in memory).
    for n, p in tiny_transformer.named_parameters():
        if ".lora_" not in n:
            assert p.data_ptr() == ptrs[n.replace(".base_layer.", ".")]


def test_lora_targets_only_block_modules(tiny_transformer):
    add_lora(tiny_transformer, 2, 2.0, ["attn1.to_q"], "a")
    lora_modules = {n.split(".lora_")[0] for n, _ in tiny_transformer.named_parameters() if ".lora_" in n}
    assert lora_modules == {"blocks.0.attn1.to_q", "blocks.1.attn1.to_q"}
    # `linear_1` exists only in condition_embedder: the block-anchored regex must not match it.
    with pytest.raises(ValueError, match="student.lora_target_modules"):
        add_lora(tiny_transformer, 2, 2.0, ["linear_1"], "b")


def test_lora_gradients_reach_only_adapters_with_checkpointing(tiny_transformer):
    student = build_student(lora_cfg(lora_target_modules=["attn1.to_q", "ffn.net.0.proj"]), tiny_transformer)
    perturb_lora(tiny_transformer)
    student.enable_gradient_checkpointing()
    student.train()
    x, t, ehs = inputs()
    student(x, t, ehs).square().mean().backward()
    for n, p in tiny_transformer.named_parameters():
        if ".lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


# ---- timestep experts ----------------------------------------------------------------------------------
def test_expert_index_at_boundaries():
    b = [0.875]
    assert [expert_index(s, b) for s in (1.0, 0.9, 0.875, 0.8749, 0.0)] == [0, 0, 0, 1, 1]
    b3 = [0.9, 0.5]
    sig = torch.tensor([1.0, 0.9, 0.6, 0.5, 0.4999, 0.01])
    assert expert_index(sig, b3).tolist() == [0, 0, 1, 1, 2, 2]
    assert sigma_interval(1, b3) == (0.5, 0.9)
    # Same rule as Wan2.2's pipeline: `transformer` (expert 0) iff t >= boundary_ratio * 1000.
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(40)
    ts = torch.cat([sched.timesteps, torch.tensor([875.0])])
    assert torch.equal(expert_index_of_timestep(ts, b) == 0, ts >= 0.875 * 1000)


def test_lora_experts_route_by_sigma_and_reassemble_the_batch(tiny_transformer):
    student = build_student(lora_cfg(experts=2, expert_boundaries=[0.5]), tiny_transformer)
    assert student.adapter_names == ["expert_0", "expert_1"]
    perturb_lora(tiny_transformer, "expert_1", seed=3)
    x, _, ehs = inputs(batch=3)
    t = torch.tensor([900.0, 200.0, 500.0])  # experts 0, 1, 0 (σ = 0.5 sits on the boundary: high noise)
    with torch.no_grad():
        out = student(x, t, ehs)
    with adapters_disabled(tiny_transformer):
        base = run(tiny_transformer, x, t, ehs)
    set_active_adapter(tiny_transformer, "expert_1")
    e1 = run(tiny_transformer, x, t, ehs)
    torch.testing.assert_close(out[[0, 2]], base[[0, 2]], atol=1e-5, rtol=0)  # expert_0 is still at init
    torch.testing.assert_close(out[1], e1[1], atol=1e-5, rtol=0)
    assert (out[1] - base[1]).abs().max() > 1e-2
    # All experts stay trainable after switching (peft's set_adapter alone would freeze the inactive one).
    assert all(p.requires_grad for p in student.trainable_parameters())
    assert len(student.trainable_parameters()) == 2 * 10 * 2 * 2  # experts x modules x (A, B) x blocks


def test_pruned_experts_are_independent_copies(tiny_transformer):
    cfg = StudentConfig(name="p", kind="pruned", keep_blocks=[1], experts=2, expert_boundaries=[0.5])
    tiny_transformer.requires_grad_(False)  # a frozen teacher, as teachers/ leaves it
    student = build_student(cfg, tiny_transformer)
    assert len(student.experts) == 2 and student.experts[0] is not student.experts[1]
    with torch.no_grad():
        student.experts[1].proj_out.bias.add_(1.0)
    x, _, ehs = inputs(batch=2)
    t = torch.tensor([800.0, 100.0])
    with torch.no_grad():
        out = student(x, t, ehs)
    torch.testing.assert_close(out[:1], run(student.experts[0], x[:1], t[:1], ehs[:1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1:], run(student.experts[1], x[1:], t[1:], ehs[1:]), atol=1e-6, rtol=0)
    assert student.trainable_parameters() and all(p.requires_grad for p in student.trainable_parameters())
    assert not any(p.requires_grad for p in tiny_transformer.parameters())


# ---- the Student object: build, save, load -------------------------------------------------------------
def test_lora_student_shares_the_teacher_and_round_trips(tmp_path, tiny_transformer):
    cfg = lora_cfg(experts=2, expert_boundaries=[0.5])
    student = build_student(cfg, tiny_transformer)
    assert student.transformer is tiny_transformer and student.shares_teacher
    perturb_lora(tiny_transformer, seed=5)
    x, t, ehs = inputs()
    with torch.no_grad():
        out = student(x, t, ehs)
    student.save_pretrained(tmp_path / "s")
    fresh = build_tiny()
    with torch.no_grad():
        with student.teacher_mode():
            teacher_out = student(x, t, ehs)
        torch.testing.assert_close(teacher_out, run(fresh, x, t, ehs), atol=1e-5, rtol=0)
        loaded = Student.from_pretrained(tmp_path / "s", fresh, cfg)
        assert torch.equal(loaded(x, t, ehs), out)
    for key, kw in [("lora_rank", {"lora_rank": 2}), ("kind", {"kind": "full"}), ("experts", {})]:
        bad = (
            lora_cfg(**kw)
            if key != "kind"
            else StudentConfig(name="s", kind="full", experts=2, expert_boundaries=[0.5])
        )
        with pytest.raises(ValueError, match=rf"student\.{key}"):
            Student.from_pretrained(tmp_path / "s", build_tiny(), bad)
    with pytest.raises(ValueError, match="3 blocks"):
        Student.from_pretrained(tmp_path / "s", build_tiny(num_layers=3), cfg)
    # trainable_state_dict round trip (what the trainer checkpoints).
    sd = student.trainable_state_dict()
    assert sd and all(k.startswith(("expert_0.", "expert_1.")) and ".lora_" in k for k in sd)
    other = build_student(cfg, build_tiny())
    other.load_trainable_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(other(x, t, ehs), out)


def test_pruned_student_round_trips_and_rejects_other_blocks(tmp_path, tiny_transformer):
    cfg = StudentConfig(name="p", kind="pruned", keep_blocks=[1])
    student = build_student(cfg, tiny_transformer)
    with torch.no_grad():
        student.experts[0].proj_out.bias.add_(0.5)
    student.save_pretrained(tmp_path / "p")
    x, t, ehs = inputs()
    loaded = Student.from_pretrained(tmp_path / "p", tiny_transformer, cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ehs), student(x, t, ehs))
    with pytest.raises(ValueError, match=r"student\.keep_blocks.*\[1\].*\[0, 1\]"):
        other = StudentConfig(name="p", kind="pruned", keep_blocks=[0, 1])
        Student.from_pretrained(tmp_path / "p", tiny_transformer, other)


def test_bad_configs_fail_fast(tiny_transformer):
    with pytest.raises(ValueError, match="experts: kind=causal supports a single expert"):
        StudentConfig(name="c", kind="causal", experts=2, expert_boundaries=[0.5])
    with pytest.raises(ValueError, match="keep_blocks: only used by kind=pruned"):
        StudentConfig(name="x", kind="lora", keep_blocks=[0])
    with pytest.raises(ValueError, match="lora_alpha"):
        StudentConfig(name="x", kind="lora", lora_alpha=0.0)


# ---- sampling ------------------------------------------------------------------------------------------
class ExactFlow:
    """v = (x - x0)/σ: the exact velocity of the straight path towards a known x0 (v = ε - x0)."""

    def __init__(self, x0):
        self.x0, self.calls = x0, []

    def __call__(self, x, t, ehs):
        self.calls.append(t.clone())
        return (x - self.x0) / (t / 1000).view(-1, 1, 1, 1, 1)


def test_renoise_sampler_recovers_x0_and_uses_fresh_noise():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 4, 2, 4, 4, generator=g)
    ehs = torch.zeros(2, 3, 8)
    model = ExactFlow(x0)
    torch.testing.assert_close(sample_student(model, ehs, None, noise, [1.0]), x0, atol=1e-6, rtol=0)
    sig = [1.0, 0.75, 0.5, 0.25]
    out = sample_student(model, ehs, None, noise, sig, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert [c[0].item() for c in model.calls[1:]] == [1000.0, 750.0, 500.0, 250.0]

    # Closed form with a constant velocity c: x0_i = x_i - σ_i·c, x_{i+1} = (1-σ_{i+1})·x0_i + σ_{i+1}·ε_i.
    c = torch.full_like(noise, 0.3)
    gen = torch.Generator().manual_seed(7)
    out = sample_student(lambda x, t, e: c, ehs, None, noise, sig[:2], generator=gen)
    eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
    x1 = 0.25 * (noise - c) + 0.75 * eps
    torch.testing.assert_close(out, x1 - 0.75 * c)


def test_euler_sampler_and_cfg_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 4, 2, 4, 4, generator=g)
    cfg = StudentConfig(name="m", kind="lora", num_inference_steps=5)
    sigmas = student_sigmas(cfg, teacher_shift=3.0, teacher_steps=50)
    assert len(sigmas) == 6 and sigmas[-1] == 0.0
    out = sample_student(ExactFlow(x0), torch.zeros(1, 3, 8), None, noise, sigmas, mode="euler")
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)  # Euler is exact on a straight path
    # CFG, diffusers' convention: v = v_u + w (v_c - v_u) with v = mean of the embedding.
    cond, neg = torch.full((1, 3, 8), 2.0), torch.full((1, 3, 8), -1.0)
    model = lambda x, t, e: torch.ones_like(x) * e.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)  # noqa: E731
    out = sample_student(model, cond, neg, noise, [1.0, 0.0], guidance=3.0, mode="euler")
    torch.testing.assert_close(out, noise - (-1.0 + 3.0 * 3.0))
    with pytest.raises(ValueError, match="negative"):
        sample_student(model, cond, None, noise, [1.0, 0.0], guidance=3.0, mode="euler")


def test_student_sigmas():
    steps = StudentConfig(name="f", kind="lora", denoising_steps=[1000, 750, 500, 250])
    assert student_sigmas(steps, 5.0, 50) == pytest.approx([shift_sigma(s, 5.0) for s in (1.0, 0.75, 0.5, 0.25)])
    steps.warp_denoising_steps = False
    assert student_sigmas(steps, 5.0, 50) == [1.0, 0.75, 0.5, 0.25]
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(7)
    assert student_sigmas(StudentConfig(name="m", kind="lora"), 3.0, 7) == sched.sigmas.tolist()
