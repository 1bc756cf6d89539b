"""The eval stage end to end on a tiny random WanPipeline with the toy world's vocabulary (CPU, fp32).

Students: a pruned 4-step student, a LoRA student whose adapters are zero and which samples exactly like the
teacher (so it must score exactly the teacher's accuracy), a perturbed 2-step LoRA student (a second LoRA on
the same shared base), and an unfinished run without COMPLETE that must be ignored.
"""

from __future__ import annotations

import io
import json
import shutil

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.recipe_loader import PROJECT_ROOT, RecipeError
from distill import report as rep
from distill.cli import main
from distill.config import load_recipe
from distill.eval import eval_prompts, evaluate

TOY_VOCAB = str(PROJECT_ROOT / "synth_data/vocab/toyworld.yaml")
WAN_VOCAB = str(PROJECT_ROOT / "synth_data/vocab/wan.yaml")
SLOT_KEYS = {"all", "subject", "clothing", "props", "action", "background"}
N, SEED, FRAMES, SIZE, STEPS, CFG = 8, 7, 9, 32, 4, 3.0


def write_recipe(path, out, pipe_dir, vocab=TOY_VOCAB, **eval_kw):
    recipe = {
        "output_dir": str(out),
        "data": {"vocabulary": vocab, "num_prompts": 8, "seed": 0},
        "teacher": {
            "pretrained": str(pipe_dir),
            "dtype": "float32",
            "height": SIZE,
            "width": SIZE,
            "num_frames": FRAMES,
            "num_inference_steps": STEPS,
            "guidance_scale": CFG,
            "shift": 3.0,
            "max_sequence_length": 32,
        },
        "eval": {"num_prompts": N, "seed": SEED, "batch_size": 4, "num_previews": 2, **eval_kw},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def save_student(out, cfg_kw, base, perturb=False, complete=True):
    from students.config import StudentConfig
    from students.student import build_student

    cfg = StudentConfig(**cfg_kw)
    student = build_student(cfg, base)
    if perturb:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in student.trainable_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    final = out / "students" / cfg.name / "final"
    student.save_pretrained(final)
    if complete:
        (final / "COMPLETE").write_text("done\n")
    if student.is_lora:
        base.delete_adapters(student.adapter_names)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    from core.vocabulary import load_vocabulary
    from teachers.tiny import tiny_pipeline, words_of

    root = tmp_path_factory.mktemp("eval")
    vocab = load_vocabulary(TOY_VOCAB)
    words = words_of([v for vals in vocab.slots.values() for v in vals] + vocab.templates + [vocab.negative_prompt])
    pipe_dir = root / "pipeline"
    tiny_pipeline(words).save_pretrained(pipe_dir)
    out = root / "out"
    base = WanTransformer3DModel.from_pretrained(pipe_dir / "transformer")
    save_student(out, dict(name="pruned4", kind="pruned", keep_blocks=[0], denoising_steps=[1000, 750, 500, 250]), base)
    save_student(
        out, dict(name="as_teacher", kind="lora", lora_rank=2, num_inference_steps=STEPS, guidance_scale=CFG), base
    )
    save_student(out, dict(name="lora2", kind="lora", lora_rank=2, denoising_steps=[1000, 500]), base, perturb=True)
    save_student(out, dict(name="unfinished", kind="pruned", keep_blocks=[1]), base, complete=False)
    recipe_path = write_recipe(root / "recipe.yaml", out, pipe_dir)
    assert main(["eval", str(recipe_path)]) == 0  # through the frozen CLI
    first = root / "first_eval"
    shutil.copytree(out / "eval", first)
    return {
        "root": root,
        "out": out,
        "pipe_dir": pipe_dir,
        "recipe": recipe_path,
        "first": first,
        "report": json.loads((first / "report.json").read_text()),
    }


def test_report_schema(setup):
    report = setup["report"]
    assert report["num_prompts"] == N and report["seed"] == SEED and report["grader"] == "toyworld"
    assert set(report) >= {"num_prompts", "seed", "teacher", "students"}
    teacher = report["teacher"]
    assert teacher["nfe"] == STEPS * 2  # CFG on
    assert set(teacher["accuracy"]) == SLOT_KEYS
    assert isinstance(teacher["seconds_per_video"], float) and teacher["seconds_per_video"] > 0
    assert set(report["students"]) == {"pruned4", "as_teacher", "lora2"}  # `unfinished` has no COMPLETE
    nfe = {"pruned4": 4, "as_teacher": STEPS * 2, "lora2": 2}
    for name, s in report["students"].items():
        assert s["nfe"] == nfe[name] and isinstance(s["nfe"], int)
        assert s["causal"] is False and "long_rollout" not in s
        assert set(s["accuracy"]) == SLOT_KEYS
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in s["accuracy"].values())
        assert isinstance(s["speedup"], float) and s["speedup"] > 0
        assert s["speedup"] == pytest.approx(teacher["seconds_per_video"] / s["seconds_per_video"])
        assert s["sampling_speedup"] == pytest.approx(
            teacher["sample_seconds_per_video"] / s["sample_seconds_per_video"]
        )
        assert s["seconds_per_video"] == pytest.approx(s["sample_seconds_per_video"] + s["decode_seconds_per_video"])
    assert report["students"]["lora2"]["weights"] == "final"
    assert report["train_overlap"] is None  # no prompts.jsonl in this output_dir


def test_random_teacher_is_near_chance(setup):
    acc = setup["report"]["teacher"]["accuracy"]
    for slot in SLOT_KEYS - {"all"}:
        assert acc[slot] < 0.6, (slot, acc)
    assert acc["all"] <= min(acc[s] for s in SLOT_KEYS - {"all"})


def test_same_prompts_and_noise_for_teacher_and_students(setup):
    """The zero-LoRA student samples with the teacher's Euler steps, CFG and noise: same videos, same scores."""
    report, first = setup["report"], setup["first"]
    assert report["students"]["as_teacher"]["accuracy"] == report["teacher"]["accuracy"]
    teacher, twin, other = (
        decode(first / f).astype(int)
        for f in ("preview_teacher.mp4", "preview_student_as_teacher.mp4", "preview_student_lora2.mp4")
    )
    assert np.abs(teacher - twin).mean() < 1  # lossy mp4: compare means
    assert np.abs(teacher - other).mean() > 5  # a different model draws other videos


def decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_files_are_written_and_decodable(setup):
    first = setup["first"]
    for name in ("report.md", "accuracy.png", "first_frames.png", "compare.mp4", "prompts.jsonl"):
        assert (first / name).stat().st_size > 0, name
    assert not (first / "drift.png").exists()  # no causal student
    for png in ("accuracy.png", "first_frames.png"):
        with Image.open(first / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    for model in ("teacher", "student_pruned4", "student_as_teacher", "student_lora2"):
        video = decode(first / f"preview_{model}.mp4")
        # 2 previews side by side, 32 px upscaled 4x to 128 px, a 2-px grey gap
        assert video.shape == (FRAMES, 128, 2 * 128 + rep.GAP, 3)
        assert np.abs(video[:, :, 128:130].astype(int) - rep.GAP_VALUE).mean() < 8  # lossy chroma
        with Image.open(first / f"preview_{model}.gif") as gif:
            assert gif.n_frames >= 1 and gif.size == (2 * 128 + rep.GAP, 128)
    assert decode(first / "compare.mp4").shape == (FRAMES, 4 * 128 + 3 * rep.GAP, 2 * 128 + rep.GAP, 3)
    md = (first / "report.md").read_text()
    for needle in (
        "| teacher | 8 |",
        "| pruned4 | 4 |",
        "| lora2 | 2 |",
        "](accuracy.png)",
        "(preview_teacher.mp4)",
        "(preview_student_lora2.gif)",
        "(first_frames.png)",
        "acc subject",
        "acc all 95% CI",
    ):
        assert needle in md, needle
    rows = [json.loads(line) for line in (first / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in eval_prompts(load_recipe(setup["recipe"]))]


def test_rerun_is_identical_and_other_seed_changes_prompts(setup):
    report = evaluate(load_recipe(setup["recipe"]))
    first, again = setup["report"], report
    assert again["teacher"]["accuracy"] == first["teacher"]["accuracy"]
    for name in first["students"]:
        assert again["students"][name]["accuracy"] == first["students"][name]["accuracy"]
    # GIF bytes are a deterministic function of the frames; libx264 mp4 bytes are not always (see distill/report.py)
    for f in ("prompts.jsonl", "preview_teacher.gif", "preview_student_pruned4.gif", "preview_student_lora2.gif"):
        assert (setup["out"] / "eval" / f).read_bytes() == (setup["first"] / f).read_bytes(), f
    assert not (setup["out"] / "eval.tmp").exists() and not (setup["out"] / "eval.old").exists()
    base = [r["prompt"] for r in eval_prompts(load_recipe(setup["recipe"]))]
    other = [r["prompt"] for r in eval_prompts(load_recipe(setup["recipe"], [f"eval.seed={SEED + 1}"]))]
    assert other != base and len(other) == len(base) == N
    assert eval_prompts(load_recipe(setup["recipe"], ["eval.num_prompts=4"]))[0]["seed"] != 0
    with pytest.raises(RecipeError, match="eval.seed: equals data.seed"):
        eval_prompts(load_recipe(setup["recipe"], ["eval.seed=0"]))


def test_vocabulary_without_oracle_reports_null_accuracy(setup, tmp_path):
    path = write_recipe(
        tmp_path / "wan.yaml",
        tmp_path / "out",
        setup["pipe_dir"],
        vocab=WAN_VOCAB,
        num_prompts=2,
        batch_size=2,
        num_previews=1,
    )
    report = evaluate(load_recipe(path))
    assert report["grader"] is None and report["teacher"]["accuracy"] is None and report["students"] == {}
    assert report["teacher"]["seconds_per_video"] > 0
    assert "n/a" in (tmp_path / "out/eval/report.md").read_text()
    assert not (tmp_path / "out/eval/accuracy.png").exists()
    with pytest.raises(RecipeError, match="eval.grader"):
        evaluate(load_recipe(path, ["eval.grader=toyworld"]))


def test_eval_config_errors_name_the_key(setup):
    with pytest.raises(RecipeError, match="eval.num_previews: must be >= 0"):
        load_recipe(setup["recipe"], ["eval.num_previews=-1"])
    with pytest.raises(RecipeError, match="eval.prompt_mode"):
        load_recipe(setup["recipe"], ["eval.prompt_mode=fancy"])
    with pytest.raises(FileNotFoundError, match="eval.students: 'unfinished'"):
        evaluate(load_recipe(setup["recipe"], ["eval.students=[unfinished]"]))


def test_find_students_prefers_ema(setup, tmp_path):
    from distill.eval import find_students

    for folder in ("a/final", "a/final_ema", "b/final", "c/final_ema"):
        (tmp_path / "students" / folder).mkdir(parents=True)
    (tmp_path / "students/a/final/COMPLETE").touch()
    (tmp_path / "students/c/final_ema/COMPLETE").touch()  # the marker lives in final/ only
    recipe = load_recipe(setup["recipe"], [f"output_dir={tmp_path}"])
    assert find_students(recipe) == [("a", tmp_path / "students/a/final_ema")]
    recipe = load_recipe(setup["recipe"], [f"output_dir={tmp_path}", "eval.use_ema=false"])
    assert find_students(recipe) == [("a", tmp_path / "students/a/final")]


def test_long_rollout_hook_writes_drift_plot(setup, tmp_path):
    from distill.report import write_outputs

    recipe = load_recipe(setup["recipe"], [f"output_dir={tmp_path}"])
    acc = dict.fromkeys(SLOT_KEYS, 0.5)
    timing = {"seconds_per_video": 1.0, "accuracy": acc}
    report = {
        "num_prompts": 2,
        "seed": SEED,
        "prompt_mode": "balanced",
        "vocabulary": "toyworld",
        "grader": "toyworld",
        "device": "cpu",
        "train_overlap": 0.5,
        "num_previews": 1,
        "teacher": {"nfe": 8, **timing},
        "students": {
            "causal4": {
                "nfe": 4,
                "causal": True,
                "speedup": 2.0,
                "sampling_speedup": 3.0,
                **timing,
                "long_rollout": {"num_frames": 90, "segment_accuracy": [0.9, 0.6, 0.3]},
            }
        },
    }
    video = np.random.default_rng(0).integers(0, 255, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    rows = eval_prompts(recipe)[:2]
    previews = {"teacher": [video], "causal4": [video]}
    folder = write_outputs(
        recipe.out, report, rows, previews, fps=recipe.data.fps, preview_size=recipe.eval.preview_size
    )
    md = (folder / "report.md").read_text()
    assert "](drift.png)" in md and "50% of their slot combinations" in md and "| causal4 | 4 |" in md
    with Image.open(folder / "drift.png") as im:
        assert im.size[0] > 100
    assert json.loads((folder / "report.json").read_text()) == report


def test_drift_plot_and_helpers(tmp_path):
    path = rep.plot_drift({"causal": {"num_frames": 90, "segment_accuracy": [0.9, 0.7, 0.4]}}, tmp_path / "d.png")
    with Image.open(path) as im:
        assert im.size[0] > 100
    video = np.arange(3 * 5 * 7 * 3, dtype=np.uint8).reshape(3, 5, 7, 3)
    big = rep.upscale_nearest(video, 3)
    assert big.shape == (3, 16, 22, 3)  # 15x21 padded to even
    assert (big[:, 3:6, 6:9] == video[:, 1:2, 2:3]).all() and (big[:, 15] == big[:, 14]).all()
    assert rep.upscale_factor(32, 32, 128) == 4 and rep.upscale_factor(480, 832, 128) == 1
    mp4 = rep.write_mp4(tmp_path / "v.mp4", big, fps=8)
    assert decode(mp4).shape == big.shape
    with io.BytesIO(rep.write_gif(tmp_path / "v.gif", big, fps=8).read_bytes()) as f, Image.open(f) as gif:
        assert gif.size == (22, 16)


def test_warm_up_batch_is_not_timed(monkeypatch):
    from types import SimpleNamespace

    import distill.eval
    from distill.eval import run_model

    calls, clock = [], [0.0]  # a clock only the sampler moves: the figures below hold on a loaded machine too
    monkeypatch.setattr(distill.eval, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def sampler(cond, noise, rows):
        clock[0] += 0.3 if not calls else 0.01  # a slow first call (compilation, caches) must not count
        calls.append(len(rows))
        return noise

    teacher = SimpleNamespace(
        device=torch.device("cpu"),
        encode=lambda prompts, negative: None,
        decode=lambda latents: latents,
        to_uint8=lambda v: np.zeros((len(v), 2, 4, 4, 3), np.uint8),
    )
    rows = [{"prompt": "p", "seed": i, "slots": {}} for i in range(5)]
    run = run_model("fake", sampler, teacher, [rows[:2], rows[2:4], rows[4:]], (1, 1, 1, 1), None, None, 3)
    # every batch once; the first is the warm-up (graded and previewed, not timed)
    assert calls == [2, 2, 1] and run.timed_videos == 3
    assert 0.02 <= run.sample_seconds < 0.25 and len(run.previews) == 3
    decoded = []
    teacher.decode = lambda latents: decoded.append(len(latents)) or latents
    run = run_model("fake", sampler, teacher, [rows[:3], rows[3:]], (1, 1, 1, 1), None, None, 5, decode_batch=2)
    assert decoded == [2, 1, 2] and len(run.previews) == 5  # eval.decode_batch_size videos per call
    # a single batch: the warm-up run, then the same batch again for the clock
    calls.clear()
    run = run_model("fake", sampler, teacher, [rows], (1, 1, 1, 1), None, None, 5)
    assert calls == [5, 5] and run.timed_videos == 5 and run.sample_seconds < 0.25 and len(run.previews) == 5
    # timing passes: the sampler re-runs the timed batches only (no decode); the time is the mean over passes
    calls.clear()
    decoded.clear()
    run = run_model(
        "fake",
        sampler,
        teacher,
        [rows[:2], rows[2:4], rows[4:]],
        (1, 1, 1, 1),
        None,
        None,
        0,
        decode_batch=2,
        timing_seconds=0.05,
    )  # a pass takes 0.02 s here: 3 passes reach 0.05 s
    assert calls == [2, 2, 1, 2, 1, 2, 1] and decoded == [2, 2, 1]
    assert run.timed_videos == 3 and run.sampled_videos == 9
    from distill.eval import _timing

    timing = _timing(run, None)
    assert timing["timing_passes"] == 3
    assert abs(timing["sample_seconds_per_video"] - run.sample_seconds / 9) < 1e-12
    assert timing["seconds_per_video"] == timing["sample_seconds_per_video"] + timing["decode_seconds_per_video"]
    calls.clear()
    run = run_model("fake", sampler, teacher, [rows[:2], rows[2:]], (1, 1, 1, 1), None, None, 0, timing_seconds=60)
    assert run.sampled_videos == 10 * run.timed_videos  # capped at MAX_TIMING_PASSES


def test_causal_student_samples_chunk_by_chunk_and_reports_drift(setup, tmp_path, monkeypatch):
    """An untrained causal student: sampled by `sample_causal` (training length, then 3x for the drift curve)."""
    from diffusers import WanTransformer3DModel

    import students.sampling as sampling_module

    out = tmp_path / "out"
    base = WanTransformer3DModel.from_pretrained(setup["pipe_dir"] / "transformer")
    save_student(out, dict(name="causal3", kind="causal", frames_per_block=1, denoising_steps=[1000, 500]), base)
    calls, real = [], sampling_module.sample_causal

    def spy(model, embeds, noise, sigmas, generator=None, exit_steps=None):
        calls.append((tuple(noise.shape), [round(s, 4) for s in sigmas], exit_steps))
        return real(model, embeds, noise, sigmas, generator, exit_steps)

    monkeypatch.setattr(sampling_module, "sample_causal", spy)  # the name student_sampler calls
    path = write_recipe(
        tmp_path / "causal.yaml",
        out,
        setup["pipe_dir"],
        num_prompts=4,
        batch_size=4,
        num_previews=1,
        long_rollout_factor=3,
    )
    report = evaluate(load_recipe(path))
    entry = report["students"]["causal3"]
    # 2 steps + a cache write for 2 of the 3 one-frame chunks (none after the last)
    assert (entry["causal"], entry["kind"], entry["steps"], entry["nfe"]) == (True, "causal", 2, 2.667)
    assert set(entry["accuracy"]) == SLOT_KEYS
    latent = (4, 3, 4, 4)  # 9 frames of 32 px through the tiny VAE (4x in time, 8x in space)
    sigmas = [1.0, 0.75]  # [1000, 500] warped through shift 3
    # one batch (warm-up, then again for the clock, then more timing passes until eval.student_timing_seconds) at
    # the training length, then the long rollout: 3 x 3 latent frames, 1 chunk each
    passes = entry["timing_passes"]
    assert 2 <= passes <= 10 and report["teacher"]["timing_passes"] == 1
    assert calls == [((4, *latent), sigmas, None)] * (1 + passes) + [((4, 4, 9, 4, 4), sigmas, None)]
    drift = entry["long_rollout"]
    assert (drift["length_factor"], drift["num_frames"], drift["num_prompts"]) == (3, 9, 4)
    assert len(drift["segment_accuracy"]) == 3 and all(0 <= a <= 1 for a in drift["segment_accuracy"])
    per_slot = drift["segment_slot_accuracy"]
    assert set(per_slot) == SLOT_KEYS - {"all"} and all(len(v) == 3 for v in per_slot.values())
    # a segment is all-right only if every slot is, so no slot's accuracy can fall below the all-slot accuracy
    assert all(min(v[k] for v in per_slot.values()) >= drift["segment_accuracy"][k] for k in range(3))
    assert (out / "eval" / "drift.png").stat().st_size > 0 and "](drift.png)" in (out / "eval/report.md").read_text()


def test_wilson_interval_matches_known_values():
    from distill.report import wilson_interval

    # 0.7 of 128: the Wilson 95% interval (z = 1.96) is 0.616–0.773; 1.0 of 48 is 0.926–1.0 (not a zero width)
    lo, hi = wilson_interval(0.7, 128)
    assert abs(lo - 0.6157) < 1e-3 and abs(hi - 0.7726) < 1e-3
    lo, hi = wilson_interval(1.0, 48)
    assert abs(lo - 0.9259) < 1e-3 and abs(hi - 1.0) < 1e-12
    assert wilson_interval(0.0, 10)[0] == 0.0


def test_chunk_accuracy_grades_each_chunk_weighted_by_batch():
    """Videos whose first chunk (3 of 9 frames) shows another subject: that chunk is wrong, the rest right. Two
    batches of 2 and 3 videos, the first two corrupted: chunk 0 scores 3/5 (a per-batch mean would give 1/2)."""
    from types import SimpleNamespace

    from distill.eval import _timing, run_model
    from teachers.toyworld import render_video

    slots = {"subject": "triangle", "clothing": "blue", "props": "ring", "action": "moving right", "background": "teal"}
    other = {**slots, "subject": "square"}
    videos = []
    for i in range(5):
        clip = render_video(slots, 9, seed=i)
        if i < 2:
            clip[:3] = render_video(other, 9, seed=i)[:3]
        videos.append(clip)
    rows = [{"prompt": "p", "seed": i, "slots": slots} for i in range(5)]
    teacher = SimpleNamespace(
        device=torch.device("cpu"),
        encode=lambda prompts, negative: None,
        decode=lambda latents: latents,
        to_uint8=lambda idx: np.stack([videos[int(i)] for i in idx]),
    )

    def sampler(cond, noise, rows):
        return torch.tensor([r["seed"] for r in rows])

    batches = [rows[:2], rows[2:]]
    run = run_model("fake", sampler, teacher, batches, (1, 1, 1, 1), None, "toyworld", 0, num_chunks=3)
    timing = _timing(run, "toyworld")
    assert timing["chunk_accuracy"] == pytest.approx([3 / 5, 1.0, 1.0])
    assert timing["accuracy"]["all"] == pytest.approx(1.0)  # 6 of 9 frames still read as the triangle
    plain = _timing(run_model("fake", sampler, teacher, batches, (1, 1, 1, 1), None, "toyworld", 0), "toyworld")
    assert plain["chunk_accuracy"] is None and plain["accuracy"] == timing["accuracy"]


def test_causal_student_and_teacher_report_chunk_accuracy(setup, tmp_path):
    """A causal student of 1-frame chunks over 3 latent frames: 3 chunk figures, and the teacher graded in the same 3
    segments; bidirectional students have none. The table shows them."""
    from diffusers import WanTransformer3DModel

    out = tmp_path / "out"
    base = WanTransformer3DModel.from_pretrained(setup["pipe_dir"] / "transformer")
    save_student(out, dict(name="causal3", kind="causal", frames_per_block=1, denoising_steps=[1000, 500]), base)
    save_student(out, dict(name="pruned4", kind="pruned", keep_blocks=[0], denoising_steps=[1000, 750, 500, 250]), base)
    path = write_recipe(
        tmp_path / "causal.yaml",
        out,
        setup["pipe_dir"],
        num_prompts=4,
        batch_size=4,
        num_previews=0,
        long_rollout_factor=2,
        long_rollout_prompts=1,
        student_timing_seconds=0,
    )
    report = evaluate(load_recipe(path))
    causal, pruned = report["students"]["causal3"], report["students"]["pruned4"]
    assert len(causal["chunk_accuracy"]) == 3 and len(report["teacher"]["chunk_accuracy"]) == 3
    assert all(0 <= a <= 1 for a in causal["chunk_accuracy"]) and pruned["chunk_accuracy"] is None
    table = rep.summary_table(report)
    assert "acc per chunk" in table
    assert " / ".join(f"{a:.3f}" for a in causal["chunk_accuracy"]) in table


def test_switch_and_continuation_sections_for_causal_students(setup, tmp_path):
    """eval.interactive_prompts: a causal student gets `switch` (KV re-cache and old cache) and `continuation`
    sections, and report.md a table of them; the prompt pairs change one slot, or every slot."""
    from diffusers import WanTransformer3DModel

    from core.vocabulary import load_vocabulary
    from distill.eval_interactive import all_slot_partner, one_slot_switch
    from teachers.toyworld.render import SLOTS

    vocab = load_vocabulary(TOY_VOCAB)
    rows = [{"slots": dict(zip(SLOTS, vals))} for vals in zip(*(vocab.slots[s][:3] for s in SLOTS))]
    for i, r in enumerate(rows):
        slot, new = one_slot_switch(vocab, r["slots"], i)
        assert slot == SLOTS[i % 5] and [s for s in SLOTS if new[s] != r["slots"][s]] == [slot]
        partner = all_slot_partner(rows, i)
        assert partner is not None and all(partner["slots"][s] != r["slots"][s] for s in SLOTS)

    out = tmp_path / "out"
    base = WanTransformer3DModel.from_pretrained(setup["pipe_dir"] / "transformer")
    save_student(out, dict(name="causal1", kind="causal", frames_per_block=1, denoising_steps=[1000, 500]), base)
    path = write_recipe(
        tmp_path / "r.yaml",
        out,
        setup["pipe_dir"],
        num_prompts=4,
        num_previews=0,
        long_rollout_factor=3,
        interactive_prompts=4,
        student_timing_seconds=0,
    )
    entry = evaluate(load_recipe(path))["students"]["causal1"]
    sw, cont = entry["switch"], entry["continuation"]
    assert (sw["chunks"], sw["switch_chunk"], sw["num_prompts"]) == (9, 3, 4)
    for mode in ("recache", "keep_cache"):
        one = sw[mode]["one_slot"]
        assert len(one["changed_per_chunk"]) == 6 and one["changed_within_2"] == one["changed_per_chunk"][1]
        assert 0 <= one["unchanged_kept"] <= 1 and 0 <= sw[mode]["all_slots"]["after_accuracy"] <= 1
    assert 0 <= sw["fresh_accuracy"] <= 1
    assert (cont["length_factor"], cont["num_prompts"], len(cont["segment_accuracy"])) == (3, 4, 3)
    assert cont["accuracy"] == pytest.approx(sum(cont["segment_accuracy"]) / 3)
    text = (out / "eval" / "report.md").read_text()
    assert "## Prompt switches and continuation" in text and "| causal1 | keep_cache |" in text


def test_interactive_metrics_of_a_perfect_stream_are_one_and_of_a_stuck_stream_zero(setup, tmp_path, monkeypatch):
    """The grading itself, with the streams replaced by ground truth rendered by the toy world: a stream that follows
    every switch at once scores 1 everywhere; one that ignores switches scores 0 on what changed and still keeps the
    unchanged slots; a perfect continuation scores 1."""
    from diffusers import WanTransformer3DModel

    from core.vocabulary import load_vocabulary
    from distill.eval import eval_prompts
    from distill.eval_interactive import InteractiveEval, _prompt, all_slot_partner, one_slot_switch
    from students.config import StudentConfig
    from students.student import build_student
    from teachers.toyworld.render import render_video
    from teachers.wan import WanTeacher

    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            tmp_path / "out",
            setup["pipe_dir"],
            interactive_prompts=6,
            long_rollout_factor=3,
            num_prompts=6,
        )
    )
    vocab = load_vocabulary(TOY_VOCAB)
    rows = eval_prompts(recipe)
    slots_of = {r["prompt"]: r["slots"] for r in rows}
    for i, r in enumerate(rows):
        slots_of[_prompt(vocab, one_slot_switch(vocab, r["slots"], i)[1])] = one_slot_switch(vocab, r["slots"], i)[1]
    pairs = sum(all_slot_partner(rows, i) is not None for i in range(len(rows)))
    assert pairs >= 3
    teacher = WanTeacher.from_config(recipe.teacher)
    base = WanTransformer3DModel.from_pretrained(setup["pipe_dir"] / "transformer")
    student = build_student(StudentConfig(name="c", kind="causal", frames_per_block=1, denoising_steps=[1000]), base)
    graded = InteractiveEval(student, teacher, recipe, vocab, rows)
    follow = True

    def fake_stream(rows_, prompts_a, prompts_b, chunks, switch_at, recache, prefix=None, keep=None, noise_t=None):
        videos = []
        for i, a in enumerate(prompts_a):
            parts = []
            for c in range(chunks):
                now = prompts_b[i] if (follow and switch_at is not None and c >= switch_at) else a
                parts.append(render_video(slots_of[now], 4, 32, 32, seed=i, start_frame=4 * c))
            videos.append(np.concatenate(parts))
        return np.stack(videos)

    real_stream, given = graded._stream, []
    with torch.no_grad():  # the real stream drops the prefix's own frames: only the chunks generated come back
        prefix = teacher.encode_video(torch.zeros(1, 3, 1, 32, 32))
        video = real_stream(rows[:1], [rows[0]["prompt"]], None, 2, None, True, prefix=prefix)
    assert video.shape[1] == 2 * teacher.pipe.vae_scale_factor_temporal == 8  # 2 latent frames after the first

    def spy(rows_, prompts_a, prompts_b, chunks, switch_at, recache, prefix=None, keep=None, noise_t=None):
        given.append(None if prefix is None else prefix.shape[2])
        return fake_stream(rows_, prompts_a, prompts_b, chunks, switch_at, recache, prefix, keep, noise_t)

    monkeypatch.setattr(graded, "_stream", spy)
    sw, cont = graded.switches(), graded.continuation()
    for mode in ("recache", "keep_cache"):
        one, every = sw[mode]["one_slot"], sw[mode]["all_slots"]
        assert one["changed_within_2"] == 1.0 and one["changed_per_chunk"] == [1.0] * 6
        assert one["unchanged_kept"] == 1.0 and every == {"num_pairs": pairs, "after_accuracy": 1.0}
    assert sw["fresh_accuracy"] == 1.0
    assert cont["segment_accuracy"] == [1.0, 1.0, 1.0] and cont["accuracy"] == 1.0
    assert cont["given_chunks"] == graded.k and given[-1] == graded.k * graded.fpb  # the whole clip by default
    recipe.eval.switch_keep_chunks, recipe.eval.switch_context_noise = 1, 300  # a third mode
    sw = graded.switches()
    assert sw["recache_last1_t300"]["one_slot"]["changed_within_2"] == 1.0 and set(sw) >= {"recache", "keep_cache"}
    from distill.report import interactive_tables

    table = "\n".join(interactive_tables({"students": {"c": {"switch": sw, "continuation": cont}}}))
    assert "| c | recache_last1_t300 |" in table
    recipe.eval.continuation_chunks = 1  # the first chunk only: the toy world's image-to-video
    assert graded.continuation()["given_chunks"] == 1 and given[-1] == graded.fpb
    follow = False  # a stream stuck on its first prompt
    sw = graded.switches()
    one, every = sw["recache"]["one_slot"], sw["recache"]["all_slots"]
    assert one["changed_within_2"] == 0.0 and one["unchanged_kept"] == 1.0 and every["after_accuracy"] == 0.0
