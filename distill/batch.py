"""The batch every training method takes (`Batch`): clean latents or captions only, the text conditioning, and one
random stream per sample (`core.seeding`). `distill.data` builds batches; the methods only read them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One micro-batch on the training device."""

    x0: torch.Tensor | None
    """Clean latents [B, C, F, H, W] float32 (the teacher's stored samples, or encoded rendered clips); None with
    `train.data_source: prompts`, whose batches carry captions only (`latent_shape` says the samples' shape)."""
    cond: object
    """`teachers.wan.Cond`: `prompt_embeds` [B, L, D] and `negative_embeds` [B, L, D] (the negative prompt)."""
    generators: list[torch.Generator]
    """One CPU generator per sample, seeded with derive_seed(train.seed, index), already past the data draws."""
    indices: list[int]
    """Global sample indices."""
    captions: list[str]
    trajectory: torch.Tensor | None = None
    """[B, S, C, F, H, W]: stored teacher ODE states, the clean endpoint last (dataset source only)."""
    trajectory_sigmas: torch.Tensor | None = None
    """[B, S]: σ of each stored state (the last is 0)."""
    latent_shape: tuple[int, ...] | None = None
    """[C, F, H, W] of one sample's latents when x0 is None (the teacher's num_frames, height, width)."""
    given_frames: int = 0
    """Latent frames at the start of every sample that were given to the teacher clean, not generated (1 for an
    image-to-video dataset: the image's frame, clean in every stored trajectory state)."""

    def __post_init__(self):
        if self.x0 is None and self.latent_shape is None:
            raise ValueError("Batch: a batch without x0 (captions only) needs latent_shape")

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's latent shape [C, F, H, W]: x0's, or `latent_shape` for a captions-only batch."""
        return tuple(self.x0.shape[1:]) if self.x0 is not None else tuple(self.latent_shape)

    @property
    def device(self) -> torch.device:
        return self.cond.prompt_embeds.device

    def __len__(self) -> int:
        return len(self.indices)


def given_frame_sigmas(sigma: torch.Tensor, num_frames: int, given_frames: int) -> torch.Tensor:
    """σ [B] (or [B, F]) with the first `given_frames` frames at 0: per frame [B, F], what a TI2V model is fed for
    an image it was given (clean, timestep 0). Unchanged when `given_frames` is 0."""
    if not given_frames:
        return sigma
    sigma = (sigma[:, None].repeat(1, num_frames) if sigma.ndim == 1 else sigma).clone()
    sigma[:, :given_frames] = 0.0
    return sigma


def unconditional(cond):
    """The negative-prompt conditioning of a `Cond` as its own `Cond` (prompt_embeds = negative_embeds)."""
    return dataclasses.replace(cond, prompt_embeds=cond.negative_embeds, negative_embeds=None)


__all__ = ["Batch", "given_frame_sigmas", "unconditional"]
