"""DMD2: distribution matching distillation with a learned critic (Yin et al. 2024, "Improved Distribution
Matching Distillation for Fast Image Synthesis"; DMD: Yin et al. 2023, eqs. 7-8).

A few-step student G maps noise to samples x0 = G(ε). Re-noise them, x_σ = (1-σ)·sg(x0) + σ·ε', and compare
two denoisers at x_σ: the frozen teacher with CFG (the "real score", x0_real) and a critic trained on the
student's own samples (the "fake score", x0_fake). With x0 = x_σ - σ·v (DESIGN.md §3):

    grad = (x0_fake - x0_real) / mean_{C,F,H,W} |x0 - x0_real|              (DMD eq. 7, normalised by eq. 8)
    L_G  = ½·‖x0 - sg(x0 - grad)‖²  (mean over all elements)  ⇒  ∂L_G/∂x0 = grad / numel(x0)
    L_C  = ‖ v_C(x_σ, 1000σ, c) - (ε' - sg(x0)) ‖²                          (flow matching on detached samples)

The generator descends the KL between its distribution and the teacher's; the critic tracks the generator's
distribution. Two optimizers (TTUR): the critic updates every trainer step, the generator every
`generator_update_interval`-th (DMD2 §4.1). Not included: DMD's regression loss (DMD2 drops it).

GAN (DMD2 §4.3, `gan_weight` > 0): a classifier head on one critic block (`students.critic.GANHead`) tells the
batch's clean latents x_real (the dataset's, or rendered toy-world clips) from the student's samples, both re-noised
at the same σ; non-saturating losses, per token, averaged:
    L_C += gan_critic_weight · (softplus(-D(x_real,σ)) + softplus(D(sg(x0),σ)))
    L_G += gan_weight · softplus(-D(x0,σ))         (the gradient reaches x0 through the critic's frozen features)
With `gan_max_sigma` the GAN uses its own σ_g ~ U(min_sigma, gan_max_sigma) instead of DMD's σ.
The fake score then judges the student against real data too, not only against the teacher: DMD2 credits this for
students that beat their teacher (its FID below the teacher's).

Where x0 comes from is pluggable (`rollout`): `FewStepRollout` samples a bidirectional few-step student;
`self_forcing` plugs in its causal chunk-by-chunk rollout.

Randomness, per sample from its own generator and in this order: the rollout's draws (initial noise, one
fresh noise per re-noising, the exit step), then σ, then ε'; with a GAN then σ_g and ε_g (gan_max_sigma set), and
in the critic's loss ε of x_real. Hence N processes × batch b equal 1 × N·b.
CFG is diffusers' convention, v = v_u + w·(v_c - v_u): Self-Forcing's `real_guidance_scale` g is w = g + 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from core.flow import add_noise, shift_sigma, timestep, velocity_target, x0_from_velocity
from core.seeding import rand_per_sample, randint_per_sample, randn_per_sample
from distill.batch import Batch
from distill.flow_matching import Model, flow_matching_loss
from distill.kd import teacher_velocity
from students.sampling import student_sigmas

Rollout = Callable[[Batch], torch.Tensor]
"""`rollout(batch) -> x0 [B, C, F, H, W]`: the student's samples for the batch's prompts, keeping the graph where
the student should learn; it draws from `batch.generators` and takes its shape from `batch.shape` (x0 may be None:
`train.data_source: prompts`)."""

NORMALISER_MIN = 1e-6
"""Lower clamp of the per-sample normaliser mean|x0 - x0_real| (a sample equal to the teacher's x0 gives 0)."""


def dmd_gradient(
    x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, group_frames: int | None = None
) -> torch.Tensor:
    """grad = (x0_fake - x0_real) / max(mean_{C,F,H,W} |x0 - x0_real|, NORMALISER_MIN), float32, no graph.

    x0, x0_real, x0_fake: [B, C, F, H, W]; the normaliser is one number per sample (DMD eq. 8), or with
    `group_frames` = n one per sample and group of n consecutive frames (a causal student's chunk: LongLive), the
    mean then taken over C and the group's frames, H, W.
    """
    with torch.no_grad():
        x0, real = x0.detach().float(), x0_real.float()
        err = (x0 - real).abs()
        if group_frames is None:
            normaliser = err.mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
        else:
            b, c, f, h, w = err.shape
            if f % group_frames:
                raise ValueError(f"dmd_gradient: {f} frames are not whole groups of {group_frames}")
            per_group = err.view(b, c, f // group_frames, group_frames, h, w).mean(dim=(1, 3, 4, 5))  # [B, G]
            normaliser = per_group.repeat_interleave(group_frames, dim=1).view(b, 1, f, 1, 1)
        return torch.nan_to_num((x0_fake.float() - real) / normaliser.clamp_min(NORMALISER_MIN))


def dmd_generator_loss(
    x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, group_frames: int | None = None
) -> torch.Tensor:
    """L_G = ½·mean (x0 - sg(x0 - grad))², grad = `dmd_gradient` (with `group_frames`); ∂L_G/∂x0 = grad / numel(x0).

    x0: the student's samples [B, C, F, H, W] (with grad); x0_real: the teacher's guided x0 prediction at the
    re-noised x_σ; x0_fake: the critic's x0 prediction at the same x_σ (both without grad). float32 scalar.
    The loss value is ½·mean grad², a diagnostic only: what trains the student is its gradient.
    """
    grad = dmd_gradient(x0, x0_real, x0_fake, group_frames)
    x0 = x0.float()
    return 0.5 * F.mse_loss(x0, (x0.detach() - grad))


def dmd_critic_loss(
    critic: Model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor
) -> torch.Tensor:
    """L_C = flow matching of the critic on the DETACHED student samples x0 [B, C, F, H, W] (no gradient
    reaches the student): `flow_matching_loss(critic, sg(x0), ε, σ, c)`; noise like x0, sigma [B] or [B, F]. Frames
    at σ = 0 (a given clean frame, never re-noised: image-to-video) are left out: their target ε cannot be known."""
    weight = (sigma > 0).float() if sigma.ndim == 2 and bool((sigma == 0).any()) else None
    return flow_matching_loss(critic, x0.detach(), noise, sigma, embeds, frame_weight=weight)


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss, mean softplus(-D(x0)) over samples and tokens."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss, mean softplus(-D(real)) + mean softplus(D(fake))."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def exit_step_rollout(
    student: Model,
    embeds: torch.Tensor,
    noise: torch.Tensor,
    renoise: list[torch.Tensor],
    sigmas: list[float],
    exit_steps: torch.Tensor,
) -> torch.Tensor:
    """Few-step sampling (`students.sampling`'s renoise mode) keeping the graph of ONE step per sample.

    noise: x at σ_0, [B, C, F, H, W]; renoise: n-1 fresh noises like it; sigmas: σ_0 > ... > σ_{n-1} > 0;
    exit_steps: [B] int in [0, n). Sample j's result is the student's x0 prediction at its exit step k_j
    (Self-Forcing's exit step: later steps are skipped, so every step of the schedule gets trained):
        1. no grad: x_0 = noise; x0_i = x_i - σ_i·v(x_i, 1000σ_i); x_{i+1} = (1-σ_{i+1})·x0_i + σ_{i+1}·ε_i
        2. grad:    x0_j = x_{k_j} - σ_{k_j}·v(x_{k_j}, 1000σ_{k_j})   (one batched forward, per-sample t)
    Always n-1 forwards without grad and one with it, whatever the exit steps: every rank runs the same
    forwards (DDP syncs buffers per forward). `students.sampling.sample_student` can't be reused: it keeps
    no intermediate states.
    """
    n, rows = len(sigmas), torch.arange(noise.shape[0], device=noise.device)
    if len(renoise) != n - 1:
        raise ValueError(f"exit_step_rollout: {n} steps need {n - 1} re-noising draws, got {len(renoise)}")
    sig = torch.tensor(sigmas, dtype=torch.float32, device=noise.device)
    states = [noise]
    with torch.no_grad():
        for i in range(n - 1):
            x = states[-1]
            t = timestep(sig[i].expand(x.shape[0]))
            x0 = x0_from_velocity(x, student(x, t, embeds), sigmas[i])
            states.append(add_noise(x0, renoise[i], sigmas[i + 1]))
    x_exit = torch.stack(states, dim=1)[rows, exit_steps]
    s = sig[exit_steps]
    return x0_from_velocity(x_exit, student(x_exit, timestep(s), embeds), s)


class FewStepRollout:
    """`Rollout` of a bidirectional few-step student from pure noise (data-free, DMD2 §4.5 "backward simulation")."""

    def __init__(self, student: Model, sigmas: list[float], exit_step: Literal["random", "last"] = "random"):
        """`sigmas`: the student's denoising levels (`students.sampling.student_sigmas`), all > 0."""
        if not sigmas or any(s <= 0 for s in sigmas):
            raise ValueError(
                f"student.denoising_steps: DMD samples the student at every σ, all must be > 0; got σ's {sigmas}"
            )
        self.student, self.sigmas, self.exit_step = student, list(sigmas), exit_step

    def __call__(self, batch: Batch) -> torch.Tensor:
        # 1. per sample: the initial noise, one fresh noise per re-noising, then the exit step
        shape, device, n = batch.shape, batch.device, len(self.sigmas)
        noise = randn_per_sample(batch.generators, shape, device)
        renoise = [randn_per_sample(batch.generators, shape, device) for _ in range(n - 1)]
        if self.exit_step == "random":
            exits = randint_per_sample(batch.generators, n)
        else:
            exits = [n - 1] * len(batch)
        # 2. sample, keeping the graph of each sample's exit step only
        exits = torch.tensor(exits, dtype=torch.long, device=device)
        return exit_step_rollout(self.student, batch.cond.prompt_embeds, noise, renoise, self.sigmas, exits)


class DMD:
    """DMD2 generator and critic losses (see the module docstring); the trainer steps two optimizers."""

    @dataclass(kw_only=True)
    class Config:
        guidance_scale: float | None = None
        """Teacher CFG w for the real score (diffusers' convention, 1 = none); None uses `teacher.guidance_scale`
        (and `teacher.guidance_scale_2` on a two-expert teacher's low-noise expert)."""
        generator_update_interval: int = 5
        """The critic updates every step, the generator on steps 0, k, 2k, ... (DMD2 and Self-Forcing use 5)."""
        critic_learning_rate: float | None = None
        """The critic's AdamW learning rate; None uses `train.learning_rate`. Same scheduler and warmup."""
        critic_after_generator: bool = False
        """On the generator's steps, the critic's loss and update come after the generator's update, its rollout
        from the updated generator (Self-Forcing's order); False: the critic's loss follows the generator's
        backward on each micro-batch, both before either update."""
        critic: Literal["lora", "full"] = "lora"
        """`lora`: adapter `critic` on the teacher's own transformer (no second copy of the weights; a LoRA student
        shares that base too); `full`: a trainable full copy of the teacher's transformer (Self-Forcing's
        fake_score). Both start equal to the teacher."""
        critic_lora_rank: int = 32
        """Rank (and alpha) of the `lora` critic, on `student.lora_target_modules`."""
        min_sigma: float = 0.02
        max_sigma: float = 0.98
        """Re-noising levels σ = min_sigma + (max_sigma - min_sigma)·shift(u), u ~ U(0, 1);
        DMD2 uses t ∈ [0.02, 0.98]."""
        shift: float | None = None
        """Shift of the re-noising levels; None uses `teacher.shift`."""
        exit_step: Literal["random", "last"] = "random"
        """`FewStepRollout`: which step keeps the graph, per sample: a random one (Self-Forcing) or the last."""
        gan_weight: float = 0.0
        """Weight of the generator's GAN loss (module docstring); 0 = no GAN head. DMD2 uses 3e-3 to 5e-3."""
        gan_critic_weight: float = 1.0e-2
        """Weight of the head's discriminator loss in the critic's loss (DMD2: 1e-2)."""
        gan_learning_rate: float | None = None
        """The GAN head's learning rate; None: the critic's. The head starts from scratch, the critic from the
        teacher, so the head may need a larger one."""
        gan_max_sigma: float | None = None
        """None: the GAN judges x_σ at DMD's σ (DMD2; one critic forward serves both). A value: at its own σ_g ~
        U(min_sigma, gan_max_sigma), where blur and fine detail are still visible (one more critic forward in the
        generator's loss and in the critic's)."""
        gan_layer: int | None = None
        """The critic block whose output feeds the GAN head; None: the middle one (len(blocks) // 2)."""

        def __post_init__(self):
            if self.generator_update_interval < 1:
                raise ValueError(f"generator_update_interval: must be >= 1, got {self.generator_update_interval}")
            if self.critic_learning_rate is not None and self.critic_learning_rate <= 0:
                raise ValueError(f"critic_learning_rate: must be > 0 or null, got {self.critic_learning_rate}")
            if self.critic_lora_rank < 1:
                raise ValueError(f"critic_lora_rank: must be >= 1, got {self.critic_lora_rank}")
            if not 0.0 < self.min_sigma < self.max_sigma <= 1.0:
                raise ValueError(
                    f"min_sigma: need 0 < min_sigma < max_sigma <= 1, got {self.min_sigma} and "
                    f"max_sigma {self.max_sigma}"
                )
            if self.shift is not None and self.shift <= 0:
                raise ValueError(f"shift: must be > 0 or null, got {self.shift}")
            if self.gan_learning_rate is not None and self.gan_learning_rate <= 0:
                raise ValueError(f"gan_learning_rate: must be > 0 or null, got {self.gan_learning_rate}")
            if self.gan_max_sigma is not None and not self.min_sigma < self.gan_max_sigma <= 1.0:
                raise ValueError(
                    f"gan_max_sigma: must be in (min_sigma={self.min_sigma}, 1] or null, got {self.gan_max_sigma}"
                )
            if self.gan_weight < 0 or self.gan_critic_weight <= 0:
                raise ValueError(
                    f"gan_weight: must be >= 0 and gan_critic_weight > 0, got {self.gan_weight} and "
                    f"{self.gan_critic_weight}"
                )

    two_player = True
    """Trains a critic beside the student (`generator_loss` / `critic_loss`) instead of one `loss`."""
    needs_trajectory = False
    """Reads the teacher's stored ODE states (the dataset's `trajectory` column)."""
    data_free = True
    """Can train from captions alone (`train.data_source: prompts`)."""
    queries_teacher = True
    """Runs the teacher in its loss while the student's graph is alive (the memory plan counts that forward)."""
    student_kinds = None
    """The student kinds it trains; None: every kind."""

    @classmethod
    def from_recipe(cls, recipe, *, teacher, student, unwrapped, critic=None, num_processes: int = 1) -> DMD:
        if not recipe.student.denoising_steps:
            raise ValueError(
                "student.denoising_steps: method dmd trains a few-step student; set its steps, "
                "e.g. [1000, 750, 500, 250]"
            )
        assert critic is not None, "dmd needs the critic (build_critic)"
        sigmas = student_sigmas(recipe.student, teacher.cfg.shift, teacher.cfg.num_inference_steps)
        rollout = FewStepRollout(student, sigmas, recipe.method.dmd.exit_step)
        return cls(recipe.method.dmd, teacher=teacher, critic=critic, rollout=rollout)

    def __init__(self, config: DMD.Config, *, teacher, critic: Model, rollout: Rollout):
        """`teacher`: a `WanTeacher` (frozen); `critic`: the trainable fake score, called as a `Model`;
        `rollout`: the student's samples with graph (e.g. `FewStepRollout(student, sigmas)`)."""
        self.config, self.teacher, self.critic, self.rollout = config, teacher, critic, rollout
        self.shift = teacher.cfg.shift if config.shift is None else config.shift

    @property
    def generator_touches_critic(self) -> bool:
        """True when the generator loss backpropagates through the critic (the GAN term): the trainer then keeps
        those gradients out of the critic's update."""
        return self.config.gan_weight > 0

    def normaliser_frames(self) -> int | None:
        """Frames per group of the DMD gradient's normaliser (`dmd_gradient`); None: one per sample."""
        return None

    def trains_generator(self, step: int) -> bool:
        """Whether trainer step `step` (0-based) also updates the generator."""
        return step % self.config.generator_update_interval == 0

    def draw_sigma_noise(self, generators: list[torch.Generator], x0: torch.Tensor):
        """Per sample, in this order: σ [B] in [min_sigma, max_sigma] (see Config), then ε' like x0."""
        c = self.config
        u = rand_per_sample(generators, x0.device)
        sigma = c.min_sigma + (c.max_sigma - c.min_sigma) * shift_sigma(u, self.shift)
        return sigma, randn_per_sample(generators, tuple(x0.shape[1:]), x0.device)

    def draw_gan_sigma_noise(self, generators: list[torch.Generator], x0: torch.Tensor):
        """The GAN's own levels (gan_max_sigma set), per sample after every other draw: σ_g [B] ~ U(min_sigma,
        gan_max_sigma), then ε_g like x0."""
        c = self.config
        sigma = c.min_sigma + (c.gan_max_sigma - c.min_sigma) * rand_per_sample(generators, x0.device)
        return sigma, randn_per_sample(generators, tuple(x0.shape[1:]), x0.device)

    def generator_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # 1. roll out the student from noise (graph on the exit step only)
        x0 = self.rollout(batch)
        # 2. re-noise its samples: x_σ = (1-σ)·sg(x0) + σ·ε'
        sigma, noise = self.draw_sigma_noise(batch.generators, x0)
        x_t, t = add_noise(x0.detach().float(), noise, sigma), timestep(sigma)
        # 3. the real score (teacher with CFG) and the fake score (critic), as x0 predictions, without grad
        with torch.no_grad():
            v_real = teacher_velocity(self.teacher, x_t, t, batch.cond, self.config.guidance_scale)
            x0_real = x0_from_velocity(x_t, v_real, sigma)
        c, embeds = self.config, batch.cond.prompt_embeds
        if c.gan_weight > 0 and c.gan_max_sigma is None:
            # the same x_σ with its graph to x0: one critic forward gives the fake score and the GAN logits
            v_fake, logits = self.critic(add_noise(x0.float(), noise, sigma), t, embeds, return_logits=True)
            x0_fake = x0_from_velocity(x_t, v_fake.detach().float(), sigma)
        else:
            with torch.no_grad():
                x0_fake = x0_from_velocity(x_t, self.critic(x_t, t, embeds).float(), sigma)
            if c.gan_weight > 0:  # the GAN's own low σ_g, with its graph to x0
                sigma_g, noise_g = self.draw_gan_sigma_noise(batch.generators, x0)
                logits = self.critic(
                    add_noise(x0.float(), noise_g, sigma_g), timestep(sigma_g), embeds, return_logits=True
                )[1]
        # 4. the DMD loss: its gradient w.r.t. x0 is the normalised score difference (+ the GAN term)
        group = self.normaliser_frames()
        loss = dmd_generator_loss(x0, x0_real, x0_fake, group)
        grad = dmd_gradient(x0, x0_real, x0_fake, group)
        logs = {"loss/dmd": loss.detach(), "dmd/grad_abs_mean": grad.abs().mean(), "dmd/sigma_mean": sigma.mean()}
        if c.gan_weight > 0:
            gan = gan_generator_loss(logits)
            loss = loss + c.gan_weight * gan
            logs["loss/gan_generator"] = gan.detach()
        return loss, logs

    def critic_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # 1. the student's samples, without grad
        with torch.no_grad():
            x0 = self.rollout(batch).float()
        # 2. σ and ε' drawn as for the generator (the critic must be right where it is queried)
        sigma, noise = self.draw_sigma_noise(batch.generators, x0)
        # 3. flow matching of the critic on them
        if self.config.gan_weight <= 0:
            loss = dmd_critic_loss(self.critic, x0, noise, sigma, batch.cond.prompt_embeds)
            return loss, {"loss/critic": loss.detach()}
        # 3'. with a GAN: the batch's clean latents, re-noised with their own ε, are the real ones. With
        # gan_max_sigma null, at the critic's σ (its flow-matching forward also gives the fake logits); else fake and
        # real at the GAN's own σ_g
        embeds, real = batch.cond.prompt_embeds, batch.x0.float()
        if self.config.gan_max_sigma is None:
            if sigma.ndim == 2 and real.shape[2] != x0.shape[2]:
                raise ValueError(
                    f"gan_weight: with frame_wise_timesteps the real clips ({real.shape[2]} latent "
                    f"frames) must be as long as the scored rollout ({x0.shape[2]}); set dmd_window to "
                    "the teacher's length in chunks, or set gan_max_sigma"
                )
            v, logits_fake = self.critic(add_noise(x0, noise, sigma), timestep(sigma), embeds, return_logits=True)
            loss, sigma_g = F.mse_loss(v.float(), velocity_target(x0, noise).float()), sigma
        else:
            loss = dmd_critic_loss(self.critic, x0, noise, sigma, embeds)
            sigma_g, noise_g = self.draw_gan_sigma_noise(batch.generators, x0)
            logits_fake = self.critic(add_noise(x0, noise_g, sigma_g), timestep(sigma_g), embeds, return_logits=True)[1]
        real_noise = randn_per_sample(batch.generators, tuple(real.shape[1:]), real.device)
        _, logits_real = self.critic(
            add_noise(real, real_noise, sigma_g), timestep(sigma_g), embeds, return_logits=True
        )
        gan = gan_discriminator_loss(logits_real, logits_fake)
        return loss + self.config.gan_critic_weight * gan, {
            "loss/critic": loss.detach(),
            "loss/gan_critic": gan.detach(),
            "gan/real_acc": (logits_real > 0).float().mean(),
            "gan/fake_acc": (logits_fake < 0).float().mean(),
        }


__all__ = [
    "DMD",
    "FewStepRollout",
    "Rollout",
    "dmd_critic_loss",
    "dmd_generator_loss",
    "dmd_gradient",
    "exit_step_rollout",
    "gan_discriminator_loss",
    "gan_generator_loss",
]
