"""Data section of a recipe: prompt composition and teacher generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class DataConfig:
    vocabulary: str
    """Vocabulary YAML (slots, templates, exclusions, negative prompt); relative paths resolve from the
    working directory, then from the project root (so `synth_data/vocab/wan.yaml` works anywhere)."""
    num_prompts: int
    """How many prompts to compose and render."""
    seed: int = 0
    """Global seed: prompts and every sample's noise seed derive from (seed, index) only."""
    mode: Literal["balanced", "random"] = "balanced"
    """`balanced`: every slot value appears floor(n/k) or ceil(n/k) times; `random`: iid weighted draws."""
    batch_size: int = 1
    """Prompts per teacher call during generation."""
    shard_size: int = 64
    """Samples per parquet shard (the unit of atomic writes and of resume)."""
    save_latents: bool = True
    """Store the teacher's clean latents (`latents` column) for data KD and ODE init."""
    trajectory_steps: list[int] = field(default_factory=list)
    """Sampler step indices whose latent state is stored (`trajectory` column), e.g. [0, 12, 25, 37];
    the final clean latents are always appended as the last entry. Empty: no trajectory."""
    fps: int = 16
    """Frame rate written into the mp4s."""
    video_crf: int = 18
    """x264 constant rate factor of the mp4s (libx264, yuv420p): 0 is the best quality, 51 the worst; 18 is
    visually near-lossless. Training reads `latents`/`trajectory`, so this only affects the `video` column."""
    images: str | None = None
    """Image-to-video samples from an image-conditioned teacher (Wan2.2 TI2V): a folder of images (.png, .jpg, .jpeg,
    .webp; sorted by name) or a dataset folder made by `generate` (its videos' first frames, in row order). Row i
    starts from image i mod n, resized to the teacher's height x width, stored in the `image` column next to the
    caption. None: text-to-video."""
    hub_repo_id: str | None = None
    """Dataset repo for `push` (e.g. `me/wan21-synth`). The token comes from HF_TOKEN or the CLI login."""
    hub_private: bool = True
    """Create the Hub repo as private; an existing repo keeps its visibility."""

    def __post_init__(self):
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts: must be >= 1, got {self.num_prompts}")
        for key in ("batch_size", "shard_size", "fps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.video_crf <= 51:
            raise ValueError(f"video_crf: must be in [0, 51] (x264's range), got {self.video_crf}")
        if any(s < 0 for s in self.trajectory_steps) or sorted(set(self.trajectory_steps)) != self.trajectory_steps:
            raise ValueError(f"trajectory_steps: must be increasing step indices >= 0, got {self.trajectory_steps}")
