"""DMD2's GAN term: the head on a critic block, the two non-saturating losses, their wiring into DMD's generator and
critic losses, the trainer keeping the generator's gradients out of the critic, and checkpoints with the head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_dmd import SHAPE, dmd, make_batch, teacher  # noqa: F401 (module-scoped fixture)
from test_trainer import run_train, write_dataset, write_recipe

from core.flow import add_noise, shift_sigma, timestep, velocity_target, x0_from_velocity
from core.seeding import rand_per_sample, randn_per_sample, sample_generator
from distill.dmd import dmd_generator_loss, gan_discriminator_loss, gan_generator_loss
from students.config import StudentConfig
from students.critic import GAN_HEAD_PREFIX, Critic
from students.student import build_student


def full_critic(teacher, gan_layer=1) -> Critic:
    torch.manual_seed(0)
    copy = build_student(StudentConfig(name="c", kind="full"), teacher.pipe.transformer).experts[0]
    return Critic(copy, None, gan_layer)


def test_gan_losses_are_the_non_saturating_ones():
    real = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    fake = torch.tensor([[-3.0, 1.0], [0.0, 4.0]])
    log_sigmoid = torch.nn.functional.logsigmoid
    torch.testing.assert_close(gan_generator_loss(fake), -log_sigmoid(fake).mean())
    torch.testing.assert_close(
        gan_discriminator_loss(real, fake), -log_sigmoid(real).mean() - torch.log1p(-torch.sigmoid(fake)).mean()
    )
    # a discriminator that is right by a wide margin has ~0 loss; the generator it fools has ~0 loss too
    assert float(gan_discriminator_loss(torch.full((2, 3), 30.0), torch.full((2, 3), -30.0))) < 1e-10
    assert float(gan_generator_loss(torch.full((2, 3), 30.0))) < 1e-10


def test_critic_head_reads_its_block_and_round_trips(teacher):
    critic = full_critic(teacher, gan_layer=0)
    batch = make_batch(teacher)
    x, t = batch.x0, torch.tensor([900.0, 300.0])
    v, logits = critic(x, t, batch.cond.prompt_embeds, return_logits=True)
    cfg = critic.transformer.config
    tokens = (SHAPE[1] // cfg.patch_size[0]) * (SHAPE[2] // cfg.patch_size[1]) * (SHAPE[3] // cfg.patch_size[2])
    assert logits.shape == (2, tokens) and logits.dtype == torch.float32
    torch.testing.assert_close(v, critic(x, t, batch.cond.prompt_embeds))  # the hook changes nothing
    assert not critic.transformer.blocks[0]._forward_hooks  # and is gone after the call
    # the logits see block 0's output: a later block does not move them, block 0 does
    with torch.no_grad():
        critic.transformer.blocks[-1].ffn.net[2].weight.add_(1.0)
        torch.testing.assert_close(critic(x, t, batch.cond.prompt_embeds, return_logits=True)[1], logits)
        critic.transformer.blocks[0].ffn.net[2].weight.add_(1.0)
        assert not torch.allclose(critic(x, t, batch.cond.prompt_embeds, return_logits=True)[1], logits)
    # the head trains with the critic and travels in its checkpoints
    head = list(critic.gan_head.parameters())
    assert all(any(p is q for q in critic.trainable_parameters()) for p in head)
    state = critic.trainable_state_dict()
    assert {GAN_HEAD_PREFIX + k for k in critic.gan_head.state_dict()} <= set(state)
    other = full_critic(teacher, gan_layer=0)
    other.load_trainable_state_dict(state)
    torch.testing.assert_close(
        other(x, t, batch.cond.prompt_embeds, return_logits=True)[1],
        critic(x, t, batch.cond.prompt_embeds, return_logits=True)[1],
    )
    with pytest.raises(ValueError, match="lacks a GAN head"):
        full_critic(teacher, gan_layer=0).load_trainable_state_dict(
            {k: v for k, v in state.items() if not k.startswith(GAN_HEAD_PREFIX)}
        )
    with pytest.raises(ValueError, match="GAN head"):
        full_critic(teacher, gan_layer=None)(x, t, batch.cond.prompt_embeds, return_logits=True)
    with pytest.raises(ValueError, match="gan_layer"):
        full_critic(teacher, gan_layer=len(critic.transformer.blocks))


def test_dmd_with_gan_adds_both_terms(teacher):
    critic = full_critic(teacher)
    sample = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    algo = dmd(
        teacher,
        critic,
        lambda b: sample,
        min_sigma=0.1,
        max_sigma=0.9,
        shift=2.0,
        gan_weight=0.5,
        gan_critic_weight=0.25,
    )
    batch = make_batch(teacher)
    loss, logs = algo.generator_loss(batch)
    loss.backward()
    # by hand, from each sample's stream: σ, ε'; the DMD term plus 0.5 · softplus(-D(x_σ)) with x_σ's graph to x0
    gens = [sample_generator(0, j) for j in range(2)]
    sigma = 0.1 + 0.8 * shift_sigma(rand_per_sample(gens), 2.0)
    noise = randn_per_sample(gens, SHAPE, "cpu")
    x0 = sample.detach().clone().requires_grad_(True)
    x_t = add_noise(x0, noise, sigma)
    emb = batch.cond.prompt_embeds
    with torch.no_grad():
        real = x0_from_velocity(x_t, teacher.velocity(x_t.detach(), timestep(sigma), batch.cond, 3.0), sigma)
    v_fake, logits = critic(x_t, timestep(sigma), emb, return_logits=True)
    fake = x0_from_velocity(x_t.detach(), v_fake.detach(), sigma)
    expected = dmd_generator_loss(x0, real, fake) + 0.5 * F.softplus(-logits).mean()
    (g,) = torch.autograd.grad(expected, x0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(sample.grad, g)
    x_t = add_noise(x0, noise, sigma)
    gan_only = torch.autograd.grad(
        0.5 * F.softplus(-critic(x_t, timestep(sigma), emb, return_logits=True)[1]).mean(), x0
    )[0]
    assert float(gan_only.abs().max()) > 1e-6  # the GAN term does reach the sample
    assert float(logs["loss/gan_generator"]) > 0
    # the critic loss: flow matching on sg(x0) + 0.25 · the discriminator loss, real = the batch's x0 re-noised at
    # the same σ with a fresh ε drawn after σ and ε'
    batch2 = make_batch(teacher)
    c_loss, c_logs = algo.critic_loss(batch2)
    gens = [sample_generator(0, j) for j in range(2)]
    sigma = 0.1 + 0.8 * shift_sigma(rand_per_sample(gens), 2.0)
    noise = randn_per_sample(gens, SHAPE, "cpu")
    real_noise = randn_per_sample(gens, SHAPE, "cpu")
    with torch.no_grad():
        v, lf = critic(add_noise(sample.detach(), noise, sigma), timestep(sigma), emb, return_logits=True)
        _, lr = critic(add_noise(batch2.x0, real_noise, sigma), timestep(sigma), emb, return_logits=True)
    fm = F.mse_loss(v, velocity_target(sample.detach(), noise))
    torch.testing.assert_close(c_loss.detach(), fm + 0.25 * gan_discriminator_loss(lr, lf))
    torch.testing.assert_close(c_logs["loss/critic"], fm)
    assert algo.generator_touches_critic
    assert not dmd(teacher, critic, lambda b: sample).generator_touches_critic


def test_critic_gradients_set_aside_keep_what_was_accumulated():
    from distill.trainer import _critic_grads_set_aside

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    (a.sum() * 2).backward()  # an earlier micro-batch's critic gradient on a; none on b
    with _critic_grads_set_aside([a, b]):
        assert a.grad is None and b.grad is None
        (a.sum() * 5 + b.sum()).backward()  # the generator's backward through the critic
    torch.testing.assert_close(a.grad, torch.full((2,), 2.0))
    assert b.grad is None
    with _critic_grads_set_aside(None):
        (a.sum()).backward()
    torch.testing.assert_close(a.grad, torch.full((2,), 3.0))


def test_dmd_trainer_with_gan_checkpoints_the_head(tmp_path, tiny_pipeline_dir, monkeypatch):
    import distill.trainer as trainer

    real, set_aside = trainer._critic_grads_set_aside, []

    def spy(params):  # the generator's backward runs with the critic's gradients set aside
        set_aside.append(params)
        return real(params)

    monkeypatch.setattr(trainer, "_critic_grads_set_aside", spy)
    write_dataset(tmp_path / "a" / "dataset")
    recipe = write_recipe(
        tmp_path / "a.yaml",
        tmp_path / "a",
        tiny_pipeline_dir,
        method={
            "name": "dmd",
            "dmd": {
                "generator_update_interval": 1,
                "critic": "full",
                "critic_learning_rate": 3e-3,
                "gan_weight": 0.1,
                "gan_layer": 0,
                "gan_learning_rate": 0.05,
            },
        },
        student={"denoising_steps": [1000, 500]},
        train={
            "max_steps": 2,
            "gradient_accumulation_steps": 2,
            "checkpointing_steps": 1,
            "checkpoints_total_limit": 2,
            "lr_warmup_steps": 0,
        },
    )
    final = run_train(recipe)
    assert len(set_aside) == 4 and all(p is not None and len(p) > 4 for p in set_aside)  # 2 steps x 2 micro-batches

    def head(step):
        critic = load_file(str(final.parent / f"checkpoint-{step}" / "critic.safetensors"))
        return {k: v for k, v in critic.items() if k.startswith(GAN_HEAD_PREFIX)}

    assert all(torch.isfinite(v).all() for v in head(2).values())
    assert any(not torch.equal(head(1)[k], head(2)[k]) for k in head(2))  # the head trains
    groups = torch.load(final.parent / "checkpoint-2" / "optimizer_1.bin", weights_only=False)["param_groups"]
    assert [g["initial_lr"] for g in groups] == [3e-3, 0.05] and len(groups[1]["params"]) == 4  # its own rate
    assert set(head(2)) == {GAN_HEAD_PREFIX + k for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}


def test_gan_at_its_own_low_sigma(teacher):
    """gan_max_sigma: the GAN's x are re-noised at σ_g ~ U(min_sigma, gan_max_sigma), drawn after σ and ε'."""
    critic = full_critic(teacher)
    sample = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    algo = dmd(
        teacher,
        critic,
        lambda b: sample,
        min_sigma=0.1,
        max_sigma=0.9,
        shift=2.0,
        gan_weight=0.5,
        gan_critic_weight=0.25,
        gan_max_sigma=0.2,
    )
    batch = make_batch(teacher)
    loss, _ = algo.generator_loss(batch)
    gens = [sample_generator(0, j) for j in range(2)]
    sigma = 0.1 + 0.8 * shift_sigma(rand_per_sample(gens), 2.0)
    noise = randn_per_sample(gens, SHAPE, "cpu")
    sigma_g = 0.1 + 0.1 * rand_per_sample(gens)
    noise_g = randn_per_sample(gens, SHAPE, "cpu")
    assert float(sigma_g.min()) >= 0.1 and float(sigma_g.max()) <= 0.2
    emb = batch.cond.prompt_embeds
    with torch.no_grad():
        x_t = add_noise(sample, noise, sigma)
        real = x0_from_velocity(x_t, teacher.velocity(x_t, timestep(sigma), batch.cond, 3.0), sigma)
        fake = x0_from_velocity(x_t, critic(x_t, timestep(sigma), emb), sigma)
        logits = critic(add_noise(sample, noise_g, sigma_g), timestep(sigma_g), emb, return_logits=True)[1]
    torch.testing.assert_close(
        loss.detach(), dmd_generator_loss(sample, real, fake).detach() + 0.5 * F.softplus(-logits).mean()
    )
    c_loss, _ = algo.critic_loss(make_batch(teacher))
    gens = [sample_generator(0, j) for j in range(2)]
    sigma = 0.1 + 0.8 * shift_sigma(rand_per_sample(gens), 2.0)
    noise = randn_per_sample(gens, SHAPE, "cpu")
    sigma_g = 0.1 + 0.1 * rand_per_sample(gens)
    noise_g, real_noise = randn_per_sample(gens, SHAPE, "cpu"), randn_per_sample(gens, SHAPE, "cpu")
    with torch.no_grad():
        v = critic(add_noise(sample, noise, sigma), timestep(sigma), emb)
        lf = critic(add_noise(sample, noise_g, sigma_g), timestep(sigma_g), emb, return_logits=True)[1]
        lr = critic(add_noise(batch.x0, real_noise, sigma_g), timestep(sigma_g), emb, return_logits=True)[1]
    fm = F.mse_loss(v, velocity_target(sample.detach(), noise))
    torch.testing.assert_close(c_loss.detach(), fm + 0.25 * gan_discriminator_loss(lr, lf))
    with pytest.raises(ValueError, match="gan_max_sigma"):
        dmd(teacher, critic, lambda b: sample, min_sigma=0.1, gan_max_sigma=0.05)


def test_gan_on_a_lora_critic_refuses_gradient_checkpointing(tmp_path, tiny_pipeline_dir):
    write_dataset(tmp_path / "a" / "dataset")
    recipe = write_recipe(
        tmp_path / "a.yaml",
        tmp_path / "a",
        tiny_pipeline_dir,
        method={"name": "dmd", "dmd": {"critic": "lora", "critic_lora_rank": 4, "gan_weight": 0.1}},
        student={"denoising_steps": [1000, 500]},
        train={"max_steps": 1, "gradient_checkpointing": True},
    )
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        run_train(recipe)
