"""Causal few-step students (CausVid / Self-Forcing; DESIGN.md §5 "Causal").

`CausalWan` wraps an UNCHANGED `WanTransformer3DModel` (the teacher's weights and state dict, key for key):
it installs attention processors (`students/causal_attention.py`) and runs the model's own sub-modules with

- per-frame timesteps t [B, F] (t = 1000·σ), expanded to Wan's per-token timestep path;
- `forward`: the parallel training forward with a block-causal mask over chunks of `frames_per_block`
  latent frames (a token sees its chunk and earlier ones, limited to `local_window` frames plus `sink`);
- `init_cache` / `forward_chunk`: chunk-by-chunk inference with a KV cache (rolling window plus sink,
  cross-attention K/V computed once, RoPE at the chunk's true frame offset with no length cap).

The cached rollout is the parallel forward computed chunk by chunk: fed the same inputs, both agree to
float32 rounding (tests/test_causal.py). `sample_causal` / `stream_causal` are the few-step causal sampler
with Self-Forcing's cache refresh at `context_noise`.

    causal = student.causal                          # or CausalWan(transformer, student_cfg)
    v = causal(x, t, text)                           # x [B, C, F, H, W], t [B, F] or [B]; v = ε - x0
    video = sample_causal(causal, text, noise, sigmas, generator=g)
    for chunk in stream_causal(causal, text, noise, sigmas): ...   # [B, C, frames_per_block, H, W] each
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from diffusers import WanTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from core.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity
from students.causal_attention import (
    CrossKV,
    KVCache,
    SelfAttnInputs,
    attention_backend,
    block_causal_block_mask,
    block_causal_mask,
    install_processors,
    rotary_at,
    visible,
)
from students.config import StudentConfig

logger = logging.getLogger(__name__)


class CausalWan(nn.Module):
    """Block-causal view of a `WanTransformer3DModel`: no weights of its own (see the module docstring).

    The transformer is used in place (processors installed; called directly it still gives the
    bidirectional output). Lengths are in latent frames; `frames_per_block`, `local_window` and `sink`
    must be multiples of the temporal patch size p_t.
    """

    def __init__(self, transformer: WanTransformer3DModel, cfg: StudentConfig):
        super().__init__()
        p_t = transformer.config.patch_size[0]
        for key in ("frames_per_block", "local_window", "sink"):
            value = getattr(cfg, key)
            if value is not None and value % p_t:
                raise ValueError(
                    f"student.{key}: must be a multiple of the transformer's temporal patch size {p_t}, got {value}"
                )
        if transformer.config.added_kv_proj_dim is not None:
            raise ValueError(
                "student.kind=causal: image-conditioned (I2V) Wan transformers are not supported; "
                "use a text-to-video teacher"
            )
        if cfg.independent_first_frame and p_t != 1:
            raise ValueError(
                f"student.independent_first_frame: the first latent frame alone is a chunk only with temporal patch 1 "
                f"(Wan), this transformer's is {p_t}; set it to false"
            )
        install_processors(transformer)
        self.transformer = transformer
        self.cfg = cfg
        self.p_t = p_t
        self.block = cfg.frames_per_block // p_t
        self.first = 1 if cfg.independent_first_frame else self.block  # positions of the first chunk
        self.window = None if cfg.local_window is None else cfg.local_window // p_t
        self.sink = cfg.sink // p_t
        self._backend: dict[str, str] = {}  # device type -> attention backend, chosen and logged once

    @property
    def frames_per_block(self) -> int:
        return self.cfg.frames_per_block

    @property
    def first_block_frames(self) -> int:
        """Latent frames of the first chunk: 1 with `student.independent_first_frame`, else `frames_per_block`."""
        return self.first * self.p_t

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # ---- shared pieces ---------------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        p_t, p_h, p_w = self.transformer.config.patch_size
        _, _, f, h, w = x.shape
        if f % p_t or h % p_h or w % p_w:
            raise ValueError(
                f"latents {tuple(x.shape)}: frames/height/width must be multiples of the patch {(p_t, p_h, p_w)}"
            )
        return f // p_t, h // p_h, w // p_w

    def _frame_timesteps(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """t as [B, F] (latent frames) from a scalar, [B] or [B, F]."""
        b, f = x.shape[0], x.shape[2]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim == 1:
            t = t[:, None].expand(b, f)
        if tuple(t.shape) != (b, f):
            raise ValueError(f"timesteps: expected [B] or [B, F] = [{b}] or [{b}, {f}], got {tuple(t.shape)}")
        return t

    def _embed(self, t: torch.Tensor, text: torch.Tensor, n_pos: int, hw: int):
        """(temb, timestep_proj, text) for Wan's blocks and head from per-frame t [B, F].

        One timestep per sample: Wan's 1-D path, as the teacher. Otherwise the embedding is computed per
        temporal position and repeated over its hw tokens: Wan's per-token (2-D timestep) path.
        """
        embedder = self.transformer.condition_embedder
        b = t.shape[0]
        t_pos = t.view(b, n_pos, self.p_t)
        if self.p_t > 1 and not torch.equal(t_pos, t_pos[..., :1].expand_as(t_pos)):
            raise ValueError(f"timesteps: frames of one temporal patch ({self.p_t} frames) must share a timestep")
        t_pos = t_pos[..., 0]
        if bool((t_pos == t_pos[:, :1]).all()):
            temb, proj, text, _ = embedder(t_pos[:, 0], text, None)
            return temb, proj.unflatten(1, (6, -1)), text
        temb, proj, text, _ = embedder(t_pos.flatten(), text, None, timestep_seq_len=n_pos)
        temb = temb.repeat_interleave(hw, dim=1)  # [B, S, D]
        proj = proj.repeat_interleave(hw, dim=1).unflatten(2, (6, -1))  # [B, S, 6, D]
        return temb, proj, text

    def _run(
        self, x: torch.Tensor, temb: torch.Tensor, proj: torch.Tensor, text, attn: SelfAttnInputs, checkpoint: bool
    ) -> torch.Tensor:
        """Patch-embed, the blocks, and the output head of `WanTransformer3DModel.forward`."""
        tr = self.transformer
        b, _, f, h, w = x.shape
        p_t, p_h, p_w = tr.config.patch_size
        hs = tr.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        for block in tr.blocks:
            if checkpoint and torch.is_grad_enabled() and tr.gradient_checkpointing:
                hs = tr._gradient_checkpointing_func(block, hs, text, proj, attn)
            else:
                hs = block(hs, text, proj, attn)
        if temb.ndim == 3:  # per-token timesteps
            shift, scale = (tr.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (tr.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hs = (tr.norm_out(hs.float()) * (1 + scale) + shift).type_as(hs)
        hs = tr.proj_out(hs).reshape(b, f // p_t, h // p_h, w // p_w, p_t, p_h, p_w, -1)
        return hs.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    # ---- parallel (training) forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor | float, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """v = ε - x0 [B, C, F, H, W] for latents x at per-frame timesteps t [B, F] (or [B]), block-causal.

        Chunks as `chunk_bounds` lays them out (the last may be shorter).
        Inputs are cast to the transformer's dtype; v comes back in x's dtype.
        """
        n_pos, hh, ww = self._grid(x)
        t = self._frame_timesteps(t, x)
        dtype, device = self.dtype, x.device
        temb, proj, text = self._embed(t, encoder_hidden_states.to(dtype), n_pos, hh * ww)
        cos, sin = rotary_at(self.transformer, torch.arange(n_pos), hh, ww, device)
        mask = self._mask(n_pos, hh * ww, device)
        v = self._run(x.to(dtype), temb, proj, text, SelfAttnInputs(cos, sin, n_pos, mask=mask), checkpoint=True)
        return v.to(x.dtype)

    def _mask(self, n_pos: int, tokens_per_pos: int, device: torch.device):
        """The block-causal mask in the form `student.attention` picks for `device` (see `attention_backend`)."""
        kind = torch.device(device).type
        if kind not in self._backend:
            self._backend[kind] = attention_backend(self.cfg.attention, device)
            logger.info(
                "causal student: parallel forward on %s with %s attention (student.attention: %s)",
                kind,
                self._backend[kind],
                self.cfg.attention,
            )
        build = block_causal_block_mask if self._backend[kind] == "flex" else block_causal_mask
        return build(n_pos, tokens_per_pos, self.block, self.window, self.sink, device, first=self.first)

    # ---- chunk-by-chunk inference with a KV cache ------------------------------------------------------
    def init_cache(self, batch: int, encoder_hidden_states: torch.Tensor) -> KVCache:
        """An empty cache for `batch` videos of the text [B, L, D_text]; computes nothing (the first chunk forward
        projects the text and its cross-attention K/V inside the blocks: `KVCache`)."""
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states: batch {encoder_hidden_states.shape[0]}, expected {batch}")
        n = len(self.transformer.blocks)
        return KVCache(
            text=encoder_hidden_states.to(self.dtype),
            cross_k=[None] * n,
            cross_v=[None] * n,
            self_k=[None] * n,
            self_v=[None] * n,
        )

    def forward_chunk(
        self, x: torch.Tensor, t: torch.Tensor | float, cache: KVCache, frame_offset: int, update_cache: bool
    ) -> torch.Tensor:
        """v [B, C, n, H, W] for one chunk x (n <= frames_per_block latent frames starting at `frame_offset`).

        The chunk attends to the cached frames its window allows and to itself; RoPE uses its true frames
        (any offset, no cap). With `update_cache`, its K/V join the cache and frames outside the window
        (except the sink) are evicted; call it under `no_grad` unless you mean to keep the graph.
        """
        n_pos, hh, ww = self._grid(x)
        if frame_offset < 0 or frame_offset % self.p_t or not 1 <= n_pos <= self.block:
            raise ValueError(
                f"forward_chunk: frame_offset {frame_offset} must be a multiple of {self.p_t} and the "
                f"chunk 1..{self.cfg.frames_per_block} frames, got {x.shape[2]}"
            )
        start = frame_offset // self.p_t
        if start < cache.end:
            raise ValueError(
                f"forward_chunk: frame_offset {frame_offset} overlaps the cache (frames up to "
                f"{cache.end * self.p_t} are cached); chunks must come in order"
            )
        if x.shape[0] != cache.batch_size or cache.grid not in (None, (hh, ww)):
            raise ValueError(
                f"forward_chunk: chunk {tuple(x.shape)} does not match the cache (batch "
                f"{cache.batch_size}, grid {cache.grid}); use init_cache for a new video"
            )
        cache.grid = (hh, ww)
        end = start + n_pos
        new_pos = torch.arange(start, end)
        all_pos = torch.cat([cache.positions, new_pos])
        seen = visible(all_pos, end, self.window, self.sink)  # keys this chunk sees = what the cache keeps
        index = seen.nonzero().flatten().to(x.device)
        attend = None if bool(seen.all()) else index
        attn = SelfAttnInputs(
            *rotary_at(self.transformer, new_pos, hh, ww, x.device),
            n_pos,
            past_k=list(cache.self_k),
            past_v=list(cache.self_v),
            attend=attend,
            keep=index if update_cache else None,
            cache=cache,
        )
        t = self._frame_timesteps(t, x)
        if torch.is_grad_enabled() or not cache.has_cross():  # project the text here, K/V in the blocks (KVCache)
            temb, proj, text = self._embed(t, cache.text, n_pos, hh * ww)
            cross = CrossKV(cache.cross_k, cache.cross_v, text, None if torch.is_grad_enabled() else cache)
        else:  # stored K/V: an empty text batch skips re-projecting it in the condition embedder
            empty = cache.text[:, :0]
            temb, proj, _ = self._embed(t, empty, n_pos, hh * ww)
            cross = CrossKV(cache.cross_k, cache.cross_v)
        v = self._run(x.to(self.dtype), temb, proj, cross, attn, checkpoint=not update_cache)
        # (no checkpointing while writing the cache: a recompute would write it again)
        if update_cache:
            cache.positions = all_pos[seen]
        return v.to(x.dtype)


class ChunkModelWrapper:
    """The chunk interface `stream_causal` reads, delegated to `self.causal` (a `CausalWan`); wrappers that route or
    time `forward_chunk` (Self-Forcing's DDP routing, the streaming benchmark's clock) subclass it."""

    causal: CausalWan

    @property
    def frames_per_block(self) -> int:
        return self.causal.frames_per_block

    @property
    def first_block_frames(self) -> int:
        return self.causal.first_block_frames

    @property
    def p_t(self) -> int:
        return self.causal.p_t

    @property
    def cfg(self):
        return self.causal.cfg

    def init_cache(self, batch: int, encoder_hidden_states: torch.Tensor):
        return self.causal.init_cache(batch, encoder_hidden_states)

    def forward_chunk(self, x: torch.Tensor, t, cache: KVCache, frame_offset: int, update_cache: bool) -> torch.Tensor:
        return self.causal.forward_chunk(x, t, cache, frame_offset, update_cache)


def per_token_timesteps(t: torch.Tensor, x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Per-frame timesteps t [B, F] for latents x [B, C, F, H, W] -> Wan's per-token timesteps [B, S]
    (S = F/p_t · H/p_h · W/p_w, token order (f, h, w)). The frames of one temporal patch must share t."""
    p_t, p_h, p_w = patch_size
    b, f = t.shape
    pos = t.view(b, f // p_t, p_t)
    if not torch.equal(pos, pos[..., :1].expand_as(pos)):
        raise ValueError(f"timesteps: frames of one temporal patch ({p_t} frames) must share a timestep")
    return pos[..., 0].repeat_interleave((x.shape[3] // p_h) * (x.shape[4] // p_w), dim=1)


# ---- the few-step causal sampler ---------------------------------------------------------------------------
def chunk_bounds(num_frames: int, frames_per_block: int, first_block_frames: int | None = None, start: int = 0):
    """[(start, end)) latent frames of each chunk of a video of `num_frames` frames, from frame `start` on: a chunk
    that starts at frame 0 has `first_block_frames` frames (None: `frames_per_block`), every other one
    `frames_per_block`; the last may be shorter."""
    first = frames_per_block if first_block_frames is None else first_block_frames
    bounds = []
    while start < num_frames:
        end = min(start + (first if start == 0 else frames_per_block), num_frames)
        bounds.append((start, end))
        start = end
    return bounds


def write_prefix(model, cache: KVCache, prefix: torch.Tensor, generator) -> list[tuple]:
    """Write clean latents `prefix` [B, C, P, H, W] (a given clip or image) into the cache as finished chunks are
    written, in the model's chunk layout; returns their (x0, start) pairs. P must be a multiple of p_t."""
    p_t = model.p_t
    if prefix.shape[2] % p_t:
        raise ValueError(
            f"prefix: {prefix.shape[2]} latent frames; this transformer's temporal patch is {p_t}, so a "
            f"prefix must be a multiple of {p_t} latent frames (a single image needs patch 1, as Wan2.1)"
        )
    written = []
    for s, e in chunk_bounds(prefix.shape[2], model.frames_per_block, model.first_block_frames):
        write_context(model, cache, prefix[:, :, s:e], s, generator)
        written.append((prefix[:, :, s:e], s))
    return written


def stream_causal(
    model: CausalWan,
    cond_embeds: torch.Tensor,
    noise: torch.Tensor,
    sigmas: list[float],
    generator: torch.Generator | list[torch.Generator] | None = None,
    exit_steps: int | list[int] | None = None,
    grad_from_chunk: int = 0,
    prefix: torch.Tensor | None = None,
    grad_through_steps: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield each finished chunk's latents x0 [B, C, <=frames_per_block, H, W], chunk by chunk.

    Per chunk (Self-Forcing's inference and training rollout): start from `noise`'s frames (x at σ_0); at
    each σ_i predict x0 = x - σ_i·v with `forward_chunk(update_cache=False)` and re-noise it to σ_{i+1} with
    fresh noise; the chunk's x0 is its output. Before the *next* chunk, the cache is written once from that x0
    re-noised to σ = context_noise/1000 (`student.context_noise`; 0: x0 itself) under `no_grad`: lazily, so
    the last chunk of a rollout costs no cache forward. Any number of frames.

    `exit_steps` (Self-Forcing training): the step index at which each chunk stops (one int for all
    chunks, or one per chunk); steps before it run under `no_grad`, the exit step keeps the caller's grad
    mode and its x0 is the chunk's output (`grad_through_steps`: every step keeps it, so the exit step's graph
    reaches back through the re-noisings to the chunk's first step). None runs every step. `grad_from_chunk`: chunks
    before it run entirely under `no_grad` (context only: Self-Forcing++'s windowed training). Decoding is the caller's.
    Chunks follow `chunk_bounds` (with `student.independent_first_frame`, the first is one frame).

    `prefix` [B, C, P, H, W]: clean latents written into the cache first (`write_prefix`: a given first frame for
    image-to-video, or a clip to continue); `noise` then holds the frames after them, generated from frame P on.
    """
    _check_sigmas(sigmas)
    batch, p = noise.shape[0], 0 if prefix is None else prefix.shape[2]
    bounds = chunk_bounds(p + noise.shape[2], model.frames_per_block, model.first_block_frames, start=p)
    exits = _exit_steps(exit_steps, len(bounds), len(sigmas))
    cache = model.init_cache(batch, cond_embeds)
    if prefix is not None:
        write_prefix(model, cache, prefix.to(noise), generator)
    grad = torch.is_grad_enabled()
    previous = None  # (x0, start) of the chunk whose cache write is still due
    for chunk, (start, end) in enumerate(bounds):
        if previous is not None:
            write_context(model, cache, *previous, generator)
        x0 = denoise_chunk(
            model,
            noise[:, :, start - p : end - p],
            cache,
            start,
            sigmas,
            generator,
            exits[chunk],
            grad=grad and chunk >= grad_from_chunk,
            through_steps=grad_through_steps,
        )
        previous = (x0, start)
        yield x0


def _check_sigmas(sigmas: list[float]) -> None:
    if not sigmas or any(a <= b for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= 0.0:
        raise ValueError(f"sigmas: must be strictly descending and > 0 (one per student step), got {sigmas}")


def denoise_chunk(
    model: CausalWan,
    x: torch.Tensor,
    cache: KVCache,
    start: int,
    sigmas: list[float],
    generator,
    exit_step: int,
    grad: bool,
    through_steps: bool = False,
) -> torch.Tensor:
    """One chunk of the few-step sampler: from x at σ_0, predict x0 = x - σ_i·v with the cache as context and
    re-noise it to σ_{i+1} with fresh noise, up to step `exit_step`, whose x0 is returned. Only the exit step may keep
    a graph (when `grad`), or every step with `through_steps`."""
    batch = x.shape[0]
    for i in range(exit_step + 1):
        last = i == exit_step
        t = torch.full((batch,), sigmas[i], dtype=torch.float32, device=x.device) * NUM_TRAIN_TIMESTEPS
        with torch.set_grad_enabled(grad and (last or through_steps)):
            x0 = x0_from_velocity(x, model.forward_chunk(x, t, cache, start, update_cache=False), sigmas[i])
        if not last:
            x = add_noise(x0, randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype), sigmas[i + 1])
    return x0


@torch.no_grad()
def write_context(
    model: CausalWan, cache: KVCache, x0: torch.Tensor, start: int, generator, t: float | None = None
) -> None:
    """Append a finished chunk to the cache: its x0 re-noised to σ = t/1000 (when t > 0) at timestep t, t being
    `student.context_noise` unless given."""
    t = float(model.cfg.context_noise) if t is None else float(t)
    context = x0.detach()
    if t > 0:
        eps = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        context = add_noise(context, eps, t / NUM_TRAIN_TIMESTEPS)
    t_ctx = torch.full((x0.shape[0],), t, dtype=torch.float32, device=x0.device)
    model.forward_chunk(context, t_ctx, cache, start, update_cache=True)


def sample_causal(
    model: CausalWan,
    cond_embeds: torch.Tensor,
    noise: torch.Tensor,
    sigmas: list[float],
    generator: torch.Generator | list[torch.Generator] | None = None,
    exit_steps: int | list[int] | None = None,
    grad_from_chunk: int = 0,
    prefix: torch.Tensor | None = None,
    grad_through_steps: bool = False,
) -> torch.Tensor:
    """The whole causal rollout [B, C, F, H, W] (`stream_causal`'s chunks concatenated on frames; a `prefix` is
    not part of it)."""
    chunks = stream_causal(
        model, cond_embeds, noise, sigmas, generator, exit_steps, grad_from_chunk, prefix, grad_through_steps
    )
    return torch.cat(list(chunks), dim=2)


def _exit_steps(exit_steps: int | list[int] | None, num_chunks: int, num_steps: int) -> list[int]:
    if exit_steps is None:
        return [num_steps - 1] * num_chunks
    exits = [exit_steps] * num_chunks if isinstance(exit_steps, int) else list(exit_steps)
    if len(exits) != num_chunks or any(not 0 <= e < num_steps for e in exits):
        raise ValueError(
            f"exit_steps: need one step index in 0..{num_steps - 1} per chunk ({num_chunks}), got {exit_steps}"
        )
    return exits


class CausalStream:
    """An open chunk-by-chunk rollout whose prompt can change between chunks and which can start from given frames.

        stream = CausalStream(model, embeds_a, noise, sigmas, generator, prefix=None)
        x0 = stream.next_chunk()          # [B, C, <=frames_per_block, H, W], as `stream_causal` yields them
        stream.switch(embeds_b, recache=True)
        x0 = stream.next_chunk()          # under the new prompt

    `noise` [B, C, F, H, W] holds the initial noise of the chunks to generate (after the prefix); with no switch and
    no prefix the chunks equal `stream_causal`'s. `prefix` [B, C, P, H, W]: clean latents (a given clip, or one frame
    for image-to-video where the temporal patch is 1) written into the cache first, as finished chunks are;
    generation continues at frame P.

    `switch(embeds, recache)`: the cross-attention cache is rebuilt from the new text. `recache=True` (LongLive's KV
    re-cache) also recomputes the self-attention cache from the finished (clean) chunks it holds, under the new
    prompt, so the context reads as if it had been made for it; `recache=False` keeps the context's keys and values
    as they were written under the old prompt. A chunk finished but not yet written is written under the new prompt.
    """

    def __init__(
        self,
        model: CausalWan,
        cond_embeds: torch.Tensor,
        noise: torch.Tensor,
        sigmas: list[float],
        generator: torch.Generator | list[torch.Generator] | None = None,
        prefix: torch.Tensor | None = None,
    ):
        _check_sigmas(sigmas)
        self.model, self.noise, self.sigmas, self.generator = model, noise, sigmas, generator
        self.batch = noise.shape[0]
        self.cache = model.init_cache(self.batch, cond_embeds)
        self.written: list[tuple[torch.Tensor, int]] = []  # (x0, start) of chunks in the cache
        self.pending: tuple[torch.Tensor, int] | None = None  # finished, not yet written
        self.pending_t: int | None = None  # the timestep it is written at (None: student.context_noise)
        self.start = 0  # the next chunk's first latent frame
        self.generated = 0  # frames of `noise` used
        if prefix is not None:
            for x0, start in write_prefix(model, self.cache, prefix.to(noise), generator):
                self._remember(x0, start)
            self.start = prefix.shape[2]

    @property
    def frames_left(self) -> int:
        return self.noise.shape[2] - self.generated

    @torch.no_grad()
    def _write(self, x0: torch.Tensor, start: int, t: float | None = None) -> None:
        write_context(self.model, self.cache, x0, start, self.generator, t)
        self._remember(x0, start)

    def _remember(self, x0: torch.Tensor, start: int) -> None:
        """Keep a written chunk for re-caching on a switch, and forget those the window evicted."""
        self.written.append((x0, start))
        kept = set(self.cache.positions.tolist())  # drop chunks the window has evicted entirely
        p_t = self.model.p_t
        self.written = [(x, s) for x, s in self.written if kept & set(range(s // p_t, (s + x.shape[2]) // p_t))]

    @torch.no_grad()
    def switch(
        self,
        cond_embeds: torch.Tensor,
        recache: bool = True,
        keep_chunks: int | None = None,
        context_noise: int | None = None,
    ) -> None:
        """Continue under the prompt `cond_embeds` [B, L, D_text] from the next chunk on (see the class docstring).
        `keep_chunks` (with `recache`): re-cache only the latest this-many finished chunks and drop older context, so
        the new prompt meets less of the old scene (a finished chunk not yet written counts as the latest).
        `context_noise` (with `recache`): re-cache the old chunks re-noised to this timestep instead of
        `student.context_noise`, so they pull less on the new scene (the chunk finished before the switch too); chunks
        made after the switch are written as usual."""
        if (keep_chunks is not None or context_noise is not None) and not recache:
            raise ValueError("switch: keep_chunks and context_noise re-cache the context; they need recache=True")
        if keep_chunks is not None and keep_chunks < 1:
            raise ValueError(f"switch: keep_chunks must be >= 1, got {keep_chunks}")
        if context_noise is not None and not 0 <= context_noise <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"switch: context_noise must be a timestep in [0, 1000], got {context_noise}")
        new = self.model.init_cache(self.batch, cond_embeds)
        if recache:
            old, self.written = self.written, []
            if keep_chunks is not None:
                old = old[max(len(old) - keep_chunks + (self.pending is not None), 0) :]
            self.cache = new
            for x0, start in old:
                self._write(x0, start, context_noise)
            self.pending_t = context_noise  # the old scene's last chunk, written with the next one
        else:
            new.self_k, new.self_v, new.positions, new.grid = (
                self.cache.self_k,
                self.cache.self_v,
                self.cache.positions,
                self.cache.grid,
            )
            self.cache = new

    @torch.no_grad()
    def next_chunk(self) -> torch.Tensor:
        """The next chunk's x0 [B, C, n, H, W] (the few-step sampler on its noise, with the cache as context)."""
        if self.frames_left <= 0:
            raise StopIteration
        if self.pending is not None:
            self._write(*self.pending, self.pending_t)
            self.pending, self.pending_t = None, None
        size = self.model.first_block_frames if self.start == 0 else self.model.frames_per_block
        x = self.noise[:, :, self.generated : self.generated + size]
        x0 = denoise_chunk(
            self.model, x, self.cache, self.start, self.sigmas, self.generator, len(self.sigmas) - 1, grad=False
        )
        self.pending = (x0, self.start)
        self.start += x0.shape[2]
        self.generated += x0.shape[2]
        return x0
