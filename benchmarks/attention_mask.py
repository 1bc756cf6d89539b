"""The causal student's training mask: dense [S, S] boolean (SDPA) against flex_attention's block mask, same run.

    python -m benchmarks.attention_mask                      # mask memory at 480p and 720p (any machine)
    python -m benchmarks.attention_mask --attention          # + one self-attention layer forward+backward (CUDA)
    python -m benchmarks.attention_mask --shape tiny --attention   # CPU check of the script (forward only)

Shapes (chunks of 3 latent frames, no window, the recipes' Wan2.1 settings): `480p` = 480x832x81 (21 latent frames
of 30x52 tokens, S = 32,760), `720p` = 720x1280x81 (21 of 45x80, S = 75,600), `tiny` = 5 frames of 4x4. Both masks
are built by the library (`students.causal_attention.block_causal_mask` / `block_causal_block_mask`) and their
tensors' bytes read off; the dense mask is built only where it fits (`--max-dense-gib`, else S² bytes, marked
`computed`). `--attention` times one Wan2.1-1.3B self-attention (12 heads x 128, bf16 on CUDA) over the sequence with
each mask: scaled_dot_product_attention with the dense mask vs compiled flex_attention with the block mask, forward
and backward, and the peak CUDA memory of each; on a CPU (no flex backward there) the forward only, eager.
Prints one JSON line and appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.common import Clock
from benchmarks.results import append_result
from students.causal_attention import block_causal_block_mask, block_causal_mask, sdpa

SHAPES = {"480p": (21, 30 * 52), "720p": (21, 45 * 80), "tiny": (5, 16)}
"""name -> (latent frames, tokens per latent frame) at Wan2.1's patch (1, 2, 2) and VAE (4x time, 8x space)."""
FRAMES_PER_BLOCK = 3
HEADS, HEAD_DIM = 12, 128  # Wan2.1-T2V-1.3B


def mask_bytes(mask) -> int:
    """Bytes held by a dense mask tensor or by a BlockMask's index tables."""
    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()
    tables = (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices)
    tables += (mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)
    return sum(t.numel() * t.element_size() for t in tables if t is not None)


def measure_masks(name: str, max_dense_gib: float, device: torch.device) -> dict:
    frames, tokens = SHAPES[name]
    seq = frames * tokens
    t0 = time.perf_counter()
    block = block_causal_block_mask(frames, tokens, FRAMES_PER_BLOCK, None, 0, device)
    block_s = time.perf_counter() - t0
    out = {"seq_len": seq, "block_mask_bytes": mask_bytes(block), "block_mask_build_s": round(block_s, 4)}
    if seq * seq <= max_dense_gib * 2**30:
        t0 = time.perf_counter()
        dense = block_causal_mask(frames, tokens, FRAMES_PER_BLOCK, None, 0, device)
        out["dense_build_s"] = round(time.perf_counter() - t0, 4)
        out["dense_mask_bytes"] = mask_bytes(dense)
        del dense
    else:
        out["dense_mask_bytes"], out["dense_computed"] = seq * seq, True
    out["dense_over_block"] = round(out["dense_mask_bytes"] / out["block_mask_bytes"], 1)
    return out


def time_attention(name: str, device: torch.device, repeats: int) -> dict:
    """One self-attention over the shape's sequence with each mask (fwd+bwd on CUDA, fwd on CPU)."""
    frames, tokens = SHAPES[name]
    seq, cuda = frames * tokens, device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, seq, HEADS, HEAD_DIM, generator=g, device=device, dtype=dtype) for _ in range(3))
    clock, out, results = Clock(device), {}, {}
    for kind in ("sdpa_dense", "flex_block"):
        build = block_causal_mask if kind == "sdpa_dense" else block_causal_block_mask
        mask = build(frames, tokens, FRAMES_PER_BLOCK, None, 0, device)
        qq, kk, vv = (x.clone().requires_grad_(cuda) for x in (q, k, v))
        times = []
        for i in range(repeats + 1):  # the first call compiles (flex) or warms up: not timed
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = clock()
            o = sdpa(qq, kk, vv, mask)
            if cuda:
                o.float().square().mean().backward()
            t1 = clock()
            if i:
                times.append(t1 - t0)
        results[kind] = o.detach().float()
        out[f"{kind}_s"] = round(sum(times) / len(times), 5)
        if cuda:
            out[f"{kind}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        del mask, o, qq, kk, vv
    out["max_abs_diff"] = float((results["sdpa_dense"] - results["flex_block"]).abs().max())
    out["flex_speedup"] = round(out["sdpa_dense_s"] / out["flex_block_s"], 3)
    out["pass"] = "forward+backward" if cuda else "forward (eager flex: no backward on CPU)"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention_mask", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["all", *SHAPES], default="all", help="all: 480p and 720p")
    p.add_argument("--attention", action="store_true", help="also time one self-attention layer with each mask")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-dense-gib", type=float, default=8.0, help="build the dense mask only up to this size")
    p.add_argument("--results", default=None, help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = ["480p", "720p"] if args.shape == "all" else [args.shape]
    result: dict = {
        "benchmark": "attention_mask",
        "size": "tiny" if args.shape == "tiny" else "1.3b",  # the attention layer's heads: Wan2.1-1.3B's
        "device": device.type,
        "frames_per_block": FRAMES_PER_BLOCK,
    }
    for name in names:
        result[name] = measure_masks(name, args.max_dense_gib, device)
        if args.attention:
            if device.type == "cpu" and name != "tiny":
                raise SystemExit("attention_mask: --attention at 480p/720p needs CUDA; use --shape tiny on a CPU")
            result[name]["attention"] = time_attention(name, device, args.repeats)
    for name in names:
        result[f"dense_over_block_{name}"] = result[name]["dense_over_block"]
    print(json.dumps(result))
    command = "python -m benchmarks.attention_mask " + " ".join(sys.argv[1:] if argv is None else argv)
    append_result(command.strip(), result, [f"dense_over_block_{n}" for n in names], args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
