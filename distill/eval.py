"""The `eval` stage: grade the teacher and every finished student on fresh prompts, time them, write a report.

    python -m distill eval RECIPE.yaml [output_dir=DIR] [eval.seed=S] [eval.num_prompts=N]

1. Prompts: `compose(vocabulary, eval.num_prompts, eval.seed, eval.prompt_mode)`, a fresh draw that never
   reads prompts.jsonl; prompt i's noise is `randn(latent_shape)` from a CPU generator seeded with
   `derive_seed(eval.seed, i)`, the same tensor for the teacher and every student (as in `generate`).
2. Models: the teacher (its recipe's steps, CFG and shift), then each student in
   `<output_dir>/students/<name>/final/` that holds a `COMPLETE` marker (its `final_ema/` weights when present
   and `eval.use_ema`), sampled with its own `denoising_steps` / guidance (`students.sampling`); causal students
   (`kind: causal`) chunk by chunk with their KV cache (`students.causal.sample_causal`), as they stream. Renoising
   students draw their fresh noise from per-prompt generators seeded with `derive_seed(seed_i, 1)`, so results
   do not depend on `eval.batch_size`.
   Causal students also roll out `eval.long_rollout_factor` × the teacher's latent frames (rounded up to whole
   chunks) for the first `eval.long_rollout_prompts` prompts (noise `randn` of that length from seed_i), and the oracle
   grades each of `long_rollout_factor` equal time segments: the drift curve (`long_rollout`, drift.png).
   Their teacher-length videos are also graded chunk by chunk (`chunk_accuracy`: all-attribute accuracy of each
   chunk's frames), and the teacher's in the same time segments, to show which chunk holds a student back.
3. Timing: the first batch is each model's warm-up (graded, not timed: samplers are deterministic in their
   noise, so a second run would give the same videos), then `time.perf_counter` around the sampler and around
   the VAE decode of every other batch (the device is synchronised first); with a single batch it runs twice.
   Students' samplers then re-run the timed batches until their timed sampling reaches
   `eval.student_timing_seconds` (a 4-step student's pass is short and noisy); their sampling time is the mean per
   pass. Text encoding and grading are not timed; both are shared. `seconds_per_video` = sampling + decode per timed
   video and `speedup` = teacher seconds_per_video / student seconds_per_video (end to end), `sampling_speedup` the same
   for the sampler alone (noise -> latents, what distillation changes; the VAE decode is shared).
4. Grading: the toy world's oracle (`teachers.toyworld.oracle.grade`) when the vocabulary is the toy world's
   (`eval.grader`). No oracle exists for other vocabularies (real Wan prompts): accuracy is then null, never
   estimated, and only timings are reported.
5. Output, written to `<output_dir>/eval.tmp/` and then swapped in as `<output_dir>/eval/`, so a finished
   eval folder is always complete and holds no stale files: report.json, report.md, prompts.jsonl,
   accuracy.png (graded runs), drift.png (when a causal student has a long rollout), first_frames.png,
   compare.mp4 and preview_<model>.mp4/.gif for the first `eval.num_previews` prompts.

report.json:
    {"num_prompts": N, "seed": S, "prompt_mode", "vocabulary", "grader": "toyworld" | null, "device",
     "train_overlap": fraction | null, "num_previews",
     "teacher": {"nfe", "steps", "guidance_scale", "shift", "accuracy": {"all", <slot>...} | null,
                 "chunk_accuracy": [all-attribute accuracy per time segment] | null, "seconds_per_video",
                 "sample_seconds_per_video", "decode_seconds_per_video"},
     "students": {<name>: {"nfe", "causal", "kind", "weights", "steps", "guidance_scale", "accuracy",
                           "chunk_accuracy" (causal students: per chunk of the training length; else null),
                           "seconds_per_video", "sample_seconds_per_video", "decode_seconds_per_video",
                           "speedup", "sampling_speedup", "long_rollout" (causal students only: {"length_factor",
                           "num_frames", "num_prompts", "segment_accuracy": [...]} or null without a grader)}}}
NFE counts transformer forward passes per video: steps × 2 where CFG runs (guidance != 1), else × 1; a causal
student's chunks also run one cache write each but the last: steps + (chunks - 1) / chunks whole-video passes.

Runs on the main process only (other processes of an `accelerate launch` return at once): timings need a
quiet device.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.recipe_loader import RecipeError, resolve_path
from core.seeding import sample_noise
from core.vocabulary import Vocabulary, load_vocabulary
from distill import report as rep
from distill.accel import make_accelerator
from distill.checkpoints import COMPLETE, final_dir, is_finished, weights_dir
from distill.config import Recipe
from students.causal import chunk_bounds
from students.sampling import student_sampler
from students.student import Student, read_student_json
from synth_data.composer import compose, read_prompts
from teachers.toyworld.oracle import grade
from teachers.toyworld.render import SLOTS, VALUES, check_size
from teachers.wan import WanTeacher

logger = logging.getLogger(__name__)


# ---- prompts, noise and grading ---------------------------------------------------------------
def eval_prompts(recipe: Recipe) -> list[dict]:
    """The eval's prompt rows `{index, prompt, slots, seed}`: composed from `data.vocabulary` with `eval.seed`."""
    if recipe.eval.seed == recipe.data.seed:
        raise RecipeError(
            f"{recipe.source}: eval.seed: equals data.seed ({recipe.data.seed}), so the eval would reuse the "
            "training noise; set eval.seed to another value"
        )
    vocab = load_vocabulary(resolve_path(recipe.data.vocabulary))
    return compose(vocab, recipe.eval.num_prompts, recipe.eval.seed, recipe.eval.prompt_mode)


def oracle_applies(vocab: Vocabulary) -> bool:
    """True when the vocabulary's slots are the toy world's and all its values are ones the renderer draws."""
    return set(vocab.slots) == set(SLOTS) and all(set(vocab.slots[s]) <= set(VALUES[s]) for s in SLOTS)


def choose_grader(recipe: Recipe, vocab: Vocabulary) -> str | None:
    """ "toyworld" or None (see `EvalConfig.grader`); checks the frame size up front when grading."""
    want = recipe.eval.grader
    if want == "none":
        return None
    if not oracle_applies(vocab):
        if want == "toyworld":
            raise RecipeError(
                f"{recipe.source}: eval.grader: 'toyworld' needs the toy world's slots and values, but "
                f"{vocab.source} is vocabulary {vocab.name!r}; use eval.grader=auto or none"
            )
        logger.info("eval: vocabulary %r has no oracle; reporting timings only (accuracy null)", vocab.name)
        return None
    cfg = recipe.teacher
    check_size(cfg.height, cfg.width)
    if cfg.num_frames < 2:
        raise RecipeError(f"{recipe.source}: teacher.num_frames: the oracle reads motion from >= 2 frames, got 1")
    return "toyworld"


def train_overlap(recipe: Recipe, rows: list[dict]) -> float | None:
    """Share of eval prompts whose slot combination also occurs in `<output_dir>/prompts.jsonl` (None if absent)."""
    path = recipe.out / "prompts.jsonl"
    if not path.is_file():
        return None
    seen = {tuple(sorted(r["slots"].items())) for r in read_prompts(path)}
    return sum(tuple(sorted(r["slots"].items())) in seen for r in rows) / len(rows)


@dataclass
class _Grades:
    """Running, size-weighted means of the oracle's per-batch accuracies (exact: every video has one segment), and
    of the all-attribute accuracy per chunk when the videos are also graded in `num_segments` time segments."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    chunk_sums: np.ndarray | None = None

    def add(self, result: dict, n: int, chunks: dict | None = None) -> None:
        for k, v in result["accuracy"].items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        if chunks is not None:
            acc = np.asarray(chunks["segment_accuracy"]) * n
            self.chunk_sums = acc if self.chunk_sums is None else self.chunk_sums + acc
        self.count += n

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()}

    def chunk_means(self) -> list[float] | None:
        return None if self.chunk_sums is None else [float(a) for a in self.chunk_sums / self.count]


# ---- running one model ------------------------------------------------------------------------
Sampler = Callable[[object, torch.Tensor, list[dict]], torch.Tensor]
"""(cond, noise [B, C, F, H, W] on the device, prompt rows) -> latents [B, C, F, H, W]."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Run:
    sample_seconds: float = 0.0
    decode_seconds: float = 0.0
    timed_videos: int = 0
    sampled_videos: int = 0
    """Videos behind sample_seconds: timed_videos × the timing passes."""
    previews: list[np.ndarray] = field(default_factory=list)
    grades: _Grades = field(default_factory=_Grades)


def decode_videos(teacher, latents: torch.Tensor, per_call: int) -> np.ndarray:
    """uint8 [B, F, H, W, 3], `per_call` (`eval.decode_batch_size`) videos per VAE call: 1, as `generate` does, for
    long clips, whose decode is memory-bound."""
    return np.concatenate(
        [teacher.to_uint8(teacher.decode(latents[i : i + per_call])) for i in range(0, len(latents), per_call)]
    )


MAX_TIMING_PASSES = 10
"""`eval.student_timing_seconds` re-runs a student's timed batches at most this many times in all."""


def run_model(
    name: str,
    sampler: Sampler,
    teacher,
    batches: list[list[dict]],
    shape: tuple[int, ...],
    negative: str | None,
    grader: str | None,
    num_previews: int,
    decode_batch: int = 1,
    timing_seconds: float = 0.0,
    num_chunks: int | None = None,
) -> _Run:
    """Sample, decode and grade one model over all batches; time all but the first (the warm-up). Then, while the
    timed sampling adds up to less than `timing_seconds` (and at most MAX_TIMING_PASSES passes), the sampler runs
    the timed batches again (the same work: seeded noise and generators); its time is the mean per pass. Decode
    and grades come from the first pass. `num_chunks`: also grade each video's `num_chunks` equal time segments
    (a causal student's chunks of the training length) for `chunk_accuracy`."""
    device = teacher.device

    def inputs(rows: list[dict]) -> tuple[object, torch.Tensor]:
        cond = teacher.encode([r["prompt"] for r in rows], negative)  # shared, not timed
        return cond, torch.stack([sample_noise(r["seed"], shape) for r in rows]).to(device)

    def timed_sample(cond, noise: torch.Tensor, rows: list[dict]) -> tuple[torch.Tensor, float]:
        _sync(device)
        t0 = time.perf_counter()
        latents = sampler(cond, noise, rows)
        _sync(device)
        return latents, time.perf_counter() - t0

    def one(rows: list[dict]) -> tuple[np.ndarray, float, float]:
        latents, ts = timed_sample(*inputs(rows), rows)
        t1 = time.perf_counter()
        frames = decode_videos(teacher, latents, decode_batch)
        _sync(device)
        return frames, ts, time.perf_counter() - t1

    run = _Run()
    bar = tqdm(total=len(batches), desc=f"eval {name}", unit="batch", leave=False)
    for i, rows in enumerate(batches):
        frames, ts, td = one(rows)
        if i == 0 and len(batches) == 1:  # the only batch was the warm-up: run it again for the clock
            _, ts, td = one(rows)
        if i > 0 or len(batches) == 1:  # the first batch warms up kernels, allocator and caches
            run.sample_seconds, run.decode_seconds = run.sample_seconds + ts, run.decode_seconds + td
            run.timed_videos += len(rows)
            run.sampled_videos += len(rows)
        run.previews.extend(frames[: num_previews - len(run.previews)])
        if grader == "toyworld":
            slots = [r["slots"] for r in rows]
            chunks = grade(frames, slots, num_segments=num_chunks) if num_chunks else None
            run.grades.add(grade(frames, slots), len(rows), chunks)
        bar.update()
    bar.close()
    if run.sample_seconds < timing_seconds:  # inputs encoded once for all the extra passes
        timed = [(rows, *inputs(rows)) for rows in (batches[1:] if len(batches) > 1 else batches)]
        while run.sample_seconds < timing_seconds and run.sampled_videos < MAX_TIMING_PASSES * run.timed_videos:
            for rows, cond, noise in timed:
                run.sample_seconds += timed_sample(cond, noise, rows)[1]
                run.sampled_videos += len(rows)
    return run


def _timing(run: _Run, grader: str | None) -> dict:
    n = run.timed_videos
    return {
        "accuracy": run.grades.means() if grader else None,
        "chunk_accuracy": run.grades.chunk_means() if grader else None,
        "seconds_per_video": run.sample_seconds / run.sampled_videos + run.decode_seconds / n,
        "sample_seconds_per_video": run.sample_seconds / run.sampled_videos,
        "decode_seconds_per_video": run.decode_seconds / n,
        "timed_videos": n,
        "timing_passes": run.sampled_videos // n,
    }


def teacher_nfe(teacher) -> int:
    """Transformer calls per video: 2 per step where CFG runs (w != 1), else 1 (two experts: per-expert w)."""
    cfg = teacher.cfg
    scheduler = teacher.make_scheduler()
    scheduler.set_timesteps(cfg.num_inference_steps)
    low_w = cfg.guidance_scale_2 if cfg.guidance_scale_2 is not None else cfg.guidance_scale
    nfe = 0
    for t in scheduler.timesteps.tolist():
        w = cfg.guidance_scale if teacher.boundary is None or t >= teacher.boundary else low_w
        nfe += 2 if w != 1 else 1
    return nfe


# ---- students ---------------------------------------------------------------------------------
def find_students(recipe: Recipe) -> list[tuple[str, Path]]:
    """(name, weights folder) of each student to grade, sorted by name (see `EvalConfig.students`)."""
    root = recipe.out / "students"
    finished = sorted(p.name for p in root.iterdir() if is_finished(p)) if root.is_dir() else []
    names = finished
    if recipe.eval.students is not None:
        missing = [n for n in recipe.eval.students if n not in finished]
        if missing:
            raise FileNotFoundError(
                f"eval.students: {missing[0]!r} has no finished run ({final_dir(root / missing[0]) / COMPLETE} is "
                f"missing); finished students: {finished or 'none'}; train it first or drop it from eval.students"
            )
        names = sorted(recipe.eval.students)
    if "teacher" in names:
        raise ValueError(
            f"{root / 'teacher'}: a student may not be named 'teacher' (the eval's name for the teacher); "
            "rename the folder and its student.name"
        )
    return [(name, weights_dir(root / name, recipe.eval.use_ema)) for name in names]


def long_rollout(student, teacher, recipe: Recipe, rows: list[dict], grader: str | None) -> dict | None:
    """A causal student's drift curve: for the first `eval.long_rollout_prompts` prompts, roll out
    `eval.long_rollout_factor` × the teacher's latent frames (rounded up to whole chunks) chunk by chunk, decode,
    and grade each of `long_rollout_factor` equal time segments with the oracle. Returns {"length_factor",
    "num_frames" (latent), "num_prompts", "segment_accuracy": all-slot accuracy per segment,
    "segment_slot_accuracy": {slot: accuracy per segment}}, or None without a grader (nothing to read back)."""
    if grader != "toyworld":
        logger.info("eval: no grader, so no drift curve for causal student %s", student.cfg.name)
        return None
    factor, tcfg = recipe.eval.long_rollout_factor, teacher.cfg
    c, f, h, w = teacher.latent_shape(tcfg.num_frames, tcfg.height, tcfg.width)
    fpb = student.cfg.frames_per_block
    frames = math.ceil(factor * f / fpb) * fpb
    sampler, _ = student_sampler(student, teacher.cfg.shift, teacher.cfg.num_inference_steps, frames)
    subset, size = rows[: recipe.eval.long_rollout_prompts], recipe.eval.batch_size
    sums, count = {}, 0  # "all" and each slot: accuracy per segment, weighted by batch size
    for start in tqdm(
        range(0, len(subset), size), desc=f"eval {student.cfg.name} long rollout", unit="batch", leave=False
    ):
        batch = subset[start : start + size]
        cond = teacher.encode([r["prompt"] for r in batch], None)
        noise = torch.stack([sample_noise(r["seed"], (c, frames, h, w)) for r in batch]).to(teacher.device)
        latents = sampler(cond, noise, batch)
        videos = decode_videos(teacher, latents, recipe.eval.decode_batch_size)
        graded = grade(videos, [r["slots"] for r in batch], num_segments=factor)
        for key, acc in {"all": graded["segment_accuracy"], **graded["segment_slot_accuracy"]}.items():
            sums[key] = sums.get(key, 0) + np.asarray(acc) * len(batch)
        count += len(batch)
    means = {key: [float(a) for a in v / count] for key, v in sums.items()}
    return {
        "length_factor": factor,
        "num_frames": frames,
        "num_prompts": count,
        "segment_accuracy": means.pop("all"),
        "segment_slot_accuracy": means,
    }


def training_chunks(latent_frames: int, student_cfg) -> int:
    """Chunks of a causal student in one teacher-length video (`students.causal.chunk_bounds`)."""
    first = 1 if student_cfg.independent_first_frame else None
    return len(chunk_bounds(latent_frames, student_cfg.frames_per_block, first))


def teacher_chunks(students: list[tuple[str, Path]], latent_frames: int) -> int | None:
    """The time segments to grade the teacher in, so its `chunk_accuracy` lines up with the causal students': their
    chunk count when they all share one, else None (no per-chunk figure for the teacher)."""
    counts = {
        training_chunks(latent_frames, cfg) for cfg in (read_student_json(f)[0] for _, f in students) if cfg.spec.causal
    }
    return counts.pop() if len(counts) == 1 else None


def eval_student(name: str, folder: Path, teacher, recipe: Recipe, ctx: dict) -> tuple[dict, _Run]:
    saved_cfg, _ = read_student_json(folder)
    base = teacher.transformer_for(float(teacher.num_train_timesteps))
    student = Student.from_pretrained(folder, base_transformer=base)
    if not student.is_lora:  # LoRA shares the teacher's module; copies run in the teacher's dtype too
        student.to(dtype=base.dtype)
    student.eval()
    try:
        sampler, info = student_sampler(student, teacher.cfg.shift, teacher.cfg.num_inference_steps, ctx["shape"][1])
        negative = ctx["negative"] if student.cfg.guidance_scale != 1 else None
        chunks = training_chunks(ctx["shape"][1], student.cfg) if student.cfg.spec.causal else None
        run = run_model(
            name,
            sampler,
            teacher,
            ctx["batches"],
            ctx["shape"],
            negative,
            ctx["grader"],
            ctx["num_previews"],
            recipe.eval.decode_batch_size,
            recipe.eval.student_timing_seconds,
            num_chunks=chunks,
        )
        entry = {
            "nfe": info["nfe"],
            "causal": saved_cfg.spec.causal,
            "kind": saved_cfg.kind,
            "weights": folder.name,
            "steps": info["steps"],
            "guidance_scale": info["guidance_scale"],
            **_timing(run, ctx["grader"]),
        }
        if entry["causal"]:
            entry["long_rollout"] = long_rollout(student, teacher, recipe, ctx["rows"], ctx["grader"])
            if recipe.eval.interactive_prompts and ctx["grader"] == "toyworld":
                from distill.eval_interactive import InteractiveEval

                graded = InteractiveEval(student, teacher, recipe, ctx["vocab"], ctx["rows"])
                entry["switch"], entry["continuation"] = graded.switches(), graded.continuation()
    finally:
        if student.is_lora and student.shares_teacher:  # give the teacher its module back, adapters removed
            base.delete_adapters(student.adapter_names)
        del student
        if teacher.device.type == "cuda":
            torch.cuda.empty_cache()
    return entry, run


# ---- the stage --------------------------------------------------------------------------------
def grading_context(recipe: Recipe, teacher, rows: list[dict], vocab: Vocabulary, grader: str | None) -> dict:
    """What `eval_student` needs besides the student: the prompt rows in batches, the latent shape, the negative
    prompt, the grader and the number of previews."""
    tcfg, cfg = teacher.cfg, recipe.eval
    negative = tcfg.negative_prompt if tcfg.negative_prompt is not None else vocab.negative_prompt
    return {
        "batches": [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)],
        "shape": teacher.latent_shape(tcfg.num_frames, tcfg.height, tcfg.width),
        "negative": negative,
        "grader": grader,
        "num_previews": min(cfg.num_previews, len(rows)),
        "vocab": vocab,
        "n": len(rows),
        "rows": rows,
    }


def evaluate(recipe: Recipe) -> dict:
    """Grade and time the teacher and every finished student; write `<output_dir>/eval/`. Returns report.json's dict."""
    accelerator = make_accelerator()
    if not accelerator.is_main_process:
        return {}
    cfg = recipe.eval
    rows = eval_prompts(recipe)
    vocab = load_vocabulary(resolve_path(recipe.data.vocabulary))
    grader = choose_grader(recipe, vocab)
    students = find_students(recipe)
    logger.info(
        "eval: %d prompts (seed %d), teacher + %d student(s): %s",
        len(rows),
        cfg.seed,
        len(students),
        ", ".join(n for n, _ in students) or "none",
    )
    teacher = WanTeacher.from_config(recipe.teacher, accelerator.device)
    tcfg = teacher.cfg
    ctx = grading_context(recipe, teacher, rows, vocab, grader)
    negative, num_previews = ctx["negative"], ctx["num_previews"]

    # 1. the teacher, before any LoRA student borrows its transformer
    nfe = teacher_nfe(teacher)
    uses_cfg = nfe > tcfg.num_inference_steps
    runs = {
        "teacher": run_model(
            "teacher",
            lambda cond, noise, _rows: teacher.sample(cond, noise).latents,
            teacher,
            ctx["batches"],
            ctx["shape"],
            negative if uses_cfg else None,
            grader,
            num_previews,
            cfg.decode_batch_size,
            num_chunks=teacher_chunks(students, ctx["shape"][1]),
        )
    }
    report = {
        "num_prompts": len(rows),
        "seed": cfg.seed,
        "prompt_mode": cfg.prompt_mode,
        "vocabulary": vocab.name,
        "grader": grader,
        "device": str(teacher.device),
        "train_overlap": train_overlap(recipe, rows),
        "num_previews": num_previews,
        "teacher": {
            "nfe": nfe,
            "steps": tcfg.num_inference_steps,
            "guidance_scale": tcfg.guidance_scale,
            "shift": tcfg.shift,
            **_timing(runs["teacher"], grader),
        },
        "students": {},
    }
    # 2. every student, on the same prompts and noise
    for name, folder in tqdm(students, desc="eval students", unit="student", disable=not students):
        entry, runs[name] = eval_student(name, folder, teacher, recipe, ctx)
        entry["speedup"] = report["teacher"]["seconds_per_video"] / entry["seconds_per_video"]
        entry["sampling_speedup"] = report["teacher"]["sample_seconds_per_video"] / entry["sample_seconds_per_video"]
        report["students"][name] = entry
    # 3. files
    previews = {m: r.previews for m, r in runs.items()}
    rep.write_outputs(recipe.out, report, rows, previews, fps=recipe.data.fps, preview_size=recipe.eval.preview_size)
    logger.info("eval: %s\n%s", recipe.out / "eval", rep.summary_table(report))
    return report
