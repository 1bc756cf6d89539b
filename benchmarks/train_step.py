"""One Self-Forcing training step (generator + critic): seconds per iteration and peak memory, with gradient
checkpointing on/off and 8-bit AdamW on/off.

    python -m benchmarks.train_step --size tiny [--steps 3] [--warmup 1] [--batch-size 8]
    python -m benchmarks.train_step --size 1.3b [--checkpointing on] [--optimizer both]   # CUDA only
    python -m benchmarks.train_step --size 1.3b --tiny-shape                              # CPU smoke run

The step is the trainer's (`distill.trainer.train`, one optimizer step with `generator_update_interval` 1, so the
generator AND the critic update): the student, critic, optimizers, LR schedulers and EMA are built by the trainer's
own functions from the recipe, and `distill.self_forcing.SelfForcing` gives both losses. Only the data is synthetic
(zero latents, which fix the shape; the rollout starts from noise anyway). The same trainer steps, hence the same
random exit steps, are timed in every variant.

Each variant runs in its own process, so its peak memory is its own: on a GPU `torch.cuda.max_memory_allocated`, on a
CPU the peak RSS (`resource.getrusage`, which includes the ~0.5 GB of the Python process and libraries). `step_mem_mib`
is the peak while stepping minus what was held before the first step (optimizer states, gradients, activations).
`planned_mib` is the dry run's memory plan (`distill.memory_plan`: weights, gradients, optimizer states, EMA and the
step's activations) of the roles the step builds, `peak_minus_planned_mib` what the plan misses (on a CPU, the
process too) and `ratio_peak_vs_planned` the measured peak over it.
8-bit AdamW (`train.optimizer: adamw8bit`) needs bitsandbytes and CUDA: elsewhere its variants are "unavailable".
A variant that runs out of GPU memory is reported as "oom".

Sizes: `tiny` = recipes/toyworld_self_forcing.yaml on the toy-world teacher (teachers/toyworld/pipeline if shipped,
else an untrained build; the student starts from the teacher's weights). `1.3b` = recipes/wan21_1.3b_self_forcing.yaml
(bf16 mixed precision, full critic, EMA, 21 latent frames = 7 chunks at 480x832) on the Wan2.1-T2V-1.3B transformer
built from config with RANDOM weights and random [B, 512, 4096] text embeddings (no download, no text encoder).
Prints one JSON line and appends a row to benchmarks/RESULTS.md. CPU figures are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    Clock,
    peak_rss_mib,
    random_text,
    ratio,
    require_cuda,
    sig,
    toy_teacher_dir,
    wan21_pipeline,
)
from benchmarks.results import RESULTS, append_result

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("benchmarks.train_step")

TOY_RECIPE = ROOT / "recipes" / "toyworld_self_forcing.yaml"
WAN_RECIPE = ROOT / "recipes" / "wan21_1.3b_self_forcing.yaml"
CAPTIONS = ["a red circle moving left", "a blue square bouncing", "a green triangle on a white background"]
NEGATIVE = "blurry, noise"
OPTIMIZERS = ("adamw", "adamw8bit")
RATIO_KEYS = [
    "ratio_time_checkpointing_on_vs_off",
    "ratio_step_mem_checkpointing_on_vs_off",
    "ratio_peak_mem_checkpointing_on_vs_off",
    "ratio_time_adamw8bit_vs_adamw",
    "ratio_peak_mem_adamw8bit_vs_adamw",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "1.3b"], default="tiny")
    p.add_argument(
        "--tiny-shape",
        action="store_true",
        help="--size 1.3b only: a few layers and 64x64 px (a CPU smoke run of the code path)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first allocates optimizer states)")
    p.add_argument("--batch-size", type=int, default=None, help="train.batch_size (default: the recipe's)")
    p.add_argument("--frames", type=int, default=None, help="latent frames per video (default: the teacher's)")
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    p.add_argument("--optimizer", choices=[*OPTIMIZERS, "both"], default="both")
    p.add_argument("--results", type=Path, default=RESULTS, help="Markdown table the row is appended to")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: `on:adamw`, one variant, no row
    args = p.parse_args(argv)
    if args.tiny_shape and args.size != "1.3b":
        p.error("--tiny-shape: only with --size 1.3b (--size tiny is already CPU-sized)")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    for key in ("batch_size", "frames"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    return args


# ---- one variant (its own process) -------------------------------------------------------------------------------
def build(args, tmp: Path, device: torch.device, checkpointing: bool, optimizer: str):
    """(recipe, teacher, cond of a batch, info) for `--size`."""
    from distill.config import load_recipe
    from teachers.wan import Cond, WanTeacher

    common = [
        f"output_dir={tmp / 'out'}",
        "student.init=null",
        "method.self_forcing.generator_update_interval=1",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        f"train.optimizer={optimizer}",
        "train.log_with=none",
    ]
    if args.batch_size is not None:
        common.append(f"train.batch_size={args.batch_size}")
    if args.size == "tiny":
        folder, trained = toy_teacher_dir(tmp)
        frames = [] if args.frames is None else [f"teacher.num_frames={args.frames}"]  # toy VAE: 1 pixel frame each
        recipe = load_recipe(TOY_RECIPE, [*common, f"teacher.pretrained={folder}", *frames])
        teacher = WanTeacher.from_config(recipe.teacher, device)
        b = recipe.train.batch_size
        cond = teacher.encode([CAPTIONS[i % len(CAPTIONS)] for i in range(b)], NEGATIVE)
        info = {"teacher": str(folder), "trained": trained}
    else:
        extra = ["teacher.height=64", "teacher.width=64"] if args.tiny_shape else []
        if args.frames is not None:
            extra.append(f"teacher.num_frames={1 + 4 * (args.frames - 1)}")  # Wan VAE: 4x temporal
        recipe = load_recipe(WAN_RECIPE, [*common, *extra])
        pipe = wan21_pipeline(device, torch.bfloat16, tiny_shape=args.tiny_shape)
        teacher = WanTeacher(pipe, recipe.teacher, device)
        b, dim = recipe.train.batch_size, pipe.transformer.config.text_dim
        cond = Cond(prompt_embeds=random_text(b, dim, device, 0), negative_embeds=random_text(b, dim, device, 1))
        shape = " (tiny shape)" if args.tiny_shape else ""
        info = {"teacher": f"random weights, Wan2.1-T2V-1.3B config{shape}", "trained": False}
    return recipe, teacher, cond, info


def run_variant(args, checkpointing: bool, optimizer: str) -> dict:
    """Build the trainer's pieces for one variant and time `warmup + steps` trainer steps."""
    from accelerate.utils import set_seed

    from core.seeding import sample_generator
    from distill import trainer
    from distill.accel import make_accelerator
    from distill.batch import Batch
    from students.student import build_student

    device = (
        require_cuda("python -m benchmarks.train_step", args.tiny_shape) if args.size == "1.3b" else torch.device("cpu")
    )
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        recipe, teacher, cond, info = build(args, Path(tmp), device, checkpointing, optimizer)
        tc = recipe.train
        accelerator = make_accelerator(**trainer.accelerator_kwargs(recipe))
        # as distill.trainer.train builds them
        set_seed(tc.seed)
        student = build_student(recipe.student, teacher.pipe.transformer)
        if tc.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        params, opt, sched, ema = trainer._optimization(recipe, accelerator, student)
        model, opt, sched = accelerator.prepare(student, opt, sched)
        critic = trainer.make_critic(recipe, teacher)
        if tc.gradient_checkpointing:
            critic.transformer.enable_gradient_checkpointing()
        critic_params, critic_opt, critic_sched = trainer._critic_optimization(recipe, accelerator, critic)
        algorithm = trainer.build_algorithm(recipe, teacher, model, student, trainer._autocast(accelerator, critic))
        shape = teacher.latent_shape(recipe.teacher.num_frames, recipe.teacher.height, recipe.teacher.width)
        b = tc.batch_size

        def batch(step: int) -> Batch:
            indices = list(range(step * b, (step + 1) * b))
            return Batch(
                x0=None,
                latent_shape=tuple(shape),
                cond=cond,
                indices=indices,  # captions only
                generators=[sample_generator(tc.seed, i) for i in indices],
                captions=[""] * b,
            )

        def train_step(step: int) -> dict:
            """One step of `distill.trainer.train`'s loop with train_generator = True (its steps 2-5)."""
            data = batch(step)
            with accelerator.accumulate(model):
                loss, logs = algorithm.generator_loss(data)
                accelerator.backward(loss)
                critic_loss, critic_logs = algorithm.critic_loss(data)
                accelerator.backward(critic_loss)
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(critic_params, tc.max_grad_norm)
                critic_opt.step()
                critic_sched.step()
                critic_opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            return {"loss/dmd": float(logs["loss/dmd"]), "loss/critic": float(critic_logs["loss/critic"])}

        figures = measure(train_step, args.warmup, args.steps, device)
        planned = planned_mib(args, recipe)
        return {
            "status": "ok",
            **figures,
            "planned_mib": planned,  # the dry run's plan of this step's roles (states and activations)
            "peak_minus_planned_mib": None if planned is None else figures["peak_mem_mib"] - planned,
            "ratio_peak_vs_planned": None if planned is None else round(figures["peak_mem_mib"] / planned, 3),
            "student_trainable_params": sum(p.numel() for p in params),
            "critic_trainable_params": sum(p.numel() for p in critic_params),
            "latent_shape": list(shape),
            "batch_size": b,
            "chunks": -(-shape[1] // recipe.student.frames_per_block),
            "mixed_precision": tc.mixed_precision,
            "ema": tc.ema,
            "device": device.type,
            **info,
        }


def planned_mib(args, recipe) -> float | None:
    """`distill.memory_plan`'s total for the roles this benchmark builds (`1.3b`: no text encoder); None for
    `--tiny-shape`, whose shrunken transformer is no released config."""
    from distill.memory_plan import plan_memory

    if args.size != "tiny" and args.tiny_shape:
        return None
    skip = set() if args.size == "tiny" else {"text encoder"}
    plan = plan_memory(recipe)
    return (plan.total - sum(line.bytes for line in plan.lines if line.role in skip)) / 2**20


def measure(train_step, warmup: int, steps: int, device: torch.device) -> dict:
    """Run `train_step(i)` for i < warmup + steps; seconds of the last `steps` and memory (module docstring)."""
    clock, cuda = Clock(device), device.type == "cuda"
    build_peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() / 2**20 if cuda else current_rss_mib()
    seconds, logs = [], {}
    for step in range(warmup + steps):
        start = clock()
        logs = train_step(step)
        if step >= warmup:
            seconds.append(clock() - start)
    if cuda:
        step_peak = torch.cuda.max_memory_allocated() / 2**20
        peak, step_mem = max(build_peak / 2**20, step_peak), step_peak - held
    else:
        peak = peak_rss_mib()
        step_mem = peak - held
    return {
        "s_per_it": sum(seconds) / len(seconds),
        "step_seconds": [sig(s, 4) for s in seconds],
        "peak_mem_mib": peak,
        "step_mem_mib": step_mem,
        "losses": logs,
        "memory": "cuda max_memory_allocated" if cuda else "peak RSS (ru_maxrss)",
    }


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc/self/statm: pages)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def variant_main(args) -> None:
    on, optimizer = args.variant.split(":")
    try:
        out = run_variant(args, on == "on", optimizer)
    except torch.cuda.OutOfMemoryError as e:
        out = {"status": "oom", "reason": str(e).splitlines()[0]}
    print(json.dumps(out), flush=True)


# ---- the parent: every variant, one JSON line ------------------------------------------------------------------
def eight_bit_unavailable() -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        return "8-bit AdamW needs bitsandbytes and a CUDA GPU"
    return None


def spawn(args, on: str, optimizer: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        "--size",
        args.size,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--variant",
        f"{on}:{optimizer}",
    ]
    cmd += ["--tiny-shape"] if args.tiny_shape else []
    cmd += ["--batch-size", str(args.batch_size)] if args.batch_size is not None else []
    cmd += ["--frames", str(args.frames)] if args.frames is not None else []
    logger.info("variant checkpointing %s, %s", on, optimizer)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"python -m benchmarks.train_step: variant checkpointing {on}, {optimizer} failed "
            f"(exit {proc.returncode}); see the error above"
        )
    return json.loads(lines[-1])


def summarise(args, variants: dict[str, dict]) -> dict:
    def ok(key):
        v = variants.get(key)
        return v if v is not None and v["status"] == "ok" else None

    first = next((v for v in variants.values() if v["status"] == "ok"), {})
    shared = {
        k: first[k]
        for k in (
            "device",
            "teacher",
            "trained",
            "latent_shape",
            "batch_size",
            "chunks",
            "mixed_precision",
            "ema",
            "memory",
        )
        if k in first
    }
    out = {
        "benchmark": "train_step",
        "size": args.size,
        "tiny_shape": args.tiny_shape,
        **shared,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    for key, v in variants.items():
        if v["status"] == "ok":
            v = {**v, **{k: sig(v[k]) for k in ("s_per_it", "peak_mem_mib", "step_mem_mib")}}
            v = {k: x for k, x in v.items() if k not in shared}
        out[key] = v

    def pair(a, b, key):
        return ratio(a[key], b[key]) if a and b else None

    on, off = ok("checkpointing_on/adamw"), ok("checkpointing_off/adamw")
    out["ratio_time_checkpointing_on_vs_off"] = pair(on, off, "s_per_it")
    out["ratio_step_mem_checkpointing_on_vs_off"] = pair(on, off, "step_mem_mib")
    out["ratio_peak_mem_checkpointing_on_vs_off"] = pair(on, off, "peak_mem_mib")
    for c in ("on", "off"):  # 8-bit vs plain AdamW at the same checkpointing setting (on if both ran)
        base, eight = ok(f"checkpointing_{c}/adamw"), ok(f"checkpointing_{c}/adamw8bit")
        if base and eight:
            break
    out["ratio_time_adamw8bit_vs_adamw"] = pair(eight, base, "s_per_it")
    out["ratio_peak_mem_adamw8bit_vs_adamw"] = pair(eight, base, "peak_mem_mib")
    out["torch"], out["threads"] = torch.__version__, torch.get_num_threads()
    return out


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.variant is not None:
        variant_main(args)
        return None
    if args.size == "1.3b":
        require_cuda("python -m benchmarks.train_step", args.tiny_shape)  # fail before spawning anything
    started = time.perf_counter()
    checkpointing = ["on", "off"] if args.checkpointing == "both" else [args.checkpointing]
    optimizers = list(OPTIMIZERS) if args.optimizer == "both" else [args.optimizer]
    variants = {}
    for on in checkpointing:
        for optimizer in optimizers:
            reason = eight_bit_unavailable() if optimizer == "adamw8bit" else None
            key = f"checkpointing_{on}/{optimizer}"
            variants[key] = {"status": "unavailable", "reason": reason} if reason else spawn(args, on, optimizer)
    result = summarise(args, variants)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result), flush=True)
    command = "python -m benchmarks.train_step " + " ".join(sys.argv[1:] if argv is None else argv)
    append_result(command.strip(), result, RATIO_KEYS, path=args.results)
    return result


if __name__ == "__main__":
    main()
