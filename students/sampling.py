"""Sampling a student (DESIGN.md §3).

Two modes over a list of noise levels σ_0 > σ_1 > ...:
- `renoise` (few-step students with explicit `denoising_steps`): at each σ_i the student predicts v,
  x0 = x - σ_i·v; unless it is the last step, x0 is re-noised to σ_{i+1} with FRESH noise,
  x = (1-σ_{i+1})·x0 + σ_{i+1}·ε. The last step returns x0. `noise` is taken as x at σ_0.
- `euler` (multi-step students): the FlowMatchEulerDiscreteScheduler update x += (σ_{i+1} - σ_i)·v
  over σ_0 .. σ_n with σ_n = 0 (n+1 values), as `WanPipeline` with that scheduler does.
Call under `torch.no_grad()` for inference; the sampler itself leaves autograd alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from core.flow import NUM_TRAIN_TIMESTEPS, add_noise, cfg, denoising_sigmas, x0_from_velocity
from core.seeding import derive_seed
from students.causal import chunk_bounds, sample_causal
from students.config import StudentConfig

SamplingMode = Literal["renoise", "euler"]


def student_sampling_mode(student_cfg: StudentConfig) -> SamplingMode:
    """`renoise` when the student has explicit `denoising_steps`, else `euler`."""
    return "renoise" if student_cfg.denoising_steps else "euler"


def student_sigmas(student_cfg: StudentConfig, teacher_shift: float, teacher_steps: int) -> list[float]:
    """The student's σ schedule.

    With `denoising_steps`: σ_i = t_i/1000, warped through the shift when `warp_denoising_steps`
    (one σ per step; sample with mode="renoise"). Otherwise: the sigmas of
    `FlowMatchEulerDiscreteScheduler(shift=teacher_shift)` with `num_inference_steps` (None: the
    teacher's `teacher_steps`), terminal 0 included (n+1 values; sample with mode="euler").
    """
    if student_cfg.denoising_steps:
        return denoising_sigmas(student_cfg.denoising_steps, teacher_shift, student_cfg.warp_denoising_steps)
    steps = student_cfg.num_inference_steps or teacher_steps
    scheduler = FlowMatchEulerDiscreteScheduler(shift=teacher_shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.tolist()


def _velocity(
    model: Callable, x: torch.Tensor, sigma: float, cond: torch.Tensor, neg: torch.Tensor | None, guidance: float
) -> torch.Tensor:
    # t in float32 exactly as FlowMatchEulerDiscreteScheduler computes its timesteps (sigmas * 1000).
    t = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device) * NUM_TRAIN_TIMESTEPS
    if guidance == 1.0:
        return model(x, t, cond)
    if neg is None:
        raise ValueError(f"student.guidance_scale={guidance}: CFG needs negative embeddings (got None)")
    if neg.shape == cond.shape:  # one batched forward for both branches
        v_uncond, v_cond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg, cond])).chunk(2)
    else:
        v_uncond, v_cond = model(x, t, neg), model(x, t, cond)
    return cfg(v_uncond, v_cond, guidance)


def sample_student(
    student: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond_embeds: torch.Tensor,
    neg_embeds: torch.Tensor | None,
    noise: torch.Tensor,
    sigmas: list[float],
    guidance: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    mode: SamplingMode = "renoise",
) -> torch.Tensor:
    """Sample latents [B, C, F, H, W] from `noise` (x at σ_0) with `student(x, t, embeds) -> v`.

    CFG follows diffusers: v = v_uncond + w·(v_cond - v_uncond), w = 1 is a single conditional pass.
    `generator` (one, or one per sample as diffusers' `randn_tensor` takes) draws the renoise mode's fresh noise.
    """
    if not sigmas:
        raise ValueError("sigmas: empty schedule")
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas: must be strictly descending, got {sigmas}")
    x = noise
    if mode == "euler":
        if len(sigmas) < 2 or sigmas[-1] != 0.0:
            raise ValueError(f"sigmas: the euler mode needs n+1 values ending in 0, got {sigmas}")
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = _velocity(student, x, s, cond_embeds, neg_embeds, guidance)
            x = (x.float() + (s_next - s) * v.float()).to(x.dtype)
        return x
    if mode != "renoise":
        raise ValueError(f"mode: expected 'renoise' or 'euler', got {mode!r}")
    if sigmas[-1] <= 0.0:
        raise ValueError(f"sigmas: renoise evaluates the student at every σ, so all must be > 0; got {sigmas}")
    for i, s in enumerate(sigmas):
        x0 = x0_from_velocity(x, _velocity(student, x, s, cond_embeds, neg_embeds, guidance), s)
        if i == len(sigmas) - 1:
            return x0
        eps = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = add_noise(x0, eps, sigmas[i + 1])
    raise AssertionError("unreachable")


def student_sampler(student, teacher_shift: float, teacher_steps: int, latent_frames: int) -> tuple[Callable, dict]:
    """A finished `Student`'s sampler as the eval and the benchmarks run it: `sampler(cond, noise, rows)` -> latents
    [B, C, F, H, W] for `cond` (a teacher's `Cond`), the initial noise [B, C, F, H, W] and one prompt row per video
    (its `seed` seeds the re-noising draws: derive_seed(seed, 1)), without grad; a causal student chunk by chunk.
    Also {"nfe": transformer passes per video, "steps", "guidance_scale"} for `latent_frames` latent frames.
    `teacher_shift` / `teacher_steps` place the student's levels (`student_sigmas`)."""
    cfg = student.cfg
    sigmas = student_sigmas(cfg, teacher_shift, teacher_steps)
    mode = student_sampling_mode(cfg)
    steps = len(sigmas) if mode == "renoise" else len(sigmas) - 1
    causal = cfg.spec.causal
    if causal and (mode != "renoise" or cfg.guidance_scale != 1):
        raise ValueError(
            f"student {cfg.name}: a causal student samples chunk by chunk with its few-step renoising "
            "sampler and no CFG; it needs student.denoising_steps and student.guidance_scale: 1.0"
        )

    def sampler(cond, noise, rows):
        generators = [torch.Generator("cpu").manual_seed(derive_seed(r["seed"], 1)) for r in rows]
        if causal:
            return sample_causal(student.causal, cond.prompt_embeds, noise, sigmas, generator=generators)
        return sample_student(
            student,
            cond.prompt_embeds,
            cond.negative_embeds,
            noise,
            sigmas,
            guidance=cfg.guidance_scale,
            generator=generators,
            mode=mode,
        )

    if causal:
        bounds = chunk_bounds(latent_frames, student.causal.frames_per_block, student.causal.first_block_frames)
        # whole-video passes: `steps` denoising passes over every chunk, plus one cache write per chunk but the last
        # (written lazily before the next chunk), each over its share of the video's frames
        nfe = round(steps + bounds[-1][0] / latent_frames, 3)
    else:
        nfe = steps * (2 if cfg.guidance_scale != 1 else 1)
    info = {"nfe": nfe, "steps": steps, "guidance_scale": cfg.guidance_scale}
    return torch.no_grad()(sampler), info
