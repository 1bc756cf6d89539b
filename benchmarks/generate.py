"""Synthetic-data throughput: the `generate` stage vs a plain diffusers `WanPipeline` loop, same run.

    python -m benchmarks.generate [--teacher DIR] [--prompts 16] [--batch-size 8]

Both render the same prompts with the same noise, steps, CFG and shift; the baseline calls
`WanPipeline.__call__` once per prompt (how people usually script it) and encodes each video to mp4 too, so
both sides produce the same artefacts. Prints one JSON line and appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import WanPipeline

from benchmarks.results import append_result
from core.seeding import sample_noise
from distill.accel import make_accelerator
from distill.config import load_recipe
from synth_data.compose_stage import compose_stage
from synth_data.composer import read_prompts
from synth_data.dataset import encode_video
from synth_data.generate import generate
from teachers.wan import WanTeacher

ROOT = Path(__file__).resolve().parent.parent


def default_teacher(tmp: Path) -> str:
    shipped = ROOT / "teachers/toyworld/pipeline"
    if (shipped / "model_index.json").exists():
        return str(shipped)
    from teachers.toyworld.build import main as build

    build([str(tmp / "init")])
    return str(tmp / "init")


def baseline(recipe, rows) -> float:
    """Seconds for a plain per-prompt WanPipeline loop (model load excluded) + mp4 encoding."""
    pipe = WanPipeline.from_pretrained(recipe.teacher.pretrained)
    pipe.set_progress_bar_config(disable=True)
    teacher = WanTeacher(pipe, recipe.teacher)  # only for the latent shape and the shifted scheduler
    pipe.scheduler = teacher.make_scheduler()
    shape = teacher.latent_shape(recipe.teacher.num_frames, recipe.teacher.height, recipe.teacher.width)
    t = recipe.teacher
    start = time.perf_counter()
    for row in rows:
        video = pipe(
            row["prompt"],
            negative_prompt=t.negative_prompt or "blurry, noise",
            height=t.height,
            width=t.width,
            num_frames=t.num_frames,
            num_inference_steps=t.num_inference_steps,
            guidance_scale=t.guidance_scale,
            latents=sample_noise(row["seed"], shape)[None],
            output_type="np",
            max_sequence_length=t.max_sequence_length,
        ).frames[0]
        encode_video((video * 255).round().clip(0, 255).astype("uint8"), fps=8)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="WanPipeline folder (default: the shipped toy teacher)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        teacher_dir = args.teacher or default_teacher(tmp)
        recipe = load_recipe(
            ROOT / "recipes/toyworld.yaml",
            [
                f"output_dir={tmp / 'out'}",
                f"teacher.pretrained={teacher_dir}",
                f"data.num_prompts={args.prompts}",
                f"data.batch_size={args.batch_size}",
                f"teacher.num_inference_steps={args.steps}",
                "data.trajectory_steps=[]",
            ],
        )
        compose_stage(recipe.data, recipe.out)
        rows = read_prompts(recipe.out / "prompts.jsonl")
        start = time.perf_counter()
        generate(recipe.data, recipe.teacher, recipe.out, make_accelerator())
        ours = time.perf_counter() - start
        base = baseline(recipe, rows)
        result = {
            "benchmark": "generate",
            "teacher": teacher_dir,
            "prompts": args.prompts,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "generate_videos_per_hour": round(3600 * args.prompts / ours, 1),
            "pipeline_loop_videos_per_hour": round(3600 * args.prompts / base, 1),
            "ratio": round(base / ours, 3),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(result))
        append_result(" ".join(["python", *sys.argv]), result, ratio_keys=["ratio"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
