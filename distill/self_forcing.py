"""Self-Forcing: DMD2 on a causal student's own chunk-by-chunk rollout (Huang et al. 2025, "Self Forcing:
Bridging the Train-Test Gap in Autoregressive Video Diffusion", Alg. 1; DMD2 as in `distill.dmd`).

The generator's sample is made exactly as at inference (`students.causal.stream_causal`), with S student levels
σ_0 > ... > σ_{S-1} and chunks c = 0..N-1 of n = `student.frames_per_block` latent frames:

    x = ε_c                                                          (the chunk's frames of the initial noise)
    for i < k_c, no grad:  x0 = x - σ_i·v(x, 1000σ_i | cache);  x = (1-σ_{i+1})·x0 + σ_{i+1}·ε_{c,i}
    exit step k_c, grad:   x0_c = x - σ_k·v(x, 1000σ_k | cache)                       (the chunk's output)
    no grad:               cache += K/V of x0_c re-noised to σ_ctx = student.context_noise / 1000
    x0 = [x0_0, ..., x0_{N-1}]                                                        [B, C, N·n, H, W]

and DMD is applied to the WHOLE video x0 (`distill.dmd`): x_σ = (1-σ)·sg(x0) + σ·ε',
    grad = (x0_fake - x0_real) / mean|x0 - x0_real|,   L_G = ½·‖x0 - sg(x0 - grad)‖²,
    L_C = flow matching of the critic on sg(x0)   (the rollout re-run without grad).
Gradients reach the student through each chunk's exit step only (and the text's cross-attention K/V); the
cache is never differentiated (Self-Forcing's truncated gradient). With `grad_through_steps` every step of a chunk
keeps its graph, so the gradient also reaches the earlier steps through the re-noisings x = (1-σ_{i+1})·x0 + σ_{i+1}·ε.

Exit steps: one per chunk, k_c ~ U{0..S-1} (`exit_step: last`: S-1; `same_step_across_chunks`: k_0 for every
chunk, as Self-Forcing's configs run), drawn from a generator seeded with
(train.seed, trainer step), so every rank and every micro-batch of a step uses the same ones. DDP runs
collectives in each forward, so every rank must run the same forwards; and the draws do not depend on the
number of processes. (Self-Forcing broadcasts rank 0's draw; a seeded draw needs no communication.)

Windowed DMD (`dmd_window`, Self-Forcing++): roll out `num_chunks` chunks (more than the teacher's length), draw
per step a window of `dmd_window` consecutive chunks ending at chunk e ~ U{dmd_window..num_chunks} (seeded like the
exit steps), and score only the window: chunks before it run every step under no_grad (they only fill the cache, as
at inference), chunks after e are not rolled out. The window's frames go to the teacher and critic as a clip of
their own length, so the student learns to denoise from the KV cache of its own long rollouts.

Given first chunk (`given_first_chunk` p > 0): on a trainer step whose seeded draw (the same on every rank) falls
under p, chunk 0 is not generated but taken clean from the batch's latents (`train.data_source: dataset` or
`toyworld`) and written into the cache first, as a stream that starts from given frames does: image-to-video with
`student.independent_first_frame` (chunk 0 is frame 0 alone), continuation from a first chunk otherwise. It stays
in the video DMD and the critic see, without a gradient: the generated chunks are judged as the continuation of
real frames. With an image-conditioned teacher (Wan2.2 TI2V) the given chunk is never re-noised: σ = 0 on its
frames (per-frame σ, per-token timesteps for the teacher and the critic), so both scores are the conditional ones
of image-to-video, and the critic's flow-matching loss leaves those frames out; with a text-only teacher it is
re-noised with the rest and both scores are of the joint video.

Randomness per sample, from its own generator and in this order: the initial noise [C, F, H, W], the
rollout's fresh noises (chunk by chunk: one per re-noising, then the context noise when σ_ctx > 0), then σ
and ε' of the DMD loss. Hence N processes × batch b equal 1 process × batch N·b.

ODE anchor (`ode_regression_weight` w > 0, DMD's regression loss, Yin et al. 2024, with the teacher's stored ODE
states as CausVid's initialisation uses them): the generator's loss gains w·L_ode, `distill.ode_regression`'s loss on
the batch's trajectories (`train.data_source: dataset` with `data.trajectory_steps`), computed with the student's
block-causal forward. With `exit_step: last` DMD's gradient reaches only the student's last level; the anchor keeps
every level on the teacher's ODE. Its per-chunk state draws follow the DMD draws in each sample's generator.

`frame_wise_timesteps` (diffusion forcing, Chen et al. 2024; CausVid): σ of the DMD re-noising and of the critic
loss drawn per CHUNK, σ [B, N] broadcast to its frames [B, F], instead of one σ per video (Self-Forcing's
default). Frames of one chunk share σ, as the causal student's temporal patches require.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.flow import shift_sigma
from core.seeding import derive_seed, randn_per_sample
from distill.batch import Batch, given_frame_sigmas
from distill.dmd import DMD
from distill.flow_matching import Model
from distill.ode_regression import ODERegression
from students.causal import ChunkModelWrapper, chunk_bounds, per_token_timesteps, sample_causal
from students.config import KINDS
from students.sampling import student_sigmas

EXIT_STREAM = 0x5E1F
"""Exit steps of trainer step s come from `torch.Generator().manual_seed(derive_seed(derive_seed(train.seed,
EXIT_STREAM), s))`: a stream no per-sample generator (derive_seed(train.seed, index >= 0)) shares."""


def draw_exit_steps(
    seed: int, step: int, num_chunks: int, num_steps: int, last_only: bool = False, same_across_chunks: bool = False
) -> list[int]:
    """One exit step per chunk, uniform in [0, num_steps), for trainer step `step`: the same on every rank.
    `same_across_chunks`: the first chunk's draw for every chunk (Self-Forcing's `same_step_across_blocks`)."""
    if last_only:
        return [num_steps - 1] * num_chunks
    g = torch.Generator().manual_seed(derive_seed(derive_seed(seed, EXIT_STREAM), step))
    exits = torch.randint(num_steps, (num_chunks,), generator=g).tolist()
    return [exits[0]] * num_chunks if same_across_chunks else exits


GIVEN_STREAM = 0x5E1F_0002
"""Whether trainer step s starts from a given first chunk: derive_seed(derive_seed(train.seed, GIVEN_STREAM), s)."""


def draw_given_first_chunk(seed: int, step: int, probability: float) -> bool:
    """True when trainer step `step`'s first chunk is given from the data (probability `probability`): the same on
    every rank. Probability 0 draws nothing."""
    if probability <= 0:
        return False
    g = torch.Generator().manual_seed(derive_seed(derive_seed(seed, GIVEN_STREAM), step))
    return bool(torch.rand(1, generator=g)[0] < probability)


WINDOW_STREAM = 0x5E1F_0001
"""The DMD window of trainer step s comes from its own stream, derive_seed(derive_seed(train.seed, WINDOW_STREAM), s),
so adding a window leaves every exit-step draw as it was."""


def draw_window_end(seed: int, step: int, num_chunks: int, window: int, min_start: int = 0) -> int:
    """The chunk (exclusive) where trainer step `step`'s DMD window ends, uniform in [min_start + window, num_chunks]:
    the same on every rank. (min_start 0 draws exactly as before the key existed.)"""
    if not 1 <= window <= num_chunks - min_start:
        raise ValueError(
            f"method.self_forcing.dmd_window: must be in 1..{num_chunks - min_start} (the chunks rolled "
            f"out, {num_chunks}, less dmd_window_min_start, {min_start}), got {window}"
        )
    g = torch.Generator().manual_seed(derive_seed(derive_seed(seed, WINDOW_STREAM), step))
    return int(torch.randint(min_start + window, num_chunks + 1, (1,), generator=g))


class PerTokenTimesteps:
    """A `Model` (e.g. the critic, a bidirectional Wan transformer) called with per-frame t [B, F]: Wan takes a 2-D
    timestep per token, so t is expanded with `per_token_timesteps`; t [B] passes unchanged."""

    def __init__(self, model: Model, patch_size: tuple[int, int, int]):
        self.model, self.patch_size = model, tuple(patch_size)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs):
        if t.ndim == 2:
            t = per_token_timesteps(t, x, self.patch_size)
        return self.model(x, t, encoder_hidden_states, **kwargs)


class PreparedCausal(ChunkModelWrapper):
    """The chunk interface `students.causal.stream_causal` needs (`frames_per_block`, `cfg`, `init_cache`,
    `forward_chunk`) over the PREPARED student: every chunk forward is a call `prepared(x, t, None, chunk=...)`, so
    a DDP wrapper sees it and all-reduces the exit steps' gradients (calling `student.causal` directly would bypass
    DDP and let the ranks drift apart). `student` is the unwrapped causal `Student`."""

    def __init__(self, prepared, student):
        self.prepared, self.causal = prepared, student.causal

    def forward_chunk(self, x: torch.Tensor, t, cache, frame_offset: int, update_cache: bool) -> torch.Tensor:
        chunk = {"cache": cache, "frame_offset": frame_offset, "update_cache": update_cache}
        return self.prepared(x, t, None, chunk=chunk)


class CausalRollout:
    """`distill.dmd.Rollout` of a causal student: its own chunk-by-chunk rollout from noise (module docstring)."""

    def __init__(
        self,
        model,
        sigmas: list[float],
        *,
        seed: int,
        samples_per_step: int,
        num_chunks: int | None = None,
        last_only: bool = False,
        window: int | None = None,
        same_across_chunks: bool = False,
        window_min_start: int = 0,
        given_first_chunk: float = 0.0,
        grad_through_steps: bool = False,
    ):
        """`model`: a `CausalWan` or `PreparedCausal`; `sigmas`: the student's levels (all > 0);
        `seed` / `samples_per_step`: train.seed and the global samples per trainer step G (step s holds the sample
        indices [s·G, (s+1)·G), `distill.data`); `num_chunks`: None rolls out the batch's latent frames;
        `window`: None returns the whole rollout, else only `window` consecutive chunks ending at a chunk drawn per
        trainer step (`draw_window_end`): the chunks before them are rolled out as at inference (every step, no
        grad) and only fill the cache; later chunks are not rolled out at all. `given_first_chunk`: the probability
        that a step's chunk 0 is the batch's clean latents instead of generated (`draw_given_first_chunk`);
        `grad_through_steps`: the exit step's graph reaches back through the chunk's earlier steps."""
        if not sigmas or any(s <= 0 for s in sigmas):
            raise ValueError(
                f"student.denoising_steps: the causal rollout samples the student at every σ, all must "
                f"be > 0; got σ's {sigmas}"
            )
        self.model, self.sigmas, self.seed = model, list(sigmas), seed
        self.samples_per_step, self.num_chunks, self.last_only = samples_per_step, num_chunks, last_only
        self.same_across_chunks = same_across_chunks
        self.window = window  # checked against the chunks rolled out by `draw_window_end`
        self.window_min_start = window_min_start
        self.given_first_chunk = given_first_chunk
        self.grad_through_steps = grad_through_steps
        self.last_given = False
        """Whether the latest call's chunk 0 was given (for logs and tests)."""
        self.last_exit_steps: list[int] = []
        """The exit steps of the latest call, one per returned chunk (for logs and tests)."""
        self.last_window: tuple[int, int] = (0, 0)
        """The chunks [first, end) the latest call returned."""

    @property
    def frames_per_block(self) -> int:
        return self.model.frames_per_block

    def num_frames(self, batch: Batch) -> int:
        """Latent frames rolled out: `num_chunks` chunks (`chunk_bounds`), else the batch's (the teacher's) length."""
        if self.num_chunks is None:
            return batch.shape[1]
        return self.model.first_block_frames + (self.num_chunks - 1) * self.frames_per_block

    def __call__(self, batch: Batch) -> torch.Tensor:
        # 1. this trainer step's window, exit steps and given first chunk (shared by all ranks), then each sample's
        #    initial noise
        step = batch.indices[0] // self.samples_per_step
        frames = self.num_frames(batch)
        bounds = chunk_bounds(frames, self.frames_per_block, self.model.first_block_frames)
        if self.window is None:
            first, end = 0, len(bounds)
        else:
            end = draw_window_end(self.seed, step, len(bounds), self.window, self.window_min_start)
            first = end - self.window
        exits = draw_exit_steps(self.seed, step, end - first, len(self.sigmas), self.last_only, self.same_across_chunks)
        given = draw_given_first_chunk(self.seed, step, self.given_first_chunk)
        self.last_exit_steps, self.last_window, self.last_given = exits, (first, end), given
        c, _, h, w = batch.shape
        noise = randn_per_sample(batch.generators, (c, frames, h, w), batch.device)[:, :, : bounds[end - 1][1]]
        # 2. chunk by chunk with the KV cache, as at inference; only each returned chunk's exit step keeps its graph
        exit_steps = [len(self.sigmas) - 1] * first + exits
        prefix = None
        if given:  # chunk 0 from the data, clean, into the cache; the rollout generates from chunk 1 on
            if batch.x0 is None:
                raise ValueError(
                    "method.self_forcing.given_first_chunk: the first chunk comes from the data, and "
                    "train.data_source: prompts has none; use data_source: dataset or toyworld"
                )
            prefix = batch.x0[:, :, : bounds[0][1]].to(noise)
            noise, exit_steps = noise[:, :, bounds[0][1] :], exit_steps[1:]
        x0 = sample_causal(
            self.model,
            batch.cond.prompt_embeds,
            noise,
            self.sigmas,
            generator=batch.generators,
            exit_steps=exit_steps,
            grad_from_chunk=max(first - int(given), 0),
            prefix=prefix,
            grad_through_steps=self.grad_through_steps,
        )
        if given:
            x0 = torch.cat([prefix, x0], dim=2)
        return x0[:, :, bounds[first][0] :]


class SelfForcing(DMD):
    """DMD2 whose generator sample is the causal student's self-rollout (see the module docstring); the trainer
    steps two optimizers (`generator_loss`, `critic_loss`, `trains_generator` as in `DMD`)."""

    @dataclass(kw_only=True)
    class Config(DMD.Config):
        """DMD's keys (guidance_scale, generator_update_interval, critic*, min/max_sigma, shift, exit_step: here the
        rollout's per-chunk exit step: `random` or `last`) plus the two below."""

        num_chunks: int | None = None
        """Chunks the student rolls out per training video; None: the training latents' frames / frames_per_block
        (the teacher's num_frames). More chunks train on videos longer than the teacher's."""
        dmd_window: int | None = None
        """Chunks that DMD and the critic see (Self-Forcing++, Cui et al. 2025): `num_chunks` are rolled out as at
        inference, and a window of this many consecutive chunks, ending at a chunk drawn per step (the same on
        every rank), is scored as one video. With num_chunks > teacher length and dmd_window = teacher length, the
        student learns from its own states past the trained horizon (the drift of long rollouts) while the teacher
        and critic only judge clips of their own length. None: the whole rollout."""
        dmd_window_min_start: int = 0
        """With `dmd_window`: the earliest chunk a window may start at. 1 keeps chunk 0 (denoised with no context)
        out of DMD, as Self-Forcing masks the first chunk out of the loss of a rollout longer than the teacher's;
        chunk 0 then learns only through the weights it shares with the chunks that have context."""
        same_step_across_chunks: bool = False
        """`exit_step: random`: one exit step drawn per step for ALL chunks (Self-Forcing's effective default,
        `same_step_across_blocks: true`) instead of one per chunk."""
        normalise_per_chunk: bool = False
        """DMD's gradient normaliser mean|x0 - x0_real| taken per chunk instead of per video (LongLive), so a chunk
        that is already close to the teacher's x0 is not drowned by one that is far from it."""
        given_first_chunk: float = 0.0
        """Probability that a trainer step's chunk 0 is given clean from the data instead of generated (the same on
        every rank): image-to-video with `student.independent_first_frame`, continuation from a first chunk
        otherwise (module docstring). Needs train.data_source: dataset or toyworld."""
        ode_regression_weight: float = 0.0
        """w > 0 adds w·(ODE regression loss on the batch's stored teacher trajectories) to the generator's loss
        (module docstring); needs train.data_source: dataset and data.trajectory_steps."""
        grad_through_steps: bool = False
        """Keep the graph of every student step of a chunk, not only its exit step's: DMD's gradient then reaches
        the earlier levels (which decide the chunk's content at high noise) back through the re-noisings, instead of
        Self-Forcing's truncation to the exit step. One graph per step and chunk: memory and backward time grow with
        the exit step. Off by default: on the toy it destabilised training (docs/results/self_forcing_ablations.md)."""
        frame_wise_timesteps: bool = False
        """Diffusion forcing: one σ per chunk (frames of a chunk share it) in the DMD re-noising and the critic
        loss, instead of one per video. The teacher must take per-frame timesteps (Wan: temporal patch 1)."""

        def __post_init__(self):
            super().__post_init__()
            if self.num_chunks is not None and self.num_chunks < 1:
                raise ValueError(f"num_chunks: must be >= 1 or null, got {self.num_chunks}")
            if self.dmd_window_min_start < 0 or (self.dmd_window_min_start and self.dmd_window is None):
                raise ValueError(
                    f"dmd_window_min_start: must be >= 0 and needs dmd_window; got "
                    f"{self.dmd_window_min_start} with dmd_window {self.dmd_window}"
                )
            if (
                self.dmd_window is not None
                and self.num_chunks is not None
                and self.dmd_window + self.dmd_window_min_start > self.num_chunks
            ):
                raise ValueError(
                    f"dmd_window: a window of {self.dmd_window} chunks from chunk "
                    f"{self.dmd_window_min_start} on does not fit in num_chunks {self.num_chunks}"
                )
            if not 0.0 <= self.given_first_chunk <= 1.0:
                raise ValueError(f"given_first_chunk: must be a probability in [0, 1], got {self.given_first_chunk}")
            if not (self.ode_regression_weight >= 0.0 and math.isfinite(self.ode_regression_weight)):
                raise ValueError(
                    f"ode_regression_weight: must be a finite number >= 0, got {self.ode_regression_weight}"
                )
            if self.dmd_window is not None and not 1 <= self.dmd_window <= (self.num_chunks or self.dmd_window):
                raise ValueError(
                    f"dmd_window: must be >= 1 and <= num_chunks ({self.num_chunks}), or null; got {self.dmd_window}"
                )

    student_kinds = tuple(name for name, kind in KINDS.items() if kind.causal)
    """Rolls out a causal student chunk by chunk (the rest as `DMD`)."""

    @classmethod
    def from_recipe(cls, recipe, *, teacher, student, unwrapped, critic=None, num_processes: int = 1) -> SelfForcing:
        c, tc = recipe.method.self_forcing, recipe.train
        if not recipe.student.denoising_steps:
            raise ValueError(
                "student.denoising_steps: method self_forcing trains a few-step causal student; set "
                "its steps, e.g. [1000, 750, 500, 250]"
            )
        assert critic is not None, "self_forcing needs the critic (build_critic)"
        if c.normalise_per_chunk and recipe.student.independent_first_frame:
            raise ValueError(
                "method.self_forcing.normalise_per_chunk: groups frames in equal chunks, and "
                "student.independent_first_frame makes the first chunk one frame; set one of them to false"
            )
        sigmas = student_sigmas(recipe.student, teacher.cfg.shift, teacher.cfg.num_inference_steps)
        rollout = CausalRollout(
            PreparedCausal(student, unwrapped),
            sigmas,
            seed=tc.seed,
            samples_per_step=tc.batch_size * tc.gradient_accumulation_steps * num_processes,
            num_chunks=c.num_chunks,
            last_only=c.exit_step == "last",
            window=c.dmd_window,
            same_across_chunks=c.same_step_across_chunks,
            window_min_start=c.dmd_window_min_start,
            given_first_chunk=c.given_first_chunk,
            grad_through_steps=c.grad_through_steps,
        )
        anchor = None
        if c.ode_regression_weight > 0:  # (the recipe's check: train.data_source is dataset)
            anchor = ODERegression(
                ODERegression.Config(),
                student=student,
                student_frames_per_block=recipe.student.frames_per_block,
                first_block_frames=1 if recipe.student.independent_first_frame else None,
            )
        return cls(c, teacher=teacher, critic=critic, rollout=rollout, anchor=anchor)

    def __init__(
        self,
        config: SelfForcing.Config,
        *,
        teacher,
        critic: Model,
        rollout: CausalRollout,
        anchor: ODERegression | None = None,
    ):
        """`teacher`: a frozen `WanTeacher`; `critic`: the fake score (a bidirectional Wan transformer, called as a
        `Model`); `rollout`: the causal student's `CausalRollout`; `anchor`: the ODE regression loss added with
        `config.ode_regression_weight` (None: none)."""
        if config.ode_regression_weight > 0 and anchor is None:
            raise ValueError("SelfForcing: ode_regression_weight > 0 needs its `anchor` (from_recipe builds it)")
        self.anchor = anchor
        self.needs_trajectory = anchor is not None
        """This instance reads the stored trajectories (the class, as DMD, does not)."""
        if config.frame_wise_timesteps or (config.given_first_chunk > 0 and teacher.image_conditioned):
            transformer = teacher.pipe.transformer
            if teacher.boundary is not None or transformer.config.patch_size[0] != 1:
                raise ValueError(
                    "method.self_forcing.frame_wise_timesteps: the teacher takes per-frame timesteps only as a single "
                    f"expert with temporal patch 1 (Wan2.1), this one has patch {tuple(transformer.config.patch_size)}"
                    f"{' and two experts' if teacher.boundary is not None else ''}; set it to false"
                )
            critic = PerTokenTimesteps(critic, transformer.config.patch_size)
        super().__init__(config, teacher=teacher, critic=critic, rollout=rollout)

    def normaliser_frames(self) -> int | None:
        return self.rollout.frames_per_block if self.config.normalise_per_chunk else None

    def draw_sigma_noise(self, generators: list[torch.Generator], x0: torch.Tensor):
        """Per sample: σ (one, or with frame_wise_timesteps one per chunk, broadcast to [B, F]), then ε' like x0.
        A given first chunk under an image-conditioned teacher gets σ = 0 on its frames (module docstring)."""
        if not self.config.frame_wise_timesteps:
            sigma, noise = super().draw_sigma_noise(generators, x0)
        else:
            c, n, frames = self.config, self.rollout.frames_per_block, x0.shape[2]
            u = torch.stack([torch.rand(math.ceil(frames / n), generator=g) for g in generators]).to(x0.device)
            sigma = c.min_sigma + (c.max_sigma - c.min_sigma) * shift_sigma(u, self.shift)
            sigma = sigma.repeat_interleave(n, dim=1)[:, :frames]
            noise = randn_per_sample(generators, tuple(x0.shape[1:]), x0.device)
        if self.rollout.last_given and self.rollout.last_window[0] == 0 and self.teacher.image_conditioned:
            sigma = given_frame_sigmas(sigma, x0.shape[2], self.rollout.model.first_block_frames)
        return sigma, noise

    def generator_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # 1-4. DMD.generator_loss: roll out (graph on each chunk's exit step), re-noise, real and fake scores, L_G
        loss, logs = super().generator_loss(batch)
        exits = torch.tensor(self.rollout.last_exit_steps, dtype=torch.float32)
        logs = {**logs, "self_forcing/exit_step_mean": exits.mean()}
        if self.config.given_first_chunk > 0:
            logs["self_forcing/given_first_chunk"] = torch.tensor(float(self.rollout.last_given))
        if self.anchor is not None:  # 5. the ODE anchor on the batch's stored trajectories
            ode, _ = self.anchor.loss(batch)
            loss = loss + self.config.ode_regression_weight * ode
            logs["loss/ode_anchor"] = ode.detach()
        return loss, logs


__all__ = [
    "CausalRollout",
    "PerTokenTimesteps",
    "PreparedCausal",
    "SelfForcing",
    "draw_exit_steps",
    "draw_given_first_chunk",
    "draw_window_end",
    "per_token_timesteps",
]
