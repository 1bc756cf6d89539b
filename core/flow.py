"""Flow-matching maths shared by teachers, students and algorithms (Wan / rectified flow).

Conventions (DESIGN.md §3), all tensors in the latent layout [B, C, F, H, W]:
    x_σ = (1 - σ)·x0 + σ·ε,   σ ∈ [0, 1]
    the model predicts v = ε - x0 and is called with t = 1000·σ, so x0 = x_σ - σ·v
    shift: σ' = s·σ / (1 + (s - 1)·σ)      (FlowMatchEulerDiscreteScheduler's `shift`)
    CFG:   v = v_uncond + w·(v_cond - v_uncond)   (w = 1: no guidance)
σ may be a scalar, a [B] tensor (one level per sample) or a [B, F] tensor (one per latent frame).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """σ' = s·σ / (1 + (s-1)·σ); the same map as diffusers' FlowMatchEulerDiscreteScheduler(shift=s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def expand_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast σ ([], [B] or [B, F]) against latents x [B, C, F, H, W]."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        return s
    if s.ndim == 1:
        return s.view(-1, 1, 1, 1, 1)
    if s.ndim == 2:
        return s.view(s.shape[0], 1, s.shape[1], 1, 1)
    raise ValueError(f"sigma must be a scalar, [B] or [B, F]; got shape {tuple(s.shape)}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_σ = (1-σ)·x0 + σ·ε."""
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target v = ε - x0."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_σ - σ·v."""
    return x_t - expand_sigma(sigma, x_t) * v


def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance, diffusers' convention: w = 1 returns v_cond."""
    return v_uncond + guidance * (v_cond - v_uncond)


def timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The model's timestep input t = 1000·σ."""
    return sigma * NUM_TRAIN_TIMESTEPS


def sample_training_sigmas(
    shape: tuple[int, ...],
    shift: float,
    generator: torch.Generator | None = None,
    device=None,
    weighting: str = "uniform",
) -> torch.Tensor:
    """Training noise levels: u ~ U(0,1) (or logit-normal), then shifted like the sampler."""
    if weighting == "uniform":
        u = torch.rand(shape, generator=generator, device=device)
    elif weighting == "logit_normal":
        u = torch.sigmoid(torch.randn(shape, generator=generator, device=device))
    else:
        raise ValueError(f"weighting: expected 'uniform' or 'logit_normal', got {weighting!r}")
    return torch.as_tensor(shift_sigma(u.clamp(1e-4, 1.0), shift))


def denoising_sigmas(denoising_steps: list[int], shift: float, warp: bool = True) -> list[float]:
    """σ for a few-step student's explicit `denoising_steps` (e.g. [1000, 750, 500, 250]).

    With `warp`, each step t is mapped through the shift, σ = shift(t/1000): Self-Forcing's
    `warp_denoising_step` indexes the shifted 1000-step schedule the same way.
    """
    sigmas = [t / NUM_TRAIN_TIMESTEPS for t in denoising_steps]
    return [float(shift_sigma(s, shift)) if warp else s for s in sigmas]
