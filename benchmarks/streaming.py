"""Streaming: the causal student chunk by chunk with its KV cache vs the bidirectional teacher, same video, same run.

    python -m benchmarks.streaming --size tiny  [--chunks 16] [--steps 4] [--warmup 1] [--profile]
    python -m benchmarks.streaming --size 1.3b  [--chunks 14] [--compile [ffn|blocks]] [--local-window 21]  # CUDA
    python -m benchmarks.streaming --size 1.3b --tiny-shape                                     # CPU smoke run
    python -m benchmarks.streaming --size 5b   [--chunks 11]                    # Wan2.2-TI2V-5B, 1280x704, CUDA

Both sides make the same video: `--chunks` chunks of `frames_per_block` latent frames from the same noise, decoded
to pixels (VAE decode included in every figure; text encoding excluded from both).
- student: `students.causal.stream_causal` (the KV-cache rollout with the rolling `local_window` + `sink`, cache
  written once per chunk) with each chunk decoded as it arrives by `students.streaming.StreamingDecoder`;
- teacher: `WanTeacher.sample` of the whole video with the bidirectional transformer (`--teacher-steps`, default
  `--steps`; `--teacher-guidance`, default 1 = no CFG: the same number of transformer passes per step as the student's
  denoising calls), then `WanTeacher.decode`.

Figures: frames per second (decoded frames / wall time), first-chunk latency (start to the first decoded frames), the
latency of every chunk and the mean of its first and last quarter (flat once the window is full: the cache stops
growing), and the per-chunk split: denoise (the student's `steps` forwards), cache_write (the one forward that writes
the KV cache), decode, other (re-noising, Python). `--profile` adds one more, untimed rollout with forward hooks
(CUDA events on a GPU) on every block's self-attention, cross-attention and FFN and on the VAE decoder: their share
of that rollout's wall time.

Sizes: `tiny` = the toy-world architecture (teachers/toyworld/pipeline if shipped, else an untrained build), the
student = the teacher's weights wrapped causally with recipes/toyworld_self_forcing.yaml's frames_per_block /
local_window / sink. `1.3b` = the Wan2.1-T2V-1.3B transformer and Wan2.1 VAE built from config with RANDOM weights
(bf16 transformer, float32 VAE, 480x832, random [1, 512, 4096] text embeddings; no download) and the student settings
of recipes/wan21_1.3b_self_forcing.yaml. `5b` = Wan2.2-TI2V-5B's transformer and the Wan2.2 VAE the same way at
1280x704, with recipes/wan22_ti2v_5b_self_forcing.yaml's student (an independent first frame: 11 chunks = its 31
latent frames, 121 pixel frames, text-to-video). On a GPU every reading is taken after `torch.cuda.synchronize()`.
Prints one JSON line and appends a row to benchmarks/RESULTS.md. CPU figures are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    Clock,
    random_text,
    ratio,
    require_cuda,
    sig,
    toy_teacher_dir,
    wan21_pipeline,
)
from benchmarks.results import RESULTS, append_result
from students.causal import ChunkModelWrapper

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("benchmarks.streaming")

TOY_RECIPE = ROOT / "recipes" / "toyworld_self_forcing.yaml"
WAN_RECIPE = {
    "1.3b": ROOT / "recipes" / "wan21_1.3b_self_forcing.yaml",
    "5b": ROOT / "recipes" / "wan22_ti2v_5b_self_forcing.yaml",
}
PROMPT, NEGATIVE = "a red circle moving left on a white background", "blurry, noise"
DEFAULT_CHUNKS = {"tiny": 16, "1.3b": 14, "5b": 11}
"""Long enough that most chunks run with a full cache (toy window: 3 chunks; Wan recipe: 7); the 5B: its video."""
COMPILE_RECOMPILE_LIMIT = 256
RATIO_KEYS = [
    "ratio_fps_student_vs_teacher",
    "ratio_chunk_latency_last_vs_first_quarter",
    "ratio_first_chunk_latency_vs_teacher_seconds",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "1.3b", "5b"], default="tiny")
    p.add_argument(
        "--tiny-shape",
        action="store_true",
        help="--size 1.3b only: a few layers, 64x64 px and a small VAE (a CPU smoke run of the code path)",
    )
    p.add_argument("--chunks", type=int, default=None, help="chunks in the video (default: tiny 16, 1.3b 14)")
    p.add_argument("--steps", type=int, default=4, help="student denoising steps per chunk")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher sampler steps (default: --steps)")
    p.add_argument("--teacher-guidance", type=float, default=1.0, help="teacher CFG w (1: none, one pass per step)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rollouts of each side before timing")
    p.add_argument("--local-window", type=int, default=None, help="student.local_window in latent frames")
    p.add_argument(
        "--compile",
        nargs="?",
        const="ffn",
        choices=["ffn", "blocks"],
        default=None,
        help="torch.compile, both sides: `ffn` (default) each block's feed-forward, one graph for all "
        "layers; `blocks` whole blocks (diffusers' compile_repeated_blocks): recompiles per layer "
        "and per call kind, since the causal processors index their layer's cache by a Python int",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more rollout with hooks: share of self-attn / cross-attn / FFN / VAE decode",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="Markdown table the row is appended to")
    args = p.parse_args(argv)
    if args.tiny_shape and args.size == "tiny":
        p.error("--tiny-shape: only with --size 1.3b or 5b (--size tiny is already CPU-sized)")
    if args.chunks is None:
        args.chunks = DEFAULT_CHUNKS[args.size]
    args.teacher_steps = args.steps if args.teacher_steps is None else args.teacher_steps
    for key in ("chunks", "steps", "teacher_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup: must be >= 0, got {args.warmup}")
    if args.compile is not None and args.profile:
        p.error("--profile: run it without --compile (the timing hooks would break the compiled graphs)")
    return args


# ---- the models --------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    teacher: object
    """`teachers.wan.WanTeacher` (the bidirectional teacher, its VAE)."""
    causal: object
    """`students.causal.CausalWan` over the teacher's own transformer (the same weights)."""
    cond: object
    """`teachers.wan.Cond` of the prompt (and a negative, for --teacher-guidance != 1)."""
    sigmas: list[float]
    latent_shape: tuple[int, int, int, int]
    """(C, F, H, W) of the whole video."""
    info: dict


def student_overrides(args) -> list[str]:
    steps = [round(1000 - i * 1000 / args.steps) for i in range(args.steps)]  # 4 -> [1000, 750, 500, 250]
    out = ["student.init=null", f"student.denoising_steps={json.dumps(steps)}"]
    if args.local_window is not None:
        out.append(f"student.local_window={args.local_window}")
    return out


def build(args, tmp: Path, device: torch.device) -> Setup:
    from distill.config import load_recipe
    from students.causal import CausalWan
    from students.sampling import student_sigmas
    from teachers.wan import Cond, WanTeacher

    if args.size == "tiny":
        folder, trained = toy_teacher_dir(tmp)
        recipe = load_recipe(
            TOY_RECIPE, [f"output_dir={tmp / 'out'}", f"teacher.pretrained={folder}", *student_overrides(args)]
        )
        teacher = WanTeacher.from_config(recipe.teacher, device)
        cond = teacher.encode([PROMPT], NEGATIVE)
        info = {"teacher": str(folder), "trained": trained, "dtype": recipe.teacher.dtype}
    else:
        side = 128 if args.size == "5b" else 64  # the 5B's VAE compresses 16x: 8x8 latents either way
        hw = [f"teacher.height={side}", f"teacher.width={side}"] if args.tiny_shape else []
        recipe = load_recipe(WAN_RECIPE[args.size], [f"output_dir={tmp / 'out'}", *hw, *student_overrides(args)])
        pipe = wan21_pipeline(device, torch.bfloat16, tiny_shape=args.tiny_shape, model=args.size)
        teacher = WanTeacher(pipe, recipe.teacher, device)
        text_dim = pipe.transformer.config.text_dim
        cond = Cond(
            prompt_embeds=random_text(1, text_dim, device, seed=0),
            negative_embeds=random_text(1, text_dim, device, seed=1),
        )
        shape = " (tiny shape)" if args.tiny_shape else ""
        name = "Wan2.2-TI2V-5B" if args.size == "5b" else "Wan2.1-T2V-1.3B"
        info = {"teacher": f"random weights, {name} config{shape}", "trained": False, "dtype": "bfloat16"}
    causal = CausalWan(teacher.pipe.transformer, recipe.student)  # processors only: the teacher still runs as before
    if args.compile is not None:
        compile_transformer(teacher.pipe.transformer, args.compile)
    t = recipe.teacher
    frames = causal.first_block_frames + (args.chunks - 1) * causal.frames_per_block
    pixel_frames = 1 + teacher.pipe.vae_scale_factor_temporal * (frames - 1)
    latent_shape = teacher.latent_shape(pixel_frames, t.height, t.width)
    sigmas = student_sigmas(recipe.student, t.shift, t.num_inference_steps)
    info.update(
        height=t.height,
        width=t.width,
        frames_per_block=causal.frames_per_block,
        local_window=recipe.student.local_window,
        sink=recipe.student.sink,
        sigmas=[sig(s) for s in sigmas],
        params=sum(p.numel() for p in teacher.pipe.transformer.parameters()),
    )
    return Setup(teacher=teacher, causal=causal, cond=cond, sigmas=sigmas, latent_shape=latent_shape, info=info)


def compile_transformer(transformer, what: str) -> None:
    """torch.compile in place: every block's `ffn` (layer-agnostic: one graph serves all 30 layers), or whole blocks.

    Whole blocks recompile once per layer and per call kind (teacher; first chunk; cache growing; cache write):
    `CausalSelfAttnProcessor` / `CausalCrossAttnProcessor` read `ctx.past_k[self.layer]`, and dynamo specialises on
    that int (2 layers: 16 graphs at tiny shape; 30 layers: over 100, minutes of compiling each). The limit is raised
    so they compile rather than fall back to eager after the default 8.
    """
    import torch._dynamo as dynamo

    if what == "blocks":
        dynamo.config.recompile_limit = COMPILE_RECOMPILE_LIMIT
        transformer.compile_repeated_blocks()
    else:
        for block in transformer.blocks:
            block.ffn.compile()


# ---- timing ------------------------------------------------------------------------------------------------------
class TimedCausal(ChunkModelWrapper):
    """The chunk interface `stream_causal` calls (as `distill.self_forcing.PreparedCausal`), timing every forward:
    the denoising calls (update_cache=False) and the cache write (update_cache=True) apart."""

    def __init__(self, causal, clock: Clock):
        self.causal, self.clock = causal, clock
        self.denoise = self.cache_write = 0.0

    def forward_chunk(self, x, t, cache, frame_offset: int, update_cache: bool) -> torch.Tensor:
        start = self.clock()
        v = self.causal.forward_chunk(x, t, cache, frame_offset, update_cache)
        elapsed = self.clock() - start
        if update_cache:
            self.cache_write += elapsed
        else:
            self.denoise += elapsed
        return v

    def take(self) -> tuple[float, float]:
        """(denoise, cache_write) seconds since the last call."""
        out = (self.denoise, self.cache_write)
        self.denoise = self.cache_write = 0.0
        return out


@torch.no_grad()
def student_rollout(setup: Setup, noise: torch.Tensor, clock: Clock) -> dict:
    """Stream `noise`'s chunks and decode each as it arrives: wall time, frames and the per-chunk split."""
    from students.causal import stream_causal
    from students.streaming import StreamingDecoder

    timed = TimedCausal(setup.causal, clock)
    generator = torch.Generator(noise.device).manual_seed(1)  # the re-noising stream
    decoder = StreamingDecoder(setup.teacher)
    chunks, frames = [], 0
    start = previous = clock()
    try:
        for latents in stream_causal(timed, setup.cond.prompt_embeds, noise, setup.sigmas, generator=generator):
            begin = clock()
            video = decoder(latents)
            now = clock()
            denoise, cache_write = timed.take()
            chunks.append(
                {"latency": now - previous, "denoise": denoise, "cache_write": cache_write, "decode": now - begin}
            )
            frames += video.shape[2]
            previous = now
    finally:
        decoder.close()
    return {"seconds": previous - start, "frames": frames, "chunks": chunks}


@torch.no_grad()
def teacher_run(setup: Setup, noise: torch.Tensor, steps: int, guidance: float, clock: Clock) -> dict:
    """The bidirectional teacher samples and decodes the whole video."""
    start = clock()
    latents = setup.teacher.sample(setup.cond, noise, steps=steps, guidance=guidance).latents
    sampled = clock()
    video = setup.teacher.decode(latents)
    done = clock()
    return {"sample": sampled - start, "decode": done - sampled, "seconds": done - start, "frames": video.shape[2]}


class ModuleTimes:
    """Seconds spent inside every block's attn1 (self-attention), attn2 (cross-attention) and ffn, and inside the VAE
    decoder, from forward hooks: CUDA events on a GPU (no synchronisation inside the rollout), perf_counter on a CPU."""

    LABELS = {"attn1": "self_attn", "attn2": "cross_attn", "ffn": "ffn"}

    def __init__(self, transformer, vae, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = defaultdict(list)
        self.handles = []
        for block in transformer.blocks:
            for name, label in self.LABELS.items():
                self._hook(getattr(block, name), label)
        self._hook(vae.decoder, "vae_decode")

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _hook(self, module, label: str) -> None:
        stack = []
        self.handles.append(module.register_forward_pre_hook(lambda m, a: stack.append(self._mark())))
        self.handles.append(
            module.register_forward_hook(lambda m, a, o: self.spans[label].append((stack.pop(), self._mark())))
        )

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1000 for k, v in self.spans.items()}
        return {k: sum(b - a for a, b in v) for k, v in self.spans.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def profile_shares(setup: Setup, noise: torch.Tensor, clock: Clock, device: torch.device) -> dict[str, float]:
    times = ModuleTimes(setup.teacher.pipe.transformer, setup.teacher.pipe.vae, device)
    try:
        seconds = student_rollout(setup, noise, clock)["seconds"]
        totals = times.totals()
    finally:
        times.remove()
    shares = {k: totals.get(k, 0.0) / seconds for k in [*ModuleTimes.LABELS.values(), "vae_decode"]}
    shares["other"] = 1.0 - sum(shares.values())
    return {k: sig(v, 4) for k, v in shares.items()}


# ---- main --------------------------------------------------------------------------------------------------------
def quarter_means(latencies: list[float]) -> tuple[float, float]:
    q = max(1, len(latencies) // 4)
    return sum(latencies[:q]) / q, sum(latencies[-q:]) / q


def report(args, setup: Setup, student: dict, teacher: dict, device: torch.device) -> dict:
    chunks = student["chunks"]
    latencies = [c["latency"] for c in chunks]
    first_q, last_q = quarter_means(latencies)
    split = {k: sum(c[k] for c in chunks) / len(chunks) for k in ("denoise", "cache_write", "decode")}
    split["other"] = sum(latencies) / len(chunks) - sum(split.values())
    student_fps, teacher_fps = student["frames"] / student["seconds"], teacher["frames"] / teacher["seconds"]
    first = latencies[0]
    return {
        "benchmark": "streaming",
        "size": args.size,
        "tiny_shape": args.tiny_shape,
        "device": device.type,
        **setup.info,
        "chunks": args.chunks,
        "latent_shape": list(setup.latent_shape),
        "pixel_frames": student["frames"],
        "steps": args.steps,
        "teacher_steps": args.teacher_steps,
        "teacher_guidance": args.teacher_guidance,
        "compile": args.compile,
        "warmup": args.warmup,
        "student_fps": sig(student_fps),
        "teacher_fps": sig(teacher_fps),
        "student_seconds": sig(student["seconds"]),
        "teacher_seconds": sig(teacher["seconds"]),
        "teacher_sample_s": sig(teacher["sample"]),
        "teacher_decode_s": sig(teacher["decode"]),
        "first_chunk_latency_s": sig(first),
        "chunk_latency_s": [sig(x, 4) for x in latencies],
        "chunk_latency_first_quarter_s": sig(first_q),
        "chunk_latency_last_quarter_s": sig(last_q),
        "split_mean_s": {k: sig(v, 4) for k, v in split.items()},
        "split_share": {k: sig(v / (sum(latencies) / len(chunks)), 4) for k, v in split.items()},
        "ratio_fps_student_vs_teacher": ratio(student_fps, teacher_fps),
        "ratio_chunk_latency_last_vs_first_quarter": ratio(last_q, first_q),
        "ratio_first_chunk_latency_vs_teacher_seconds": ratio(first, teacher["seconds"]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = (
        require_cuda("python -m benchmarks.streaming", args.tiny_shape, args.size)
        if args.size != "tiny"
        else torch.device("cpu")
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_streaming_") as tmp:
        setup = build(args, Path(tmp), device)
        clock = Clock(device)
        noise = torch.randn(1, *setup.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
        fpb = setup.causal.frames_per_block
        window_chunks = -(-(setup.info["local_window"] or noise.shape[2]) // fpb)
        warm_chunks = min(args.chunks, window_chunks + 1)  # every cache size the timed run meets
        warm = noise[:, :, : setup.causal.first_block_frames + (warm_chunks - 1) * fpb]
        for i in range(args.warmup):
            logger.info("warm-up %d/%d", i + 1, args.warmup)
            student_rollout(setup, warm, clock)
            setup.teacher.sample(setup.cond, noise, steps=1, guidance=args.teacher_guidance)
        logger.info("student: %d chunks of %d latent frames", args.chunks, fpb)
        student = student_rollout(setup, noise, clock)
        logger.info("teacher: %d steps over %d latent frames", args.teacher_steps, noise.shape[2])
        teacher = teacher_run(setup, noise, args.teacher_steps, args.teacher_guidance, clock)
        if student["frames"] != teacher["frames"]:
            raise AssertionError(f"decoded frames differ: student {student['frames']}, teacher {teacher['frames']}")
        result = report(args, setup, student, teacher, device)
        result["window_chunks"] = window_chunks
        if args.profile:
            logger.info("profile: one more rollout with module hooks")
            result["profile_share"] = profile_shares(setup, noise, clock, device)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result), flush=True)
    command = "python -m benchmarks.streaming " + " ".join(sys.argv[1:] if argv is None else argv)
    append_result(command.strip(), result, RATIO_KEYS, path=args.results)
    return result


if __name__ == "__main__":
    main()
