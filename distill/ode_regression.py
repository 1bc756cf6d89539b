"""ODE regression: the initialisation of CausVid (Yin et al. 2025, §3.3) and Self-Forcing (Huang et al. 2025).

The data stores states of the teacher's ODE, x_{σ_k} for k < S-1, and its clean endpoint x0_T (the `trajectory`
column [S, C, F, H, W] with `trajectory_sigmas` [S], σ = 0 last). For each chunk of `frames_per_block` latent
frames the student sees ONE stored state, drawn at random per chunk, so different chunks sit at different
noise levels (what a block-causal student meets at inference); it must jump from there to the endpoint:

    k_c ~ U{0, .., S-2} per chunk c;   x[:, :, f] = x_{σ_{k_c(f)}}[:, :, f];   σ_f = σ_{k_c(f)}
    L = mean ‖ x - σ_f·v_θ(x, 1000·σ_f, c) - x0_T ‖²                                 (per-frame σ, [B, F])

The student is called with per-frame timesteps t [B, F], or t [B] when every frame of every sample has the
same σ (a single chunk: any bidirectional student). Chunks follow `students.causal.chunk_bounds` (frames
[c·n, (c+1)·n), the last one shorter; with `student.independent_first_frame` the first chunk is frame 0 alone).
The per-chunk draws come from each sample's generator (one integer per chunk, in chunk order).

`given_first_chunk` p > 0: each sample then draws u ~ U[0, 1) (after its chunk draws); when u < p its first chunk
is the clean endpoint at σ = 0 (a given image, or a clip's first chunk: what the cache holds when a stream starts
from given frames) and is left out of the loss, so the student learns to continue from given frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.flow import timestep, x0_from_velocity
from distill.batch import Batch
from distill.flow_matching import Model, frame_mse
from students.causal import chunk_bounds


def ode_regression_loss(
    model: Model,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    embeds: torch.Tensor,
    x0_target: torch.Tensor,
    frame_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = mean ‖ x - σ·model(x, 1000σ, c) - x0_T ‖².

    x_t, x0_target: [B, C, F, H, W]; sigma: [B] or per frame [B, F]; embeds [B, L, D]. A [B, F] σ that is equal
    over the frames of every sample is passed to the model as [B]. `frame_weight` [B, F] of 0/1: the mean over the
    frames weighted 1 only. float32 scalar.
    """
    if sigma.ndim == 2 and bool((sigma == sigma[:, :1]).all()):
        sigma = sigma[:, 0]
    v = model(x_t, timestep(sigma), embeds)
    return frame_mse(x0_from_velocity(x_t.float(), v.float(), sigma), x0_target, frame_weight)


def chunk_states(
    trajectory: torch.Tensor,
    sigmas: torch.Tensor,
    picks: torch.Tensor,
    frames_per_block: int,
    first_block_frames: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix stored states chunk by chunk: returns (x [B, C, F, H, W], σ [B, F]).

    trajectory: [B, S, C, F, H, W]; sigmas: [B, S]; picks: [B, num_chunks] state index per chunk.
    Frame f takes the state picked for its chunk (`chunk_bounds`).
    """
    b, _, _, num_frames = trajectory.shape[:4]
    sizes = [e - s for s, e in chunk_bounds(num_frames, frames_per_block, first_block_frames)]
    frame_pick = picks.repeat_interleave(torch.tensor(sizes, device=picks.device), dim=1)  # [B, F]
    sigma = sigmas.gather(1, frame_pick)
    index = frame_pick.view(b, 1, 1, num_frames, 1, 1).expand(-1, 1, *trajectory.shape[2:])
    return trajectory.gather(1, index).squeeze(1), sigma


class ODERegression:
    """Regress the student's x0 at per-chunk stored teacher ODE states onto the ODE endpoint."""

    @dataclass(kw_only=True)
    class Config:
        frames_per_block: int | None = None
        """Latent frames per chunk sharing one stored state; None uses `student.frames_per_block` for a causal
        student, else all frames form one chunk (one σ per sample: any bidirectional student)."""

        given_first_chunk: float = 0.0
        """Probability that a sample's first chunk is given clean (σ = 0) and left out of the loss: image-to-video
        with `student.independent_first_frame`, continuation from a first chunk otherwise (module docstring)."""

        def __post_init__(self):
            if self.frames_per_block is not None and self.frames_per_block < 1:
                raise ValueError(f"frames_per_block: must be >= 1 or null, got {self.frames_per_block}")
            if not 0.0 <= self.given_first_chunk <= 1.0:
                raise ValueError(f"given_first_chunk: must be a probability in [0, 1], got {self.given_first_chunk}")

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
    def from_recipe(cls, recipe, *, teacher, student, unwrapped, critic=None, num_processes: int = 1) -> ODERegression:
        # a causal student's chunks by default; a bidirectional student sees one σ per sample
        causal = recipe.student.spec.causal
        per_block = recipe.student.frames_per_block if causal else None
        first = 1 if causal and recipe.student.independent_first_frame else None
        if recipe.method.ode_regression.given_first_chunk and not causal:
            raise ValueError(
                "method.ode_regression.given_first_chunk: only a causal student continues from given frames; "
                f"student.kind is {recipe.student.kind}: set it to 0"
            )
        return cls(
            recipe.method.ode_regression, student=student, student_frames_per_block=per_block, first_block_frames=first
        )

    def __init__(
        self,
        config: ODERegression.Config,
        *,
        student: Model,
        student_frames_per_block: int | None = None,
        first_block_frames: int | None = None,
    ):
        """`student_frames_per_block`: the causal student's chunk size, used when the config leaves it None;
        `first_block_frames`: its first chunk's (1 with an independent first frame; None: the same)."""
        self.config, self.student = config, student
        self.frames_per_block = config.frames_per_block or student_frames_per_block
        self.first_block_frames = first_block_frames

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.trajectory is None or batch.trajectory_sigmas is None:
            raise ValueError(
                "method.name: ode_regression needs the dataset's `trajectory` column "
                "(set data.trajectory_steps and regenerate)"
            )
        traj, sigmas = batch.trajectory, batch.trajectory_sigmas
        if traj.shape[1] < 2 or bool((sigmas[:, -1] != 0).any()):
            raise ValueError(
                f"trajectory_sigmas: need >= 1 noisy state and the clean endpoint (σ = 0) last, got "
                f"{[round(s, 4) for s in sigmas[0].tolist()]}; regenerate with data.trajectory_steps "
                "ending at the teacher's last step"
            )
        num_frames = traj.shape[3]  # [B, S, C, F, H, W]
        per_block = self.frames_per_block or num_frames
        first = self.first_block_frames if self.frames_per_block else None
        bounds = chunk_bounds(num_frames, per_block, first)
        num_chunks = len(bounds)
        # 1. one stored state per chunk, from each sample's generator (never the clean endpoint)
        picks = torch.stack(
            [torch.randint(traj.shape[1] - 1, (num_chunks,), generator=g) for g in batch.generators]
        ).to(traj.device)
        # 2. the mixed input and its per-frame σ
        x_t, sigma = chunk_states(traj, sigmas, picks, per_block, first)
        weight, logs = None, {}
        if self.config.given_first_chunk > 0:  # 2b. some samples start from their clean first chunk, unscored
            p = self.config.given_first_chunk
            given = torch.stack([torch.rand(1, generator=g)[0] < p for g in batch.generators]).to(traj.device)
            n = bounds[0][1]
            x_t = x_t.clone()
            x_t[given, :, :n] = traj[given, -1, :, :n]
            sigma = sigma.clone()
            sigma[given, :n] = 0.0
            weight = torch.ones_like(sigma)
            weight[given, :n] = 0.0
            logs["ode/given_first_chunk"] = given.float().mean()
        # 3. regress the student's one-jump x0 onto the endpoint
        loss = ode_regression_loss(self.student, x_t, sigma, batch.cond.prompt_embeds, traj[:, -1], weight)
        return loss, {"loss/ode_regression": loss.detach(), "sigma/mean": sigma.mean(), **logs}


__all__ = ["ODERegression", "chunk_states", "ode_regression_loss"]
