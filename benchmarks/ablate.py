"""Ablations of a student recipe over training seeds, graded by the toy world's oracle: mean and spread per arm.

    python -m benchmarks.ablate run RECIPE --arm NAME [--seeds 0,1,2] [--out DIR] [--prompts 128] [--eval-seed 777]
                                 [KEY=VALUE ...]
    python -m benchmarks.ablate checkpoint RECIPE --arm NAME --step N [--seeds 0,1,2] [--out DIR] [KEY=VALUE ...]
    python -m benchmarks.ablate errors RECIPE --arm NAME [--seeds 0,1,2] [--out DIR] [--refine 0.5,0.75] [KEY=VALUE ...]
    python -m benchmarks.ablate soup RECIPE --arm NAME [--seeds 0,1,2] [--out DIR] [KEY=VALUE ...]
    python -m benchmarks.ablate summary [--out DIR] [--baseline NAME]

`run`: for each seed, trains RECIPE with `student.name=<arm>_s<seed> train.seed=<seed> output_dir=<out>/runs` and the
KEY=VALUE overrides, as a user would (`python -m distill train`, a subprocess; a finished run is not retrained), then
grades its weights (`final_ema` when kept) with `distill.eval.eval_student` on `--prompts` fresh prompts of
`--eval-seed` (never the training prompts' seed): all-attribute accuracy, accuracy per training-length chunk, and the
long-rollout drift curve. Writes `<out>/<arm>/seed<S>.json`. The teacher is graded once on the same prompts and noise,
in the same time segments, into `<out>/teacher_<prompts>_<eval seed>.json`.

`checkpoint`: grades the EMA weights that an arm's runs held at `checkpoint-<N>/` (the same RECIPE and KEY=VALUE as
its `run`), on the same prompts and noise, into `<out>/<arm>@<N>/seed<S>.json`: how far the last N..max_steps
steps moved the student. The EMA is loaded into diffusers' `EMAModel` over the finished student's trainable
weights and copied onto them (`EMAModel.copy_to`).

`errors`: what the oracle read wrong in the finished runs of an arm (the same RECIPE and KEY=VALUE as its `run`) and
in the teacher's videos, on the same prompts and noise: per slot the wrong reads as `truth -> read` counts, and for
the two shape slots (subject, props) the mean gap between the best and the second-best template fit
(`teachers.toyworld.oracle.shape_scores`) over right and over wrong reads: a small gap on the wrong reads means
ambiguous shapes, a large one shapes drawn clearly but wrong. Writes `<out>/<arm>/errors_seed<S>.json` and
`<out>/teacher_errors_<prompts>_<eval seed>.json`. `--refine 0.5,0.75`: the same reads of the student's samples
re-noised to each σ_r and finished by the teacher's sampler (`refined_reads`): at which noise level the student's
misses are decided.

`soup`: the mean of the finished runs' weights (a model soup over training seeds, Wortsman et al. 2022: every
weight file of the graded folder averaged tensor by tensor), graded like a seed into `<out>/<arm>/soup.json` (not a
seed: `summary` leaves it out): whether averaging an arm's runs beats running one. Full-weight students only (the
mean of LoRA factors is not the mean of their products).

`summary`: one JSON line per arm, then a markdown table: mean and sample standard deviation over the seeds of
all-attribute accuracy, of each chunk, and of the first and last long-rollout segments; with `--baseline`, each arm's
difference of means against that arm ("ratio" against the baseline measured with the same prompts and noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _recipe(recipe_path: str, overrides: list[str], out: Path, name: str, seed: int, prompts: int, eval_seed: int):
    from distill.config import load_recipe

    return load_recipe(
        recipe_path,
        [
            *overrides,
            f"output_dir={out / 'runs'}",
            f"student.name={name}",
            f"train.seed={seed}",
            f"eval.num_prompts={prompts}",
            f"eval.seed={eval_seed}",
            "eval.num_previews=0",
            "eval.student_timing_seconds=0",
        ],
    )


def _grading(recipe, teacher):
    from core.recipe_loader import resolve_path
    from core.vocabulary import load_vocabulary
    from distill.eval import choose_grader, eval_prompts, grading_context

    vocab = load_vocabulary(resolve_path(recipe.data.vocabulary))
    grader = choose_grader(recipe, vocab)
    if grader is None:
        raise SystemExit(f"{recipe.source}: ablations need the toy world's oracle (data.vocabulary: toyworld)")
    return grading_context(recipe, teacher, eval_prompts(recipe), vocab, grader)


def _teacher_run(recipe, teacher, ctx: dict, previews: int, chunks: int | None = None):
    """The teacher sampled, decoded and graded on the ablation prompts (`distill.eval.run_model`); the first
    `previews` videos kept."""
    from distill.eval import run_model

    return run_model(
        "teacher",
        lambda cond, noise, _rows: teacher.sample(cond, noise).latents,
        teacher,
        ctx["batches"],
        ctx["shape"],
        ctx["negative"],
        ctx["grader"],
        previews,
        recipe.eval.decode_batch_size,
        num_chunks=chunks,
    )


def grade_teacher(recipe, teacher, ctx: dict, chunks: int, path: Path) -> dict:
    """The teacher's accuracy on the ablation prompts, graded whole and in `chunks` time segments (cached)."""
    from distill.eval import _timing

    if path.is_file():
        return json.loads(path.read_text())
    run = _teacher_run(recipe, teacher, ctx, previews=0, chunks=chunks)
    entry = {k: v for k, v in _timing(run, ctx["grader"]).items() if "accuracy" in k}
    path.write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def _seed_files(args, prefix: str) -> list[tuple[int, str, Path]]:
    """(seed, run name `<arm>_s<seed>`, result file `<out>/<arm>/<prefix><seed>.json`) per seed; makes the folder."""
    folder = Path(args.out) / args.arm
    folder.mkdir(parents=True, exist_ok=True)
    return [(seed, f"{args.arm}_s{seed}", folder / f"{prefix}{seed}.json") for seed in args.seeds]


def run(args) -> None:
    from distill.eval import find_students
    from teachers.wan import WanTeacher

    out, teacher, ctx = Path(args.out), None, None
    for seed, name, result in _seed_files(args, "seed"):
        if result.is_file():
            print(f"ablate: {result} exists, skipping", flush=True)
            continue
        recipe = _recipe(args.recipe, args.overrides, out, name, seed, args.prompts, args.eval_seed)
        t0 = time.perf_counter()
        if not (recipe.student_dir() / "final" / "COMPLETE").is_file():
            cmd = [
                sys.executable,
                "-m",
                "distill",
                "train",
                args.recipe,
                *args.overrides,
                f"output_dir={out / 'runs'}",
                f"student.name={name}",
                f"train.seed={seed}",
            ]
            if (recipe.student_dir()).is_dir():
                cmd.append("train.resume_from_checkpoint=latest")
            print("ablate:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        train_seconds = time.perf_counter() - t0
        if teacher is None:
            teacher = WanTeacher.from_config(recipe.teacher, "cpu")
            ctx = _grading(recipe, teacher)
        folder = dict(find_students(recipe))[name]
        entry = _grade_and_write(
            args, args.arm, seed, name, folder, recipe, teacher, ctx, result, train_seconds=round(train_seconds, 1)
        )
        drift = (entry.get("long_rollout") or {}).get("segment_accuracy")  # None: a bidirectional student
        print(
            f"ablate: {args.arm} seed {seed}: all {entry['accuracy']['all']:.3f}, chunks "
            f"{entry['chunk_accuracy']}, drift {drift}",
            flush=True,
        )


def _grade_and_write(args, arm: str, seed: int, name: str, folder: Path, recipe, teacher, ctx, result: Path, **extra):
    """Grade the student in `folder` and the teacher (cached) on the ablation prompts; write `result` (one seed's
    JSON: the arm, how it was made, `extra`, the student's figures and the teacher's). Returns the student's entry."""
    from distill.eval import eval_student, training_chunks

    entry, _ = eval_student(name, folder, teacher, recipe, ctx)
    chunks = training_chunks(ctx["shape"][1], recipe.student)
    teacher_entry = grade_teacher(
        recipe, teacher, ctx, chunks, Path(args.out) / f"teacher_{args.prompts}_{args.eval_seed}.json"
    )
    keep = {k: entry.get(k) for k in ("accuracy", "chunk_accuracy", "long_rollout", "weights")}
    made = {"arm": arm, "seed": seed, "recipe": args.recipe, "overrides": args.overrides}
    made.update({"prompts": args.prompts, "eval_seed": args.eval_seed, **extra})
    result.write_text(json.dumps({**made, **keep, "teacher": teacher_entry}, indent=2) + "\n")
    return entry


def checkpoint(args) -> None:
    from diffusers.training_utils import EMAModel

    from distill.checkpoints import CHECKPOINT_PREFIX
    from distill.role_state import EMA_WEIGHTS, load_ema
    from students.student import Student
    from teachers.wan import WanTeacher

    out = Path(args.out)
    target = out / f"{args.arm}@{args.step}"
    target.mkdir(parents=True, exist_ok=True)
    teacher = ctx = None
    for seed in args.seeds:
        name, result = f"{args.arm}_s{seed}", target / f"seed{seed}.json"
        if result.is_file():
            print(f"ablate: {result} exists, skipping", flush=True)
            continue
        recipe = _recipe(args.recipe, args.overrides, out, name, seed, args.prompts, args.eval_seed)
        run_dir = recipe.student_dir()
        ema_dir, final = run_dir / f"{CHECKPOINT_PREFIX}{args.step}", run_dir / "final_ema"
        for need in (ema_dir / EMA_WEIGHTS, final / "student.json"):
            if not need.is_file():
                raise SystemExit(
                    f"{need}: missing; `checkpoint` grades the EMA of a finished run's kept checkpoint (train.ema: "
                    f"true, and checkpoint-{args.step} among those kept)"
                )
        if teacher is None:
            teacher = WanTeacher.from_config(recipe.teacher, "cpu")
            ctx = _grading(recipe, teacher)
        base = teacher.transformer_for(float(teacher.num_train_timesteps))
        student = Student.from_pretrained(final, base_transformer=base)
        params = student.trainable_parameters()
        ema = EMAModel(params)
        load_ema(ema, ema_dir)
        ema.copy_to(params)
        folder = target / "runs" / name
        student.save_pretrained(folder)
        entry = _grade_and_write(
            args, target.name, seed, f"{name}@{args.step}", folder, recipe, teacher, ctx, result, step=args.step
        )
        print(f"ablate: {args.arm} seed {seed} at step {args.step}: all {entry['accuracy']['all']:.3f}", flush=True)


def read_errors(videos, rows: list[dict]) -> dict:
    """Per slot: the right reads, the wrong ones as {"truth -> read": count}, and for the shape slots the mean gap
    between the best and the second-best template fit over right and over wrong reads (None: no such read)."""
    import numpy as np

    from teachers.toyworld.oracle import read_video, shape_scores
    from teachers.toyworld.render import SLOTS

    table: dict[str, dict] = {slot: {"right": 0, "wrong": {}} for slot in SLOTS}
    gaps: dict[str, dict[str, list[float]]] = {}
    for video, row in zip(videos, rows, strict=True):
        read, scores = read_video(video)[0], shape_scores(video)
        for slot in SLOTS:
            truth, ok = row["slots"][slot], read[slot] == row["slots"][slot]
            if ok:
                table[slot]["right"] += 1
            else:
                key = f"{truth} -> {read[slot]}"
                table[slot]["wrong"][key] = table[slot]["wrong"].get(key, 0) + 1
            if slot in scores:
                best, second = np.sort(scores[slot])[::-1][:2]
                gaps.setdefault(slot, {"right": [], "wrong": []})["right" if ok else "wrong"].append(best - second)
    for slot, by in gaps.items():
        table[slot]["fit_gap"] = {k: round(float(np.mean(v)), 4) if v else None for k, v in by.items()}
    return table


def refined_reads(teacher, ctx: dict, folder: Path, levels: list[float]) -> dict[str, dict]:
    """SDEdit by the teacher, per σ_r in `levels`: the student's samples (its eval noise) re-noised to σ_k, the
    first level of the teacher's schedule at or below σ_r (noise: sample_noise(derive_seed(seed, 2))), then
    finished by the teacher's sampler from step k (its CFG). If the teacher fixes from σ_r what the student got
    wrong, the student loses it below σ_r; if not, above. Returns {"<σ_r>": {"sigma": σ_k, "step": k, reads}}."""
    import torch

    from core.flow import add_noise
    from core.seeding import derive_seed, sample_noise
    from distill.eval import decode_videos
    from students.sampling import student_sampler
    from students.student import Student

    scheduler = teacher.make_scheduler()
    scheduler.set_timesteps(teacher.cfg.num_inference_steps)
    sigmas = [float(x) for x in scheduler.sigmas]
    starts = {level: next(k for k, sigma in enumerate(sigmas) if sigma <= level) for level in levels}
    if max(starts.values()) >= teacher.cfg.num_inference_steps:
        raise SystemExit(f"--refine: every σ_r must be at least the teacher's last level {sigmas[-2]:.4f}")
    base = teacher.transformer_for(float(teacher.num_train_timesteps))
    student = Student.from_pretrained(folder, base_transformer=base)
    if student.is_lora:
        raise SystemExit(f"{folder}: --refine reads full and causal students (a LoRA student shares the teacher)")
    student.to(dtype=base.dtype).eval()
    sampler, _ = student_sampler(student, teacher.cfg.shift, teacher.cfg.num_inference_steps, ctx["shape"][1])
    videos: dict[float, list] = {level: [] for level in levels}
    for rows in ctx["batches"]:
        prompts = [r["prompt"] for r in rows]
        noise = torch.stack([sample_noise(r["seed"], ctx["shape"]) for r in rows])
        cond = teacher.encode(prompts, ctx["negative"])  # the teacher's CFG; a student's only when it has one
        x0 = sampler(cond if student.cfg.guidance_scale != 1 else teacher.encode(prompts, None), noise, rows)
        fresh = torch.stack([sample_noise(derive_seed(r["seed"], 2), ctx["shape"]) for r in rows])
        for level, k in starts.items():
            latents = teacher.sample(cond, add_noise(x0, fresh, sigmas[k]), start_step=k).latents
            videos[level].extend(decode_videos(teacher, latents, len(rows)))
    return {
        str(level): {"sigma": round(sigmas[k], 4), "step": k, **read_errors(videos[level], ctx["rows"])}
        for level, k in starts.items()
    }


def errors(args) -> None:
    from distill.eval import eval_student, find_students
    from teachers.wan import WanTeacher

    out, teacher, ctx = Path(args.out), None, None
    for seed, name, result in _seed_files(args, "errors_seed"):
        overrides = [*args.overrides, "eval.long_rollout_prompts=1"]  # the drift curve is not read here
        recipe = _recipe(args.recipe, overrides, out, name, seed, args.prompts, args.eval_seed)
        folder = dict(find_students(recipe)).get(name)
        if folder is None:
            raise SystemExit(f"{recipe.student_dir()}: no finished run; train it with `benchmarks.ablate run`")
        if teacher is None:
            teacher = WanTeacher.from_config(recipe.teacher, "cpu")
            ctx = {**_grading(recipe, teacher), "num_previews": args.prompts}  # previews: every video, to read
            path = out / f"teacher_errors_{args.prompts}_{args.eval_seed}.json"
            if not path.is_file():
                videos = _teacher_run(recipe, teacher, ctx, previews=ctx["num_previews"]).previews
                path.write_text(json.dumps(read_errors(videos, ctx["rows"]), indent=2) + "\n")
            print(f"ablate: teacher errors: {path.read_text()}", flush=True)
        _, run = eval_student(name, folder, teacher, recipe, ctx)
        table = read_errors(run.previews, ctx["rows"])
        if args.refine:
            table["refined"] = refined_reads(teacher, ctx, folder, args.refine)
        made = {"arm": args.arm, "seed": seed, "weights": folder.name}
        result.write_text(json.dumps({**made, **table}, indent=2) + "\n")
        print(f"ablate: {args.arm} seed {seed} errors: {json.dumps(table)}", flush=True)


def soup(args) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from distill.checkpoints import is_finished, weights_dir
    from teachers.wan import WanTeacher

    out, folders, recipe = Path(args.out), [], None
    for seed, name, _ in _seed_files(args, "seed"):
        recipe = _recipe(args.recipe, args.overrides, out, name, seed, args.prompts, args.eval_seed)
        if not is_finished(recipe.student_dir()):
            raise SystemExit(f"{recipe.student_dir()}: no finished run; `run` the arm for seed {seed} first")
        folders.append(weights_dir(recipe.student_dir(), recipe.eval.use_ema))
    if recipe.student.spec.adapters:
        raise SystemExit(f"student.kind: {recipe.student.kind!r} trains LoRA adapters; `soup` averages full weights")
    name = f"{args.arm}_soup"
    target = out / "runs" / "soups" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folders[0], target)
    for file in sorted(target.rglob("*.safetensors")):
        rel = file.relative_to(target)
        tensors = [load_file(f / rel) for f in folders]
        if any(t.keys() != tensors[0].keys() for t in tensors):
            raise SystemExit(f"{folders[0] / rel}: the seeds' weight files hold different tensors; not one recipe")
        mean = {k: (sum(t[k].double() for t in tensors) / len(tensors)).to(tensors[0][k].dtype) for k in tensors[0]}
        save_file(mean, file)
    teacher = WanTeacher.from_config(recipe.teacher, "cpu")
    ctx = _grading(recipe, teacher)
    result = out / args.arm / "soup.json"
    entry = _grade_and_write(args, args.arm, None, name, target, recipe, teacher, ctx, result, soup_of=args.seeds)
    print(f"ablate: {args.arm} soup of seeds {args.seeds}: all {entry['accuracy']['all']:.3f}", flush=True)


def _stats(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
        "n": len(values),
        "values": [round(v, 4) for v in values],
    }


def summarise(out: Path) -> dict[str, dict]:
    """arm -> {"all", "chunk_<k>", "drift_first", "drift_last": stats over seeds, "slots": {slot: stats}, "seeds",
    "overrides"}."""
    arms = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "runs"):
        rows = [json.loads(f.read_text()) for f in sorted(folder.glob("seed*.json"))]
        if not rows:
            continue
        s = {"all": _stats([r["accuracy"]["all"] for r in rows])}
        s["slots"] = {k: _stats([r["accuracy"][k] for r in rows]) for k in rows[0]["accuracy"] if k != "all"}
        if rows[0]["chunk_accuracy"] is not None:  # causal students only
            for k in range(len(rows[0]["chunk_accuracy"])):
                s[f"chunk_{k}"] = _stats([r["chunk_accuracy"][k] for r in rows])
        if rows[0]["long_rollout"] is not None:
            s["drift_first"] = _stats([r["long_rollout"]["segment_accuracy"][0] for r in rows])
            s["drift_last"] = _stats([r["long_rollout"]["segment_accuracy"][-1] for r in rows])
        s["seeds"] = [r["seed"] for r in rows]
        s["overrides"] = rows[0]["overrides"]
        s["teacher"] = {"all": rows[0]["teacher"]["accuracy"]["all"], "chunks": rows[0]["teacher"]["chunk_accuracy"]}
        s["prompts"], s["eval_seed"] = rows[0]["prompts"], rows[0]["eval_seed"]
        arms[folder.name] = s
    return arms


def summary(args) -> None:
    arms = summarise(Path(args.out))
    if not arms:
        raise SystemExit(f"{args.out}: no ablation results (run `python -m benchmarks.ablate run` first)")
    base = arms.get(args.baseline) if args.baseline else None
    if args.baseline and base is None:
        raise SystemExit(f"--baseline {args.baseline}: no such arm in {args.out}; arms: {', '.join(arms)}")
    for arm, s in arms.items():
        ratio = {} if base is None else {"delta_all_vs_baseline": round(s["all"]["mean"] - base["all"]["mean"], 4)}
        print(json.dumps({"benchmark": "ablate", "arm": arm, **s, "ratio": ratio}))

    def cell(st):
        if st is None:
            return ""
        return f"{st['mean']:.3f} ± {st['sd']:.3f}" if st["sd"] is not None else f"{st['mean']:.3f}"

    chunks_of = (len([k for k in s if k.startswith("chunk_")]) for s in arms.values())
    chunk_keys = [f"chunk_{k}" for k in range(max(chunks_of))]  # none: bidirectional students only
    drift = any("drift_first" in s for s in arms.values())
    extra = ["10x first", "10x last"] if drift else []

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    print("\n" + row(["arm", "seeds", "all", *chunk_keys, *extra, "overrides"]))
    print(row(["---", "---", "---:", *["---:"] * (len(chunk_keys) + len(extra)), "---"]))
    t = next(iter(arms.values()))["teacher"]
    teacher_chunks = [f"{a:.3f}" for a in (t["chunks"] or [])][: len(chunk_keys)]
    print(row(["teacher", "", f"{t['all']:.3f}", *teacher_chunks, *[""] * len(extra), ""]))
    for arm, s in arms.items():
        drifts = [cell(s.get("drift_first")), cell(s.get("drift_last"))] if drift else []
        seeds = ",".join(map(str, s["seeds"]))
        chunks = [cell(s.get(k)) for k in chunk_keys]
        print(row([arm, seeds, cell(s["all"]), *chunks, *drifts, " ".join(s["overrides"])]))


def _levels(value: str) -> list[float]:
    levels = [float(x) for x in value.split(",")]
    if not all(0.0 < level <= 1.0 for level in levels):
        raise argparse.ArgumentTypeError(f"noise levels must be in (0, 1], got {value}")
    return levels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def arm_parser(name: str, what: str) -> argparse.ArgumentParser:
        """A subcommand over one arm's runs: RECIPE, --arm, --seeds, --out and the grading prompts."""
        p = sub.add_parser(name, help=what)
        p.add_argument("recipe")
        p.add_argument("--arm", required=True)
        p.add_argument(
            "--seeds",
            type=lambda v: [int(x) for x in v.split(",")],
            default=[0, 1, 2],
            help="training seeds, comma-separated (default 0,1,2)",
        )
        p.add_argument("--out", default="outputs/ablations")
        p.add_argument("--prompts", type=int, default=128)
        p.add_argument("--eval-seed", type=int, default=777)
        return p

    arm_parser("run", "train and grade one arm over seeds")
    arm_parser("checkpoint", "grade the EMA an arm's runs held at an earlier checkpoint").add_argument(
        "--step", type=int, required=True
    )
    arm_parser("errors", "what the oracle read wrong in an arm's runs and in the teacher's videos").add_argument(
        "--refine",
        type=_levels,
        default=[],
        help="noise levels σ_r, comma-separated: also read the student's samples finished by the teacher from σ_r",
    )
    arm_parser("soup", "grade the mean of an arm's finished runs' weights")
    s = sub.add_parser("summary", help="mean and spread per arm")
    s.add_argument("--out", default="outputs/ablations")
    s.add_argument("--baseline", default=None)
    args, rest = parser.parse_known_args(argv)  # KEY=VALUE overrides may stand anywhere after `run`
    args.overrides = [a for a in rest if a != "--"]
    bad = [a for a in args.overrides if "=" not in a or a.startswith("-") or args.command == "summary"]
    if bad:
        parser.error(
            f"unrecognized arguments: {' '.join(bad)} (recipe overrides are KEY=VALUE, after the recipe; not with "
            "`summary`)"
        )
    os.chdir(ROOT)
    {"run": run, "checkpoint": checkpoint, "errors": errors, "soup": soup, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
