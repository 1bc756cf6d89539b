"""Validation previews during training (`train.validation_steps`), as diffusers' training scripts log samples.

The same prompts and the same noise at every preview, so the files of successive steps show what training changed:
`students/<name>/validation/step-<N>/<i>.gif` on disk, and per prompt a strip of its first, middle and last frames
logged as an image to every tracker that takes images (tensorboard, wandb, ...). The student samples as it does at
eval (`students.sampling.student_sampler`: few-step, causal chunk by chunk), its current (not EMA) weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from core.recipe_loader import resolve_path
from core.seeding import derive_seed, sample_noise
from core.vocabulary import load_vocabulary
from distill.config import Recipe
from students.sampling import student_sampler

logger = logging.getLogger(__name__)


class Validator:
    """`Validator(recipe, teacher)(student, step, accelerator)` writes and logs one round of previews (main process)."""

    def __init__(self, recipe: Recipe, teacher):
        tc, tcfg = recipe.train, teacher.cfg
        if tc.validation_prompts:
            prompts = list(tc.validation_prompts)
        else:
            from distill.eval import eval_prompts

            prompts = [r["prompt"] for r in eval_prompts(recipe)[:2]]
        vocab = load_vocabulary(resolve_path(recipe.data.vocabulary))
        negative = tcfg.negative_prompt if tcfg.negative_prompt is not None else vocab.negative_prompt
        self.rows = [{"prompt": p, "seed": derive_seed(tc.seed, 10_000 + i)} for i, p in enumerate(prompts)]
        self.shape = teacher.latent_shape(tcfg.num_frames, tcfg.height, tcfg.width)
        self.cond = teacher.encode(prompts, negative)
        self.teacher, self.recipe = teacher, recipe
        self.folder = recipe.student_dir() / "validation"

    @torch.no_grad()
    def __call__(self, student, step: int, accelerator, every_rank: bool = False) -> Path | None:
        """Sample and write the previews (main process). `every_rank`: a sharded student, whose forward every rank
        must run: all sample, the main process writes."""
        if not accelerator.is_main_process and not every_rank:
            return None
        from distill.report import write_gif  # PIL; distill.report also pulls PyAV, needed here only

        teacher = self.teacher
        sampler, _ = student_sampler(
            student, teacher.cfg.shift, teacher.cfg.num_inference_steps, latent_frames=self.shape[1]
        )
        noise = torch.stack([sample_noise(r["seed"], self.shape) for r in self.rows]).to(teacher.device)
        was_training = student.training
        student.eval()
        try:
            latents = sampler(self.cond.to(teacher.device), noise, self.rows)
        finally:
            student.train(was_training)
        if not accelerator.is_main_process:
            return None
        videos = teacher.to_uint8(teacher.decode(latents))  # uint8 [B, F, H, W, 3]
        out = self.folder / f"step-{step:06d}"
        out.mkdir(parents=True, exist_ok=True)
        strips = {}
        for i, video in enumerate(videos):
            write_gif(out / f"{i}.gif", video, self.recipe.data.fps)
            f = len(video)
            strips[f"validation/{i}"] = np.concatenate([video[0], video[f // 2], video[-1]], axis=1)
        (out / "prompts.txt").write_text("".join(f"{i}\t{r['prompt']}\n" for i, r in enumerate(self.rows)))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({k: v[None] for k, v in strips.items()}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({k: [v] for k, v in strips.items()}, step=step)
        logger.info("train: validation previews of step %d in %s", step, out)
        return out
