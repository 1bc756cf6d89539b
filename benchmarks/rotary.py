"""The causal student's RoPE rotation: one complex product (`students.causal_attention.apply_rotary`) against the
strided writes of diffusers' `WanAttnProcessor` (the formula below), timed interleaved in one run.

    python -m benchmarks.rotary [--repeats 100]

Two figures, forward + backward, float32 on the CPU (one thread unless OMP_NUM_THREADS says otherwise):
- `rotation`: the rotation alone at the shipped toy teacher's shape (batch 8, 192 tokens, 5 heads x 32) and at
  Wan2.1-1.3B's heads on one 480p latent frame (batch 1, 1560 tokens, 12 heads x 128);
- `block_causal_forward`: the shipped toy teacher's transformer as a causal student (chunks of 3 latent frames), one
  training forward + backward of a batch of 8 teacher-length videos, with either rotation.
Also the largest difference between the two rotations' outputs (they compute the same products). Prints one JSON
line with the ratios strided / complex and appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import students.causal_attention as causal_attention
from benchmarks.common import SHIPPED_TOY_TEACHER, sig
from benchmarks.results import append_result


def strided_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' WanAttnProcessor rotation (its nested `apply_rotary_emb`), the baseline."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Mean seconds per call of each fn, calls alternated so that load on the machine hits both alike."""
    for fn in fns.values():  # warm-up
        fn()
    total = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            total[name] += time.perf_counter() - t0
    return {name: t / repeats for name, t in total.items()}


def rotation(batch: int, tokens: int, heads: int, head_dim: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, heads, head_dim, generator=g, requires_grad=True)
    angles = torch.rand(1, tokens, 1, head_dim // 2, generator=g) * 6.28
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)

    def step(fn):
        def run():
            fn(x, cos, sin).square().sum().backward()

        return run

    seconds = interleaved({"strided": step(strided_rotary), "complex": step(causal_attention.apply_rotary)}, repeats)
    with torch.no_grad():
        diff = (strided_rotary(x, cos, sin) - causal_attention.apply_rotary(x, cos, sin)).abs().max().item()
    return {
        "shape": [batch, tokens, heads, head_dim],
        "strided_ms": sig(seconds["strided"] * 1e3),
        "complex_ms": sig(seconds["complex"] * 1e3),
        "ratio": seconds["strided"] / seconds["complex"],
        "max_abs_diff": diff,
    }


def block_causal_forward(repeats: int) -> dict:
    from diffusers import WanTransformer3DModel

    from students.causal import CausalWan
    from students.config import StudentConfig

    transformer = WanTransformer3DModel.from_pretrained(SHIPPED_TOY_TEACHER / "transformer")
    model = CausalWan(transformer, StudentConfig(name="bench", kind="causal", frames_per_block=3))
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, cfg.in_channels, 9, 32, 32, generator=g)
    t = torch.full((8, 9), 500.0)
    text = torch.randn(8, 32, cfg.text_dim, generator=g)
    built = causal_attention.apply_rotary

    def step(fn):
        def run():
            causal_attention.apply_rotary = fn  # the attention processor looks the rotation up at call time
            try:
                model(x, t, text).square().mean().backward()
            finally:
                causal_attention.apply_rotary = built
            model.zero_grad(set_to_none=True)

        return run

    seconds = interleaved({"strided": step(strided_rotary), "complex": step(built)}, repeats)
    return {
        "latent_shape": list(x.shape),
        "strided_s": sig(seconds["strided"]),
        "complex_s": sig(seconds["complex"]),
        "ratio": seconds["strided"] / seconds["complex"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rotary", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=100, help="timed calls of each rotation (a tenth for the forward)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    result = {
        "benchmark": "rotary",
        "threads": torch.get_num_threads(),
        "rotation": {
            "toy": rotation(8, 192, 5, 32, args.repeats),
            "wan21_1.3b_480p_frame": rotation(1, 1560, 12, 128, args.repeats),
        },
        "block_causal_forward": block_causal_forward(max(1, args.repeats // 10)),
    }
    ratios = {
        "ratio_rotation_toy": result["rotation"]["toy"]["ratio"],
        "ratio_rotation_1.3b_frame": result["rotation"]["wan21_1.3b_480p_frame"]["ratio"],
        "ratio_block_causal_forward": result["block_causal_forward"]["ratio"],
    }
    print(json.dumps({**result, **ratios}))
    if not args.no_record:
        append_result(
            "python -m benchmarks.rotary " + " ".join(argv or sys.argv[1:]), {**result, **ratios}, list(ratios)
        )
    return result


if __name__ == "__main__":
    main()
