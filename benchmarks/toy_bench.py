"""The toy world's benchmark of record for student quality (`make bench-toy`): every toy student trained from the
shipped teacher with a budget that lets it converge, graded on 256 fresh prompts.

    python -m benchmarks.toy_bench [--out outputs/toyworld_bench] [--dry-run] [KEY=VALUE ...]

Runs, each as a user would (`python -m distill run RECIPE ...`, so an interrupted bench resumes where it stopped):
the teacher's dataset (512 prompts), `lora4_dmd` (recipes/toyworld_lora4_dmd.yaml: a 4-step LoRA by DMD2, data-free),
`pruned`, `causal_init` and `self_forcing`
(recipes/toyworld_self_forcing_long.yaml, from this bench's own causal_init), then `python -m distill eval` on 256
prompts, writing `<out>/eval/report.json` (+ report.md and plots). `make demo` stays the quick tour; the figures
differ because the budgets do. KEY=VALUE overrides apply to every stage, after the bench's own (e.g.
`train.max_steps=2 eval.num_prompts=8` for a quick check of the plumbing).

Prints one JSON line: per student the all-attribute accuracy, its ratio to the teacher's measured in the same run,
the per-chunk figures and the drift of the 10x rollout (last segment - first), the sampling speedup, the seconds
each stage took; and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = ["data.num_prompts=512", "eval.num_prompts=256"]
"""Every stage: 512 teacher clips (pruned's KD data, causal_init's ODE pairs: Self-Forcing from
an init on 512 trajectories scored clearly above one on 48, docs/results/self_forcing_ablations.md) and a 256-prompt
eval (a 95% interval of about +-4 points near 0.9)."""


PRUNED = [
    "train.max_steps=1200",
    "train.checkpointing_steps=400",
    "train.learning_rate=2e-3",
    "train.lr_scheduler=cosine",
    "train.ema=true",
    "train.ema_decay=0.99",
    "method.kd.feature_weight=1.0",
]
"""The half-depth student is still improving at 600 steps: 1200 with these settings scored 0.344 against 0.227 at 600
(docs/results/lora_pruned_ablations.md)."""


def stages(out: str) -> list[tuple[str, str, list[str]]]:
    """(name, recipe, overrides) in order; `name` is the student's folder (None: the dataset)."""
    return [
        ("dataset", "recipes/toyworld.yaml", []),
        ("lora4_dmd", "recipes/toyworld_lora4_dmd.yaml", ["train.max_steps=600", "train.checkpointing_steps=300"]),
        ("pruned", "recipes/toyworld_pruned.yaml", PRUNED),
        ("causal_init", "recipes/toyworld_causal_init.yaml", ["train.max_steps=600", "train.checkpointing_steps=300"]),
        (
            "self_forcing",
            "recipes/toyworld_self_forcing_long.yaml",
            ["student.name=self_forcing", f"student.init={out}/students/causal_init/final/expert_0"],
        ),
    ]


def run_stage(name: str, recipe: str, overrides: list[str], dry_run: bool) -> float:
    cmd = [sys.executable, "-m", "distill", "run", recipe, *overrides]
    student_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))) / "students" / name
    if name != "dataset" and list(student_dir.glob("checkpoint-*")) and not (student_dir / "final/COMPLETE").exists():
        cmd.append("train.resume_from_checkpoint=latest")  # an interrupted bench picks up where it stopped
    print("toy_bench:", " ".join(cmd), flush=True)
    if dry_run:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL if dry_run else None)
    return round(time.perf_counter() - t0, 1)


def summarise(report: dict, seconds: dict[str, float]) -> dict:
    teacher = report["teacher"]["accuracy"]["all"]
    result = {
        "benchmark": "toy_bench",
        "num_prompts": report["num_prompts"],
        "eval_seed": report["seed"],
        "teacher": {"all": teacher, "chunk_accuracy": report["teacher"].get("chunk_accuracy")},
        "students": {},
        "stage_seconds": seconds,
    }
    ratios = {}
    for name, s in report["students"].items():
        entry = {
            "all": s["accuracy"]["all"],
            "nfe": s["nfe"],
            "chunk_accuracy": s.get("chunk_accuracy"),
            "sampling_speedup": round(s["sampling_speedup"], 2),
        }
        if s.get("long_rollout"):
            curve = s["long_rollout"]["segment_accuracy"]
            entry["drift_first_last"] = [curve[0], curve[-1]]
        result["students"][name] = entry
        ratios[f"ratio_all_{name}_vs_teacher"] = round(s["accuracy"]["all"] / teacher, 4) if teacher else None
    return {**result, **ratios}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.toy_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/toyworld_bench")
    parser.add_argument("--dry-run", action="store_true", help="check every stage's recipe, train nothing")
    parser.add_argument("--results", default=None, help="the RESULTS.md to append to (default benchmarks/RESULTS.md)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are KEY=VALUE)")
    os.chdir(ROOT)
    common = [f"output_dir={args.out}", *COMMON]
    seconds = {}
    for name, recipe, overrides in stages(args.out):  # the command line's overrides last: they win
        seconds[name] = run_stage(name, recipe, [*common, *overrides, *extra], args.dry_run)
    common += extra
    eval_cmd = [
        sys.executable,
        "-m",
        "distill",
        "eval",
        "recipes/toyworld.yaml",
        *common,
        "eval.students=[lora4_dmd,pruned,causal_init,self_forcing]",
    ]
    print("toy_bench:", " ".join(eval_cmd), flush=True)
    if args.dry_run:
        subprocess.run([*eval_cmd, "--dry-run"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return
    t0 = time.perf_counter()
    subprocess.run(eval_cmd, check=True, cwd=ROOT)
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    report = json.loads((Path(args.out) / "eval" / "report.json").read_text())
    result = summarise(report, seconds)
    print(json.dumps(result))
    from benchmarks.results import append_result

    append_result("make bench-toy", result, [k for k in result if k.startswith("ratio_")], args.results)


if __name__ == "__main__":
    main()
