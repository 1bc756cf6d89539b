"""Few-step trajectory distillation (the recipe behind LightX2V-style 4-step LoRAs; CausVid's ODE init for
bidirectional students).

The teacher's ODE maps its initial noise x_1 = ε deterministically to a clean endpoint x0_T; the data stores
states of that ODE, x_{σ_k}, at `data.trajectory_steps` (the `trajectory` column, σ_k in
`trajectory_sigmas`, x0_T last). At each of its own denoising levels σ_i the student learns to jump from the
teacher's ODE state straight to the endpoint:

    L = E_{i, ε} ‖ x_{σ_k} - σ_k·v_θ(x_{σ_k}, 1000·σ_k, c) - x0_T ‖²,   k = argmin_k |σ_k - σ_i|

Which input: the STORED ODE state nearest to σ_i (not x0_T re-noised with the trajectory's noise). The stored
state is exactly what the teacher's ODE passes through, so the (input, target) pair is a deterministic map
the student can fit; re-noising with ε would instead train a reflow on the straight line between ε and x0_T.
The student is called at the stored state's own σ_k (input and timestep always agree); `max_sigma_gap`
bounds |σ_k - σ_i| so the levels trained are the levels sampled. Pick `data.trajectory_steps` at the
student's σ's (e.g. [0, 12, 24, 36] of 48 steps for denoising_steps [1000, 750, 500, 250] at shift 5).
The student then samples with `students.sampling.sample_student(mode="renoise")`, without CFG (the
teacher's guidance is baked into its trajectories).

Image-to-video data (a TI2V teacher's, `Batch.given_frames` = 1): frame 0 is the given image, clean in every stored
state. The student sees it as the teacher did, at t = 0 (per-frame σ, Wan's per-token timesteps), and the loss
leaves it out; the student then samples image-to-video in diffusers' `WanImageToVideoPipeline` with its LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.flow import timestep, x0_from_velocity
from core.seeding import randint_per_sample
from distill.batch import Batch, given_frame_sigmas
from distill.flow_matching import Model
from students.sampling import student_sigmas


def trajectory_loss(
    model: Model,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    embeds: torch.Tensor,
    x0_target: torch.Tensor,
    given_frames: int = 0,
) -> torch.Tensor:
    """L = mean ‖ (x_σ - σ·model(x_σ, 1000σ, c)) - x0_T ‖².

    x_t, x0_target: [B, C, F, H, W]; sigma: [B] (> 0); embeds: [B, L, D]. float32 scalar. `given_frames` > 0: those
    first frames are clean inputs at σ = 0 (per-frame σ [B, F] to the model) and out of the mean.
    """
    sigma = given_frame_sigmas(sigma, x_t.shape[2], given_frames)
    v = model(x_t, timestep(sigma), embeds)
    x0 = x0_from_velocity(x_t.float(), v.float(), sigma)
    return F.mse_loss(x0[:, :, given_frames:], x0_target[:, :, given_frames:].float())


def nearest_states(stored_sigmas: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Per row, the index k < S-1 (never the clean endpoint) whose σ_k is nearest to wanted[j].

    stored_sigmas: [B, S] (last column 0, the endpoint); wanted: [B]. Returns [B] int64.
    """
    gaps = (stored_sigmas[:, :-1] - wanted[:, None]).abs()
    return gaps.argmin(dim=1)


class Trajectory:
    """Regress the student's x0 at the teacher's stored ODE states onto the ODE endpoint."""

    @dataclass(kw_only=True)
    class Config:
        max_sigma_gap: float = 0.05
        """Largest allowed |σ_stored - σ_student|; a bigger gap is an error that asks to fix data.trajectory_steps."""

        def __post_init__(self):
            if not 0.0 < self.max_sigma_gap <= 1.0:
                raise ValueError(f"max_sigma_gap: must be in (0, 1], got {self.max_sigma_gap}")

    two_player = False
    """Trains a critic beside the student (`generator_loss` / `critic_loss`) instead of one `loss`."""
    needs_trajectory = True
    """Reads the teacher's stored ODE states (the dataset's `trajectory` column)."""
    data_free = False
    """Can train from captions alone (`train.data_source: prompts`)."""
    queries_teacher = False
    """Runs the teacher in its loss while the student's graph is alive (the memory plan counts that forward)."""
    student_kinds = None
    """The student kinds it trains; None: every kind."""

    @classmethod
    def from_recipe(cls, recipe, *, teacher, student, unwrapped, critic=None, num_processes: int = 1) -> Trajectory:
        sigmas = student_sigmas(recipe.student, teacher.cfg.shift, teacher.cfg.num_inference_steps)
        return cls(recipe.method.trajectory, student=student, student_sigmas=sigmas)

    def __init__(self, config: Trajectory.Config, *, student: Model, student_sigmas: list[float]):
        """`student_sigmas`: the student's denoising levels (`students.sampling.student_sigmas`); 0 is dropped."""
        self.config, self.student = config, student
        self.sigmas = torch.tensor([s for s in student_sigmas if s > 0], dtype=torch.float32)
        if len(self.sigmas) == 0:
            raise ValueError("student.denoising_steps: trajectory distillation needs at least one σ > 0")

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.trajectory is None or batch.trajectory_sigmas is None:
            raise ValueError("method.name: trajectory needs the dataset's `trajectory` column (data.trajectory_steps)")
        device = batch.x0.device
        # 1. draw one of the student's denoising levels σ_i per sample
        wanted = self.sigmas[randint_per_sample(batch.generators, len(self.sigmas))].to(device)
        # 2. take the teacher's stored ODE state nearest to σ_i, and the ODE endpoint x0_T
        k = nearest_states(batch.trajectory_sigmas, wanted)
        rows = torch.arange(len(batch), device=device)
        sigma = batch.trajectory_sigmas[rows, k]
        gap = (sigma - wanted).abs()
        if bool((gap > self.config.max_sigma_gap).any()):
            j = int(gap.argmax())
            raise ValueError(
                f"data.trajectory_steps: the student's σ={float(wanted[j]):.4f} has no stored teacher state within "
                f"method.trajectory.max_sigma_gap={self.config.max_sigma_gap} "
                f"(nearest σ={float(sigma[j]):.4f}; stored "
                f"σ's {[round(s, 4) for s in batch.trajectory_sigmas[j].tolist()]}); regenerate the data with "
                "trajectory_steps at the student's denoising levels, or raise max_sigma_gap"
            )
        x_t, x0_target = batch.trajectory[rows, k], batch.trajectory[:, -1]
        # 3. regress the student's one-jump x0 onto the endpoint
        loss = trajectory_loss(self.student, x_t, sigma, batch.cond.prompt_embeds, x0_target, batch.given_frames)
        return loss, {"loss/trajectory": loss.detach(), "sigma/gap_max": gap.max()}


__all__ = ["Trajectory", "trajectory_loss", "nearest_states"]
