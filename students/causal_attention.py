"""Attention pieces of the causal student (DESIGN.md §5 "Causal"): visibility rule, RoPE at any frame,
the KV cache, and the attention processors that Wan's unchanged blocks call.

Positions here are TEMPORAL TOKENS (latent frame // p_t, with p_t the transformer's temporal patch);
Wan2.1/2.2 have p_t = 1, so a temporal token is a latent frame. A temporal token holds hh·ww spatial tokens,
contiguous in Wan's token order (f, h, w).

Visibility (the same rule for the parallel mask and for the cache): a query in a chunk ending at token `end`
(exclusive) sees key position j iff
    j < end  and  (window is None  or  j < sink  or  j >= end - (window - sink)),
i.e. its own chunk and earlier ones, limited to the `window` positions ending at `end`, `sink` of which are
the first positions of the video (pinned, never evicted).

How the processors get their per-call inputs: the blocks call `attn1(x, None, None, rotary_emb)` and
`attn2(x, encoder_hidden_states, None, None)`. `CausalWan` passes a `SelfAttnInputs` in place of the
rotary tuple and a `CrossKV` in place of the text states; plain tensors/tuples fall back to diffusers'
`WanAttnProcessor`, so the wrapped transformer called directly is still the bidirectional teacher. Passing
the inputs as arguments (not as processor state) keeps gradient checkpointing's recompute correct.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, _get_qkv_projections
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# WanRotaryPosEmbed's theta: WanTransformer3DModel builds it with the default and does not store it.
ROPE_THETA = 10000.0


def visible(key_pos: torch.Tensor, end: torch.Tensor | int, window: int | None, sink: int) -> torch.Tensor:
    """Bool: key positions seen by a query whose chunk ends at `end` (exclusive); see the module docstring."""
    seen = key_pos < end
    if window is not None:
        seen = seen & ((key_pos < sink) | (key_pos >= end - (window - sink)))
    return seen


def chunk_end(pos, block: int, first: int | None, num_pos: int):
    """End (exclusive) of the chunk of temporal position(s) `pos` (an int tensor): the first chunk is `first`
    positions (None: `block`; CausVid's independent first frame: 1), every later one `block`, the last cut at
    num_pos. Arithmetic only, so flex_attention's mask function can call it on index tensors."""
    first = block if first is None else first
    later = first + ((pos - first).clamp(min=0) // block + 1) * block
    return torch.clamp(torch.where(pos < first, torch.full_like(pos, first), later), max=num_pos)


def _position_visibility(num_pos: int, block: int, window: int | None, sink: int, first: int | None):
    """[query pos, key pos] bool: what each temporal position sees (`visible` at its chunk's end, `chunk_end`);
    None when every position sees every position (no mask needed)."""
    pos = torch.arange(num_pos)
    vis = visible(pos[None, :], chunk_end(pos, block, first, num_pos)[:, None], window, sink)
    return None if bool(vis.all()) else vis


def block_causal_mask(
    num_pos: int,
    tokens_per_pos: int,
    block: int,
    window: int | None,
    sink: int,
    device: torch.device,
    first: int | None = None,
) -> torch.Tensor | None:
    """SDPA mask [S, S] (True = attend), S = num_pos·tokens_per_pos, over chunks of `block` positions (the first
    chunk `first` positions, `chunk_end`).

    A chunk ends at min((c+1)·block, num_pos). None when every token sees every token (no mask needed).
    Dense: S² bytes (1.07 GB at 480×832×81); `block_causal_block_mask` is the flex_attention form.
    """
    vis = _position_visibility(num_pos, block, window, sink, first)
    if vis is None:
        return None
    tok = torch.arange(num_pos * tokens_per_pos) // tokens_per_pos
    return vis[tok][:, tok].to(device)


FLEX_BLOCK_SIZE = 128
"""Tokens per flex_attention block (its default; the kernels tile queries and keys by it)."""


def block_causal_block_mask(
    num_pos: int,
    tokens_per_pos: int,
    block: int,
    window: int | None,
    sink: int,
    device: torch.device,
    block_size: int = FLEX_BLOCK_SIZE,
    first: int | None = None,
) -> BlockMask | None:
    """The mask of `block_causal_mask` as a flex_attention `BlockMask`: O((S/block_size)²) integers, not S² bools.

    Built from the rule at the level of temporal positions (`visible`, num_pos² entries): a (query block, key
    block) tile is full when every pair of positions it spans is visible, partial when some are (flex_attention
    then calls the mask function per token), skipped when none are. Written here rather than with
    `create_block_mask`, which evaluates the mask per token pair (40 s and 10 GB of host memory at 480p on CPU).
    """
    vis = _position_visibility(num_pos, block, window, sink, first)
    if vis is None:
        return None
    total = num_pos * tokens_per_pos
    n = math.ceil(total / block_size)
    lo = torch.arange(n) * block_size // tokens_per_pos  # positions spanned by each tile: lo..hi
    hi = (torch.clamp((torch.arange(n) + 1) * block_size, max=total) - 1) // tokens_per_pos
    # visible pairs in [lo_q..hi_q] × [lo_k..hi_k] from a 2-D prefix sum over the position grid
    table = F.pad(vis.long().cumsum(0).cumsum(1), (1, 0, 1, 0))
    q0, q1, k0, k1 = lo[:, None], hi[:, None] + 1, lo[None, :], hi[None, :] + 1
    count = table[q1, k1] - table[q0, k1] - table[q1, k0] + table[q0, k0]
    full = count == (q1 - q0) * (k1 - k0)
    if total % block_size:  # tiles reaching past the sequence's end go through the mask function, as torch's do
        full[-1, :] = False
        full[:, -1] = False
    partial = (count > 0) & ~full

    def order(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tiles per query block [1, 1, n], their key block indices first [1, 1, n, n]) as BlockMask wants."""
        idx = torch.argsort(tiles.to(torch.int8), dim=1, descending=True, stable=True)
        return tiles.sum(1).to(torch.int32)[None, None].to(device), idx.to(torch.int32)[None, None].to(device)

    def mask_mod(b, h, q_idx, kv_idx):  # arithmetic only: also called on the padded tail of the last tile
        return visible(
            kv_idx // tokens_per_pos, chunk_end(q_idx // tokens_per_pos, block, first, num_pos), window, sink
        )

    return BlockMask.from_kv_blocks(
        *order(partial), *order(full), BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(total, total)
    )


def attention_backend(name: str, device: torch.device) -> str:
    """`student.attention` resolved for `device`: `auto` is `flex` on CUDA (compiled flex_attention with a
    `BlockMask`) and `sdpa` elsewhere (the dense mask: flex_attention has no backward on CPU in torch 2.13)."""
    if name != "auto":
        return name
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (its fused kernels; uncompiled it materialises the scores)."""
    return torch.compile(flex_attention, dynamic=False)


def rotary_at(
    transformer: WanTransformer3DModel, positions: torch.Tensor, hh: int, ww: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-D RoPE (cos, sin) [1, n·hh·ww, 1, head_dim] for temporal positions `positions` [n] (any
    values, past `rope_max_seq_len` too) and the spatial grid hh × ww, in Wan's token order.

    The temporal part is computed exactly as `WanRotaryPosEmbed` builds its table (same function and
    dtype), so positions inside the table give bit-identical values; the spatial part is its table.
    """
    rope = transformer.rope
    if max(hh, ww) > rope.max_seq_len:
        raise ValueError(f"latent grid {hh}x{ww} tokens exceeds the transformer's rope_max_seq_len {rope.max_seq_len}")
    freqs_dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64  # as WanRotaryPosEmbed
    cos_t, sin_t = get_1d_rotary_pos_embed(
        rope.t_dim,
        positions.to("cpu", freqs_dtype),
        ROPE_THETA,
        use_real=True,
        repeat_interleave_real=True,
        freqs_dtype=freqs_dtype,
    )
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    n = len(positions)
    out = []
    for table, temporal in ((rope.freqs_cos, cos_t), (rope.freqs_sin, sin_t)):
        _, tab_h, tab_w = table.split(split, dim=1)
        parts = [
            temporal.to(table.device, table.dtype).view(n, 1, 1, -1).expand(n, hh, ww, -1),
            tab_h[:hh].view(1, hh, 1, -1).expand(n, hh, ww, -1),
            tab_w[:ww].view(1, 1, ww, -1).expand(n, hh, ww, -1),
        ]
        out.append(torch.cat(parts, dim=-1).reshape(1, n * hh * ww, 1, -1).to(device))
    return out[0], out[1]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, heads, head_dim] by (cos, sin) [1, S, 1, head_dim], as `WanAttnProcessor` does: each pair
    (x1, x2) -> (x1·cos - x2·sin, x1·sin + x2·cos), in float32. One complex product instead of diffusers' strided
    writes: the same values, 3-4x faster forward + backward on a CPU (python -m benchmarks.rotary)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    turn = torch.complex(cos[..., 0::2].float(), sin[..., 1::2].float())
    return torch.view_as_real(pairs * turn).flatten(-2).type_as(x)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None = None
) -> torch.Tensor:
    """Attention over [B, S, heads, head_dim] tensors (SDPA wants heads first); a `BlockMask` runs flex_attention
    (compiled on CUDA; eager elsewhere, forward only)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if isinstance(mask, BlockMask):
        flex = _compiled_flex() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@dataclass
class KVCache:
    """The state of one chunk-by-chunk rollout: the text, per-layer cross-attention K/V and self-attention K/V.

    Self-attention entries are [B, n, hh·ww, heads, head_dim] over the temporal positions `positions`
    (ascending; keys stored already rotated at their own positions). With a window the cache holds at
    most `window` positions: the first `sink` and the last `window - sink`.

    The cross-attention K/V are computed inside the blocks' own forward (so a sharded or wrapped model computes them
    with its weights gathered): stored by the first chunk forward run without grad, recomputed by every forward with
    grad, so each exit step's graph reaches the text projections (the same values and the same summed gradient as
    K/V computed once with grad).
    """

    text: torch.Tensor
    """[B, L, D_text]: the prompt's encoder hidden states (cast to the model's dtype)."""
    cross_k: list[torch.Tensor | None]
    """Per layer [B, L, heads, head_dim]: cross-attention keys of the text, None until a forward without grad."""
    cross_v: list[torch.Tensor | None]
    self_k: list[torch.Tensor | None]
    self_v: list[torch.Tensor | None]
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """Temporal positions held by `self_k` / `self_v` (CPU long tensor)."""
    grid: tuple[int, int] | None = None
    """(hh, ww) tokens of each position; set by the first chunk."""

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    @property
    def end(self) -> int:
        """One past the last cached position (0 when empty): where the next chunk may start."""
        return int(self.positions[-1]) + 1 if len(self.positions) else 0

    def num_tokens(self) -> int:
        """Self-attention tokens held per layer (bounded by window·hh·ww with a window)."""
        return 0 if self.self_k[0] is None else self.self_k[0].shape[1] * self.self_k[0].shape[2]

    def has_cross(self) -> bool:
        """Whether the cross-attention K/V are stored (after a chunk forward without grad)."""
        return self.cross_k[0] is not None


@dataclass
class SelfAttnInputs:
    """What `CausalSelfAttnProcessor` needs for one forward, passed where the blocks pass `rotary_emb`.

    Parallel: `mask` (None = full attention). Cached: `past_k` / `past_v`, the cache's per-layer tensors
    at call time (a snapshot, so a checkpointed recompute after later chunks updated the cache sees the
    same keys), and indices into the concatenation [cached positions, chunk positions]: `attend` (None =
    all) and `keep`, the entries written back to `cache` (None = no update).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    positions: int
    """Temporal positions of the query tokens (each holds S / positions tokens)."""
    mask: torch.Tensor | BlockMask | None = None
    past_k: list[torch.Tensor | None] | None = None
    past_v: list[torch.Tensor | None] | None = None
    attend: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    cache: KVCache | None = None


@dataclass
class CrossKV:
    """Cross-attention inputs, passed where the blocks pass `encoder_hidden_states`: the cache's stored K/V, or the
    projected text [B, L, dim] to compute them from (stored into `cache` when given)."""

    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    text: torch.Tensor | None = None
    cache: KVCache | None = None


class CausalSelfAttnProcessor(WanAttnProcessor):
    """Self-attention of block `layer` with a block-causal mask or a KV cache (see the module docstring)."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        rotary_emb=None,
    ) -> torch.Tensor:
        if not isinstance(rotary_emb, SelfAttnInputs):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        ctx = rotary_emb
        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        q = apply_rotary(attn.norm_q(q).unflatten(2, (attn.heads, -1)), ctx.cos, ctx.sin)
        k = apply_rotary(attn.norm_k(k).unflatten(2, (attn.heads, -1)), ctx.cos, ctx.sin)
        v = v.unflatten(2, (attn.heads, -1))
        if ctx.past_k is None:
            out = sdpa(q, k, v, ctx.mask)
        else:
            out = self._cached(q, k, v, ctx)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    def _cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: SelfAttnInputs) -> torch.Tensor:
        i = self.layer
        k, v = k.unflatten(1, (ctx.positions, -1)), v.unflatten(1, (ctx.positions, -1))  # [B, n, hw, heads, d]
        if ctx.past_k[i] is not None:
            k, v = torch.cat([ctx.past_k[i], k], dim=1), torch.cat([ctx.past_v[i], v], dim=1)
        if ctx.keep is not None:
            ctx.cache.self_k[i], ctx.cache.self_v[i] = k.index_select(1, ctx.keep), v.index_select(1, ctx.keep)
        if ctx.attend is not None:
            k, v = k.index_select(1, ctx.attend), v.index_select(1, ctx.attend)
        return sdpa(q, k.flatten(1, 2), v.flatten(1, 2))


class CausalCrossAttnProcessor(WanAttnProcessor):
    """Cross-attention of block `layer` reading (or computing and storing) text K/V from a `CrossKV` (else diffusers'
    processor)."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        rotary_emb=None,
    ) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, CrossKV):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        ctx, i = encoder_hidden_states, self.layer
        if ctx.text is None:
            k, v = ctx.k[i], ctx.v[i]
        else:
            k, v = cross_kv(attn, ctx.text)
            if ctx.cache is not None:
                ctx.cache.cross_k[i], ctx.cache.cross_v[i] = k, v
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = sdpa(q, k, v)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def cross_kv(attn: WanAttention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention K/V [B, L, heads, head_dim] of projected text states [B, L, dim]."""
    if attn.fused_projections:
        k, v = attn.to_kv(text).chunk(2, dim=-1)
    else:
        k, v = attn.to_k(text), attn.to_v(text)
    return attn.norm_k(k).unflatten(2, (attn.heads, -1)), v.unflatten(2, (attn.heads, -1))


def install_processors(transformer: WanTransformer3DModel) -> None:
    """Put the causal processors on every block (idempotent). Plain calls keep the teacher's behaviour."""
    for i, block in enumerate(transformer.blocks):
        if not isinstance(block.attn1.processor, CausalSelfAttnProcessor):
            block.attn1.set_processor(CausalSelfAttnProcessor(i))
        if not isinstance(block.attn2.processor, CausalCrossAttnProcessor):
            block.attn2.set_processor(CausalCrossAttnProcessor(i))
