"""Timestep experts: N = 1, 2, 4 LoRA experts at equal training steps and equal sampling steps (toy world).

    python -m benchmarks.experts [--teacher DIR] [--steps 300] [--prompts 48] [--eval-prompts 64]
                                 [--out outputs/bench_experts] [--results benchmarks/RESULTS.md]

1. Data, once: `python -m distill run recipes/toyworld.yaml` (prompts -> teacher ODE trajectories).
2. Three students from recipes/toyworld_lora4.yaml (4 steps, denoising_steps [1000, 750, 500, 250], warped
   σ ≈ 1.0, 0.9, 0.75, 0.5), trained for the same `train.max_steps`: one LoRA (N=1), two experts split at
   σ = 0.8 (N=2), four split at 0.95 / 0.8 / 0.6 (N=4: one expert per sampling σ).
3. Eval on fresh prompts (`eval.seed`, not the training prompts), the same noise for every model
   (`distill.eval`'s prompts, noise and per-prompt renoise streams):
   - fidelity_mse: mean squared error in latent space between each student's 4-step sample and the teacher's
     own ODE sample (its default steps + CFG) from the same noise: distillation quality, whatever the
     teacher's own quality;
   - accuracy: the toy-world oracle on the decoded videos (all-attribute and per attribute);
   - trainable_params: the student's LoRA parameters (all experts);
   - jump_mse_per_sigma: per σ of `data.trajectory_steps` (`state_sigmas`), the MSE of the one-jump x0 from the
     teacher's own ODE state at σ to its endpoint (the training objective, on eval prompts). Unlike
     fidelity_mse it has no renoising, so it shows each σ interval (each expert) on its own.
   `undistilled_4step` is a reference: the teacher's weights sampled with the students' 4-step schedule.

`--teacher` defaults to teachers/toyworld/pipeline when it exists, else an UNTRAINED toy pipeline is built
into OUT/init (the JSON's `teacher.trained` says which). Prints one JSON line and appends a row to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

import benchmarks.results as results_md
from core.flow import timestep
from core.recipe_loader import resolve_path
from distill import cli
from distill.config import Recipe, load_recipe
from students.experts import expert_index

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("benchmarks.experts")

DATA_RECIPE = ROOT / "recipes" / "toyworld.yaml"
STUDENT_RECIPE = ROOT / "recipes" / "toyworld_lora4.yaml"
SHIPPED_TEACHER = ROOT / "teachers" / "toyworld" / "pipeline"
BOUNDARIES = {1: [], 2: [0.8], 4: [0.95, 0.8, 0.6]}
"""σ boundaries per expert count; with N=4 each expert owns exactly one of the 4 sampling σ's."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="WanPipeline folder (default: teachers/toyworld/pipeline, else an untrained toy pipeline)",
    )
    p.add_argument("--steps", type=int, default=300, help="train.max_steps of every student")
    p.add_argument("--prompts", type=int, default=48, help="data.num_prompts (training prompts)")
    p.add_argument("--eval-prompts", type=int, default=64, help="eval.num_prompts (fresh prompts)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_experts")
    p.add_argument("--results", type=Path, default=results_md.RESULTS, help="Markdown table the row is appended to")
    args = p.parse_args(argv)
    for key in ("steps", "prompts", "eval_prompts"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    return args


def resolve_teacher(arg: Path | None, out: Path) -> tuple[Path, bool | None]:
    """(pipeline folder, trained?): --teacher (trained unknown: None unless it is the shipped one), else the
    shipped toy teacher, else an untrained one built in OUT/init."""
    if arg is not None:
        return arg.resolve(), True if arg.resolve() == SHIPPED_TEACHER.resolve() else None
    if (SHIPPED_TEACHER / "model_index.json").is_file():
        return SHIPPED_TEACHER, True
    init = out / "init"
    if not (init / "model_index.json").is_file():
        from teachers.toyworld.build import main as build

        logger.warning("%s not found: building an UNTRAINED toy teacher in %s", SHIPPED_TEACHER, init)
        build([str(init)])
    return init, False


def _cli(stage: str, recipe: Path, overrides: list[str]) -> None:
    rc = cli.main([stage, str(recipe), *overrides])
    if rc != 0:
        raise SystemExit(
            f"python -m benchmarks.experts: `python -m distill {stage} {recipe.name}` failed (exit {rc}); "
            f"see the error above"
        )


def student_overrides(n: int, steps: int) -> list[str]:
    return [
        f"student.name=experts{n}",
        f"student.experts={n}",
        f"student.expert_boundaries={json.dumps(BOUNDARIES[n])}",
        f"train.max_steps={steps}",
    ]


def train_students(common: list[str], steps: int) -> None:
    """Train experts1/2/4 (skipping a finished run of the same length)."""
    for n in BOUNDARIES:
        overrides = common + student_overrides(n, steps)
        final = load_recipe(STUDENT_RECIPE, overrides).student_dir() / "final" / "COMPLETE"
        if final.is_file() and json.loads(final.read_text())["step"] == steps:
            logger.info("experts%d: %s is complete, skipping", n, final)
            continue
        _cli("train", STUDENT_RECIPE, overrides)


# ---- evaluation --------------------------------------------------------------------------------------
def _decode(teacher, latents: torch.Tensor) -> np.ndarray:
    return np.concatenate([teacher.to_uint8(teacher.decode(latents[i : i + 1])) for i in range(len(latents))])


def _score(latents: torch.Tensor, videos: np.ndarray, reference: torch.Tensor, slots: list[dict]) -> dict:
    from teachers.toyworld.oracle import grade

    mse = float(((latents.float() - reference.float()) ** 2).mean())
    return {"fidelity_mse": mse, "accuracy": grade(videos, slots)["accuracy"]}


def _jump_mse(model, states: list[torch.Tensor], sigmas: list[float], conds: list, ref: torch.Tensor) -> list[float]:
    """Per stored σ_k: MSE of the one-jump x0 = x_k - σ_k·model(x_k, 1000σ_k) from the teacher's OWN ODE state x_k
    to its endpoint (what `distill.trajectory` trains; no renoising, so it isolates each expert's interval)."""
    out = []
    for k, s in enumerate(sigmas):
        x0 = []
        for traj, cond in zip(states, conds):
            x = traj[:, k]
            t = timestep(torch.full((x.shape[0],), s, dtype=torch.float32, device=x.device))
            x0.append(x - s * model(x, t, cond.prompt_embeds).float())
        out.append(float(((torch.cat(x0) - ref) ** 2).mean()))
    return out


@torch.no_grad()
def evaluate(recipe: Recipe) -> dict:
    """Teacher, the undistilled 4-step reference and every student on the eval prompts; see the docstring."""
    from core.seeding import derive_seed, sample_noise
    from core.vocabulary import load_vocabulary
    from distill.eval import eval_prompts, find_students, train_overlap
    from students.sampling import sample_student, student_sampler, student_sigmas
    from students.student import Student
    from teachers.toyworld.oracle import grade
    from teachers.wan import Cond, WanTeacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = WanTeacher.from_config(recipe.teacher, device)
    tcfg = teacher.cfg
    rows = eval_prompts(recipe)
    slots = [r["slots"] for r in rows]
    vocab = load_vocabulary(resolve_path(recipe.data.vocabulary))
    negative = tcfg.negative_prompt if tcfg.negative_prompt is not None else vocab.negative_prompt
    shape = teacher.latent_shape(tcfg.num_frames, tcfg.height, tcfg.width)
    batches = [rows[i : i + recipe.eval.batch_size] for i in range(0, len(rows), recipe.eval.batch_size)]
    conds = [teacher.encode([r["prompt"] for r in b], negative) for b in batches]
    noises = [torch.stack([sample_noise(r["seed"], shape) for r in b]).to(device) for b in batches]

    def run(sampler) -> tuple[torch.Tensor, np.ndarray]:
        latents = torch.cat([sampler(c, x, b) for c, x, b in zip(conds, noises, batches)])
        return latents, _decode(teacher, latents)

    # 1. the teacher's own ODE samples (the fidelity reference) and its states at the training σ's
    samples = [teacher.sample(c, x, save_at=recipe.data.trajectory_steps) for c, x in zip(conds, noises)]
    ref = torch.cat([o.latents for o in samples])
    states = [o.trajectory for o in samples]
    state_sigmas = samples[0].sigmas[recipe.data.trajectory_steps].tolist()
    out = {
        "teacher": {
            "accuracy": grade(_decode(teacher, ref), slots)["accuracy"],
            "steps": tcfg.num_inference_steps,
            "guidance_scale": tcfg.guidance_scale,
        },
        "eval_prompts": len(rows),
        "train_overlap": train_overlap(recipe, rows),
        "students": {},
        "state_sigmas": state_sigmas,
    }

    def score(sampler, model) -> dict:
        entry = _score(*run(sampler), ref, slots)
        entry["jump_mse_per_sigma"] = _jump_mse(model, states, state_sigmas, conds, ref)
        return entry

    # 2. reference: the teacher's weights on the students' 4-step renoise schedule, no CFG
    sigmas = student_sigmas(recipe.student, tcfg.shift, tcfg.num_inference_steps)
    out["sampling_sigmas"] = sigmas
    base = teacher.transformer_for(float(teacher.num_train_timesteps))

    def base_v(x, t, e):
        return teacher.velocity(x, t, Cond(prompt_embeds=e), guidance=1.0)

    def undistilled(cond, noise, batch):
        gens = [torch.Generator("cpu").manual_seed(derive_seed(r["seed"], 1)) for r in batch]  # as `distill eval`
        return sample_student(base_v, cond.prompt_embeds, None, noise, sigmas, generator=gens)

    out["undistilled_4step"] = score(undistilled, base_v)
    # 3. the students, on the same prompts, noise and renoise streams as `distill eval`
    for name, folder in find_students(recipe):
        student = Student.from_pretrained(folder, base_transformer=base).eval()
        try:
            sampler, _info = student_sampler(student, teacher.cfg.shift, teacher.cfg.num_inference_steps, shape[1])
            entry = score(sampler, student)
            entry["trainable_params"] = sum(p.numel() for p in student.trainable_parameters())
            out["students"][name] = entry
        finally:  # LoRA students borrow the teacher's module: give it back without adapters
            base.delete_adapters(student.adapter_names)
    return out


# ---- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir, trained = resolve_teacher(args.teacher, out)
    common = [f"output_dir={out}", f"teacher.pretrained={teacher_dir}", f"data.num_prompts={args.prompts}"]
    # 1. data, once  2. the three students
    _cli("run", DATA_RECIPE, common)
    train_students(common, args.steps)
    # 3. eval: the experts students only (OUT may hold others)
    names = [f"experts{n}" for n in BOUNDARIES]
    recipe = load_recipe(
        STUDENT_RECIPE,
        common
        + student_overrides(1, args.steps)
        + [f"eval.num_prompts={args.eval_prompts}", f"eval.students={json.dumps(names)}"],
    )
    ev = evaluate(recipe)
    results = {str(n): ev["students"][f"experts{n}"] for n in BOUNDARIES}
    mse1 = results["1"]["fidelity_mse"]
    ratio = {n: results[n]["fidelity_mse"] / mse1 if mse1 > 0 else None for n in ("2", "4")}
    report = {
        "benchmark": "experts",
        "teacher": {"path": str(teacher_dir), "trained": trained, **ev["teacher"]},
        "train_steps": args.steps,
        "train_prompts": args.prompts,
        "eval_prompts": ev["eval_prompts"],
        "train_overlap": ev["train_overlap"],
        "sampling_sigmas": ev["sampling_sigmas"],
        "state_sigmas": ev["state_sigmas"],
        "boundaries": {str(n): b for n, b in BOUNDARIES.items()},
        "expert_of_sigma": {str(n): [expert_index(x, b) for x in ev["sampling_sigmas"]] for n, b in BOUNDARIES.items()},
        "results": results,
        "undistilled_4step": ev["undistilled_4step"],
        "ratio_mse_2_vs_1": ratio["2"],
        "ratio_mse_4_vs_1": ratio["4"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    line = json.dumps(report)
    print(line, flush=True)
    command = "python -m benchmarks.experts " + " ".join(sys.argv[1:] if argv is None else argv)
    results_md.append_result(
        command.strip(), json.loads(line), ["ratio_mse_2_vs_1", "ratio_mse_4_vs_1"], path=args.results
    )
    return report


if __name__ == "__main__":
    main()
