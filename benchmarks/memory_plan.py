"""The `--dry-run` memory plan against the memory a real training run takes, on CPU.

    python -m benchmarks.memory_plan [--out DIR]

A small random Wan pipeline (the tiny test pipeline with a 2-block transformer of width 64, so that activations are
most of the memory) trains `kd` (LoRA student, EMA), `trajectory` (LoRA student), `dmd` (full student, LoRA critic)
and `self_forcing` (causal student, full critic) past their first generator step after the optimizers' states exist
(2, 2, 6 and 6 steps), with and without gradient checkpointing, at three video sizes. The measured peak is
the most bytes of CPU tensor storage alive at once during the run (`LiveBytes`), against the plan's total. Prints one
JSON line per run with the ratio measured / planned, and a last line with the largest deviation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "kd_lora": ["method.name=kd", "train.ema=true", "train.max_steps=2"],
    "trajectory_lora": [  # the Wan LoRA recipes' method: stored ODE states, no teacher in the loss
        "method.name=trajectory",
        "train.max_steps=2",
        "data.trajectory_steps=[0,2]",
        "student.denoising_steps=[1000,500]",
        "method.trajectory.max_sigma_gap=1.0",
    ],
    "dmd_full": [
        "method.name=dmd",
        "train.max_steps=6",
        "student.kind=full",
        "student.denoising_steps=[1000,500]",
        "train.data_source=prompts",
    ],
    "self_forcing": [
        "method.name=self_forcing",
        "train.max_steps=6",
        "student.kind=causal",
        "student.frames_per_block=1",
        "student.denoising_steps=[1000,500]",
        "method.self_forcing.critic=full",
        "train.data_source=prompts",
    ],
}
SHAPES = {  # pixels (frames x height x width) -> latent frames x tokens per frame of the small pipeline
    "5x64x64": ["teacher.num_frames=5", "teacher.height=64", "teacher.width=64"],
    "9x96x96": ["teacher.num_frames=9", "teacher.height=96", "teacher.width=96"],
    "9x128x128": ["teacher.num_frames=9", "teacher.height=128", "teacher.width=128"],
}
COMMON = ["train.gradient_accumulation_steps=1", "train.checkpointing_steps=100", "train.ema=false"]


def small_pipeline(path: Path) -> Path:
    """The tiny test pipeline with a 2-block transformer of width 64 (2 heads x 32, ffn 256), saved at `path`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_WORDS

    from teachers.tiny import tiny_pipeline, tiny_transformer

    if not (path / "model_index.json").exists():
        pipe = tiny_pipeline(TINY_WORDS)
        pipe.transformer = tiny_transformer(in_channels=4, num_heads=2, head_dim=32, ffn_dim=256, num_layers=2)
        pipe.save_pretrained(path)
    return path


def measure(case: str, shape: str, checkpointing: bool, work: Path) -> dict:
    """Plan and train one run; {"plan": bytes, "activations": planned activation bytes, "measured": peak bytes}."""
    sys.path.insert(0, str(ROOT / "tests"))
    from accelerate.state import AcceleratorState, GradientState
    from test_trainer import write_recipe

    from distill.cli import main as cli
    from distill.config import load_recipe
    from distill.memory_plan import LiveBytes, plan_memory
    from distill.trainer import train

    out = work / f"{case}_{shape}_{int(checkpointing)}"
    shutil.rmtree(out, ignore_errors=True)
    recipe_path = write_recipe(work / "recipe.yaml", out, small_pipeline(work / "pipeline"))
    overrides = COMMON + CASES[case] + SHAPES[shape] + [f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    if "train.data_source=prompts" not in CASES[case]:  # it trains on the teacher's clips
        assert (
            cli(["compose", str(recipe_path), *overrides]) == 0 and cli(["generate", str(recipe_path), *overrides]) == 0
        )
    recipe = load_recipe(recipe_path, overrides)
    plan = plan_memory(recipe)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with LiveBytes("cpu") as live:
        train(recipe)
    activations = next(line.bytes for line in plan.lines if line.role == "activations")
    return {"plan": plan.total, "activations": activations, "measured": live.peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/memory_plan")
    args = parser.parse_args(argv)
    work = ROOT / args.out
    work.mkdir(parents=True, exist_ok=True)
    worst = 0.0
    for case in CASES:
        for shape in SHAPES:
            for ckpt in (False, True):
                r = measure(case, shape, ckpt, work)
                ratio = r["measured"] / r["plan"]
                worst = max(worst, abs(ratio - 1))
                row = {
                    "case": case,
                    "shape": shape,
                    "checkpointing": ckpt,
                    "planned_mib": r["plan"] / 2**20,
                    "planned_activations_mib": r["activations"] / 2**20,
                    "measured_mib": r["measured"] / 2**20,
                    "ratio": round(ratio, 3),
                }
                print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "memory_plan", "largest_deviation": round(worst, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
