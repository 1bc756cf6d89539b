"""Grow a trained toy teacher by whole attention heads, keeping (nearly) the function it computes.

    python -m teachers.toyworld.widen teachers/toyworld/pipeline outputs/toyworld_teacher_w5/init --heads 5

(how the shipped teacher was made from the earlier 4-head one). A width of 4 heads x 32 = 128 is below the 144
numbers a 3x4x4-px token carries, so 16 directions per token are out of reach of its output layer and 16 out of
sight of its input layer (`build.py`): the noise a sample starts with stays there, and 44% of its flow-matching loss
lies outside `proj_out`'s span. Training a wider model from scratch throws away every step the narrow one took;
this copies it into a model with more heads of the same size (RoPE and FFN width unchanged), new residual channels
and new heads starting silent:

- layers that write the residual stream or a new head get zero rows for the new channels (they start at 0, and the
  new heads' q, k, v are 0);
- layers that read them get small random columns (`noise` x the weight's std), so gradients reach the new channels;
- LayerNorm and RMSNorm now also average over the zero channels, which scales every normalised old channel by
  c = sqrt(new width / old width); the modulation scales, `norm2` and the q/k norms are divided by c to undo it.

That is exact up to two things: a token's mean over the residual channels (LayerNorm also subtracts a mean diluted
by the zeros), and the output layer's scale, whose timestep term cannot be divided by c without changing the
blocks' modulation. Both are small (see the test); fine-tuning absorbs them. diffusers has no widening utility.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

logger = logging.getLogger(__name__)

_BLOCK_SCALE_ROWS, _BLOCK_GATE_ROWS = (1, 4), (2, 5)
"""Rows of a block's modulation (shift, scale, gate, c_shift, c_scale, c_gate) that scale a normalised stream / gate a
write to the residual stream. The output layer's table is (shift, scale): its scale is row 1."""


def _embed(old: torch.Tensor, shape: tuple[int, ...], weight: bool, noise: float, g: torch.Generator) -> torch.Tensor:
    """`old` in the leading corner of zeros(shape); where the last (input) axis of a `weight` grows, the old outputs'
    new input columns get `noise` x std(old) random values."""
    new = torch.zeros(shape)
    new[tuple(slice(0, n) for n in old.shape)] = old
    if weight and shape[-1] > old.shape[-1]:
        cols = new[(*(slice(0, n) for n in old.shape[:-1]), slice(old.shape[-1], None))]
        cols.copy_(noise * old.std() * torch.randn(cols.shape, generator=g))
    return new


def _grow(
    name: str, old: torch.Tensor, shape: torch.Size, d: int, c: float, noise: float, g: torch.Generator
) -> torch.Tensor:
    """One parameter of the grown model from the narrow one (old width d, rescale c)."""
    if name.startswith("condition_embedder.time_proj."):  # outputs are six modulation vectors of the width each
        new = _embed(old.view(6, d, *old.shape[1:]), (6, shape[0] // 6, *shape[1:]), old.ndim == 2, noise, g)
        new[list(_BLOCK_SCALE_ROWS)] /= c
        return new.reshape(shape)
    if name.endswith("scale_shift_table"):  # [1, rows, width]
        block = name != "scale_shift_table"
        new = torch.zeros(shape)
        new[..., :d] = old
        for r in _BLOCK_SCALE_ROWS if block else (1,):
            new[:, r, :d] = (1 + old[:, r]) / c - 1
        for r in _BLOCK_GATE_ROWS if block else ():
            new[:, r, d:] = old[:, r].mean()  # new channels can be written to (their writers start at 0)
        return new
    new = _embed(old, shape, old.ndim >= 2, noise, g)
    if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
        # RMSNorm across the heads (new heads' q/k are 0) and the affine LayerNorm before cross-attention
        new[: old.shape[0]] = old / c
        new[old.shape[0] :] = old.mean() / c
    return new


def widen_transformer(
    narrow: WanTransformer3DModel, heads: int, noise: float = 1e-2, seed: int = 0
) -> WanTransformer3DModel:
    """A WanTransformer3DModel with `heads` attention heads (more than `narrow`'s) computing nearly its function."""
    config = {k: v for k, v in dict(narrow.config).items() if not k.startswith("_")}
    if heads <= config["num_attention_heads"]:
        raise ValueError(f"widen: heads={heads} must exceed the model's {config['num_attention_heads']}")
    d = config["num_attention_heads"] * config["attention_head_dim"]
    config["num_attention_heads"] = heads
    wide = WanTransformer3DModel(**config)
    c = math.sqrt(heads * config["attention_head_dim"] / d)
    g = torch.Generator().manual_seed(seed)
    source, target = narrow.state_dict(), wide.state_dict()
    if source.keys() != target.keys():
        raise ValueError(f"widen: parameter names differ: {sorted(source.keys() ^ target.keys())[:5]}")
    wide.load_state_dict({k: _grow(k, source[k].float(), target[k].shape, d, c, noise, g) for k in target})
    return wide


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="a toy WanPipeline folder (its transformer is widened)")
    p.add_argument("dst", type=Path, help="new pipeline folder (must not exist)")
    p.add_argument("--heads", type=int, required=True, help="attention heads of the grown model")
    p.add_argument("--noise", type=float, default=1e-2, help="new input columns' scale, relative to each weight's std")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if not (args.src / "transformer" / "config.json").is_file():
        raise SystemExit(f"widen: {args.src}/transformer/config.json not found; pass a WanPipeline folder")
    if args.dst.exists():
        raise SystemExit(f"widen: {args.dst} exists; choose a new folder")
    narrow = WanTransformer3DModel.from_pretrained(args.src / "transformer")
    wide = widen_transformer(narrow, args.heads, args.noise, args.seed)
    tmp = args.dst.with_name(args.dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.src, tmp, ignore=shutil.ignore_patterns("transformer", "README.md"))
    wide.save_pretrained(tmp / "transformer")
    tmp.rename(args.dst)
    logger.info(
        "widened %s (width %d) -> %s (width %d, %.2fM parameters)",
        args.src,
        narrow.config.num_attention_heads * narrow.config.attention_head_dim,
        args.dst,
        wide.config.num_attention_heads * wide.config.attention_head_dim,
        sum(t.numel() for t in wide.parameters()) / 1e6,
    )


if __name__ == "__main__":
    main()
