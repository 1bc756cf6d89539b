"""Flow matching: the plain denoising loss (rectified flow; Lipman et al. 2023, Esser et al. 2024 §2).

    x_σ = (1 - σ)·x0 + σ·ε,    v* = ε - x0,    L = E_{σ, ε} ‖ v_θ(x_σ, 1000·σ, c) - v* ‖²

σ = shift(u), u ~ U(0, 1) or logit-normal (`core.flow.sample_training_sigmas`), the same shift the
sampler uses. With `cfg_dropout` p, c is replaced by the negative-prompt embedding with probability p
so the model learns v(x, t, ∅) too and supports classifier-free guidance. It trains the toy teacher from
scratch and fine-tunes LoRA students on data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from core.flow import add_noise, sample_training_sigmas, timestep, velocity_target
from core.seeding import rand_per_sample
from distill.batch import Batch

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""`model(x [B, C, F, H, W], t [B] = 1000·σ, encoder_hidden_states [B, L, D]) -> v [B, C, F, H, W]`."""


def flow_matching_loss(
    model: Model,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    embeds: torch.Tensor,
    frame_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = mean ‖ model(x_σ, 1000σ, c) - (ε - x0) ‖² with x_σ = (1-σ)·x0 + σ·ε.

    x0, noise: [B, C, F, H, W]; sigma: [B] (or per frame [B, F]); embeds: [B, L, D]. Returns a float32 scalar (mean
    over every element, so equal-size batches average exactly like their union). `frame_weight` [B, F] of 0/1: the
    mean over the frames weighted 1 only.
    """
    x_t = add_noise(x0, noise, sigma)
    v = model(x_t, timestep(sigma), embeds)
    return frame_mse(v, velocity_target(x0, noise), frame_weight)


def frame_mse(pred: torch.Tensor, target: torch.Tensor, frame_weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean (pred - target)² in float32 over [B, C, F, H, W]; with `frame_weight` [B, F] of 0/1 over the frames
    weighted 1 only (a given clean frame left out)."""
    if frame_weight is None:
        return F.mse_loss(pred.float(), target.float())
    w = frame_weight.float()[:, None, :, None, None].expand_as(pred)
    return ((pred.float() - target.float()) ** 2 * w).sum() / w.sum()


def draw_sigma_noise(generators: list[torch.Generator], x0: torch.Tensor, shift: float, weighting: str):
    """Per sample, from its own generator and in this order: σ [B] (shifted), then ε [B, C, F, H, W]."""
    sigma, noise = [], []
    for g in generators:
        sigma.append(sample_training_sigmas((1,), shift, generator=g, weighting=weighting))
        noise.append(torch.randn(x0.shape[1:], generator=g))
    return torch.cat(sigma).to(x0.device), torch.stack(noise).to(x0.device, x0.dtype)


def drop_condition(generators: list[torch.Generator], cond, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings [B, L, D] where row j is the negative embedding when u_j < p. Returns (embeds, dropped [B])."""
    u = rand_per_sample(generators, cond.prompt_embeds.device)
    dropped = u < p
    if p > 0 and cond.negative_embeds is None:
        raise ValueError("method.flow_matching.cfg_dropout: needs the negative-prompt embedding; encode with one")
    if not bool(dropped.any()):
        return cond.prompt_embeds, dropped
    embeds = torch.where(dropped.view(-1, 1, 1), cond.negative_embeds, cond.prompt_embeds)
    return embeds, dropped


class FlowMatching:
    """Denoising loss on the batch's clean latents (stored teacher samples or encoded rendered clips)."""

    @dataclass(kw_only=True)
    class Config:
        shift: float | None = None
        """σ shift for training noise levels; None uses `teacher.shift` (the sampler's)."""
        weighting: Literal["uniform", "logit_normal"] = "uniform"
        """Distribution of u before the shift: U(0, 1) or sigmoid(N(0, 1)) (SD3's logit-normal)."""
        cfg_dropout: float = 0.0
        """Probability of training on the negative-prompt embedding instead of the caption (CFG support)."""

        def __post_init__(self):
            if self.shift is not None and self.shift <= 0:
                raise ValueError(f"shift: must be > 0 or null, got {self.shift}")
            if not 0.0 <= self.cfg_dropout < 1.0:
                raise ValueError(f"cfg_dropout: must be in [0, 1), got {self.cfg_dropout}")

    two_player = False
    """Trains a critic beside the student (`generator_loss` / `critic_loss`) instead of one `loss`."""
    needs_trajectory = False
    """Reads the teacher's stored ODE states (the dataset's `trajectory` column)."""
    data_free = False
    """Can train from captions alone (`train.data_source: prompts`)."""
    queries_teacher = False
    """Runs the teacher in its loss while the student's graph is alive (the memory plan counts that forward)."""
    student_kinds = None
    """The student kinds it trains; None: every kind."""

    @classmethod
    def from_recipe(cls, recipe, *, teacher, student, unwrapped, critic=None, num_processes: int = 1) -> FlowMatching:
        return cls(recipe.method.flow_matching, student=student, teacher_shift=teacher.cfg.shift)

    def __init__(self, config: FlowMatching.Config, *, student: Model, teacher_shift: float):
        self.config = config
        self.student = student
        self.shift = teacher_shift if config.shift is None else config.shift

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        # 1. draw σ and ε per sample (then the CFG-dropout coin), from the sample's own generator
        sigma, noise = draw_sigma_noise(batch.generators, batch.x0, self.shift, c.weighting)
        embeds, dropped = drop_condition(batch.generators, batch.cond, c.cfg_dropout)
        # 2. regress the student's velocity at x_σ onto ε - x0
        loss = flow_matching_loss(self.student, batch.x0, noise, sigma, embeds)
        return loss, {
            "loss/flow_matching": loss.detach(),
            "sigma/mean": sigma.mean(),
            "cfg_dropped": dropped.float().mean(),
        }


__all__ = ["FlowMatching", "flow_matching_loss", "frame_mse", "draw_sigma_noise", "drop_condition"]
