"""End-to-end smoke runs of the benchmark scripts at tiny size (slow: `make test-slow`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_experts_benchmark_tiny(tmp_path):
    from benchmarks.results import HEADER
    from teachers.toyworld.build import main as build

    build([str(tmp_path / "init")])  # untrained toy teacher, whatever the repo ships
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.experts",
            "--teacher",
            str(tmp_path / "init"),
            "--steps",
            "2",
            "--prompts",
            "4",
            "--eval-prompts",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--results",
            str(tmp_path / "RESULTS.md"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON line on stdout
    report = json.loads(lines[0])

    assert report["benchmark"] == "experts"
    assert report["train_steps"] == 2 and report["eval_prompts"] == 4
    assert report["teacher"]["trained"] is None and report["teacher"]["path"] == str(tmp_path / "init")
    assert set(report["teacher"]["accuracy"]) >= {"all", "subject", "clothing", "props", "action", "background"}
    assert set(report["results"]) == {"1", "2", "4"}
    params = {}
    for n, entry in report["results"].items():
        assert set(entry) == {"fidelity_mse", "accuracy", "trainable_params", "jump_mse_per_sigma"}
        assert len(entry["jump_mse_per_sigma"]) == len(report["state_sigmas"]) == 4
        assert math.isfinite(entry["fidelity_mse"]) and entry["fidelity_mse"] > 0
        assert 0.0 <= entry["accuracy"]["all"] <= 1.0
        params[n] = entry["trainable_params"]
    # N LoRA experts of the same rank hold exactly N times the parameters of one
    assert params["2"] == 2 * params["1"] and params["4"] == 4 * params["1"] > 0
    mse = {n: e["fidelity_mse"] for n, e in report["results"].items()}
    assert report["ratio_mse_2_vs_1"] == pytest.approx(mse["2"] / mse["1"], rel=1e-12)
    assert report["ratio_mse_4_vs_1"] == pytest.approx(mse["4"] / mse["1"], rel=1e-12)
    assert report["expert_of_sigma"] == {"1": [0, 0, 0, 0], "2": [0, 0, 1, 1], "4": [0, 1, 2, 3]}
    # each student is trained for its own folder, with its own expert layout
    for n, bounds in report["boundaries"].items():
        meta = json.loads((tmp_path / "out" / "students" / f"experts{n}" / "final" / "student.json").read_text())
        assert meta["config"]["experts"] == int(n) and meta["config"]["expert_boundaries"] == bounds
    assert json.loads((tmp_path / "out" / "students" / "experts4" / "final" / "COMPLETE").read_text())["step"] == 2
    table = (tmp_path / "RESULTS.md").read_text()
    assert table.startswith(HEADER) and table.count("\n") == HEADER.count("\n") + 1  # header + one row
    row = table.splitlines()[-1]
    assert "python -m benchmarks.experts" in row and "ratio_mse_4_vs_1" in row and "torch " in row


# ---- streaming.py and train_step.py ------------------------------------------------------------------------------
def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_json_line(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON line on stdout
    return json.loads(lines[0])


def assert_one_row(path: Path, script: str, ratio_key: str) -> None:
    from benchmarks.results import HEADER

    table = path.read_text()
    assert table.startswith(HEADER) and table.count("\n") == HEADER.count("\n") + 1  # header + one row
    row = table.splitlines()[-1]
    assert f"python -m benchmarks.{script}" in row and ratio_key in row


@pytest.mark.slow
def test_streaming_benchmark_tiny(tmp_path):
    r = one_json_line(
        run_script(
            "-m",
            "benchmarks.streaming",
            "--size",
            "tiny",
            "--chunks",
            "5",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--profile",
            "--results",
            str(tmp_path / "RESULTS.md"),
        )
    )
    assert r["benchmark"] == "streaming" and r["size"] == "tiny" and r["device"] == "cpu"
    assert r["trained"] in (True, False) and r["teacher_steps"] == r["steps"] == 2 and len(r["sigmas"]) == 2
    # recipes/toyworld_self_forcing.yaml's causal settings; the toy VAE decodes one pixel frame per latent frame
    assert (r["frames_per_block"], r["local_window"], r["sink"], r["window_chunks"]) == (3, 9, 0, 3)
    assert r["latent_shape"] == [3, 15, 32, 32] and r["pixel_frames"] == 15
    lat = r["chunk_latency_s"]
    assert len(lat) == 5 and all(x > 0 for x in lat)
    assert r["first_chunk_latency_s"] == pytest.approx(lat[0], rel=1e-3)
    assert r["student_seconds"] == pytest.approx(sum(lat), rel=1e-3)  # the rollout is its chunks back to back
    assert r["chunk_latency_first_quarter_s"] == pytest.approx(lat[0], rel=1e-3)  # 5 chunks: quarters of one
    assert r["chunk_latency_last_quarter_s"] == pytest.approx(lat[-1], rel=1e-3)
    assert r["student_fps"] == pytest.approx(15 / r["student_seconds"], rel=1e-4)
    assert r["teacher_fps"] == pytest.approx(15 / r["teacher_seconds"], rel=1e-4)
    assert r["teacher_seconds"] == pytest.approx(r["teacher_sample_s"] + r["teacher_decode_s"], rel=1e-4)
    for key, value in [
        ("ratio_fps_student_vs_teacher", r["student_fps"] / r["teacher_fps"]),
        ("ratio_chunk_latency_last_vs_first_quarter", lat[-1] / lat[0]),
        ("ratio_first_chunk_latency_vs_teacher_seconds", lat[0] / r["teacher_seconds"]),
    ]:
        assert math.isfinite(r[key]) and r[key] > 0 and r[key] == pytest.approx(value, rel=2e-3), key
    split = r["split_mean_s"]
    assert set(split) == {"denoise", "cache_write", "decode", "other"}
    assert min(split["denoise"], split["cache_write"], split["decode"]) > 0
    assert sum(split.values()) == pytest.approx(sum(lat) / 5, rel=2e-3)
    assert sum(r["split_share"].values()) == pytest.approx(1.0, abs=2e-3)
    # 2 denoising forwards per chunk and one cache write: denoising takes longer than the write
    assert split["denoise"] > split["cache_write"]
    shares = r["profile_share"]
    assert set(shares) == {"self_attn", "cross_attn", "ffn", "vae_decode", "other"}
    assert all(0 < shares[k] < 1 for k in ("self_attn", "cross_attn", "ffn", "vae_decode"))
    assert sum(shares.values()) == pytest.approx(1.0, abs=2e-3)
    assert_one_row(tmp_path / "RESULTS.md", "streaming", "ratio_fps_student_vs_teacher")


@pytest.mark.slow
def test_train_step_benchmark_tiny(tmp_path):
    r = one_json_line(
        run_script(
            "-m",
            "benchmarks.train_step",
            "--size",
            "tiny",
            "--batch-size",
            "1",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--results",
            str(tmp_path / "RESULTS.md"),
        )
    )
    assert r["benchmark"] == "train_step" and r["device"] == "cpu" and r["memory"] == "peak RSS (ru_maxrss)"
    assert r["latent_shape"] == [3, 9, 32, 32] and r["chunks"] == 3 and r["batch_size"] == 1 and r["ema"] is True
    on, off = r["checkpointing_on/adamw"], r["checkpointing_off/adamw"]
    for v in (on, off):
        assert v["status"] == "ok" and len(v["step_seconds"]) == 2
        assert v["s_per_it"] == pytest.approx(sum(v["step_seconds"]) / 2, rel=1e-3)
        assert v["peak_mem_mib"] > v["step_mem_mib"] > 0 and all(math.isfinite(x) for x in v["losses"].values())
        # the student and the full critic are both trainable copies of the teacher's transformer
        assert v["student_trainable_params"] == v["critic_trainable_params"] > 0
    # checkpointing recomputes the same forwards: the same losses after a step's updates
    for key in ("loss/dmd", "loss/critic"):
        assert on["losses"][key] == pytest.approx(off["losses"][key], rel=1e-4)
    for key in ("checkpointing_on/adamw8bit", "checkpointing_off/adamw8bit"):
        assert r[key]["status"] == "unavailable" and "bitsandbytes" in r[key]["reason"]
    assert r["ratio_time_checkpointing_on_vs_off"] == pytest.approx(on["s_per_it"] / off["s_per_it"], rel=1e-4)
    assert r["ratio_step_mem_checkpointing_on_vs_off"] == pytest.approx(
        on["step_mem_mib"] / off["step_mem_mib"], rel=1e-4
    )
    assert r["ratio_peak_mem_checkpointing_on_vs_off"] == pytest.approx(
        on["peak_mem_mib"] / off["peak_mem_mib"], rel=1e-4
    )
    assert r["ratio_time_adamw8bit_vs_adamw"] is None and r["ratio_peak_mem_adamw8bit_vs_adamw"] is None
    assert_one_row(tmp_path / "RESULTS.md", "train_step", "ratio_time_checkpointing_on_vs_off")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["streaming", "train_step"])
def test_1_3b_size_on_cpu_exits_with_a_clear_message(tmp_path, script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --size 1.3b would run")
    proc = run_script("-m", f"benchmarks.{script}", "--size", "1.3b", "--results", str(tmp_path / "RESULTS.md"))
    assert proc.returncode != 0 and proc.stdout.strip() == ""
    assert "--size 1.3b needs a CUDA GPU" in proc.stderr and "--tiny-shape" in proc.stderr
    assert not (tmp_path / "RESULTS.md").exists()


@pytest.mark.slow
def test_1_3b_code_path_runs_at_tiny_shape_on_cpu(tmp_path):
    """The Wan2.1 1.3B path (config-built transformer in bf16, Wan VAE, random text, the Wan recipe) shrunk."""
    s = one_json_line(
        run_script(
            "-m",
            "benchmarks.streaming",
            "--size",
            "1.3b",
            "--tiny-shape",
            "--chunks",
            "3",
            "--warmup",
            "0",
            "--results",
            str(tmp_path / "RESULTS.md"),
        )
    )
    assert s["dtype"] == "bfloat16" and (s["frames_per_block"], s["local_window"], s["sink"]) == (3, 21, 3)
    assert s["latent_shape"] == [16, 9, 8, 8] and s["pixel_frames"] == 1 + 4 * 8  # Wan VAE: 4x temporal
    assert math.isfinite(s["ratio_fps_student_vs_teacher"]) and "1.3B config (tiny shape)" in s["teacher"]
    t = one_json_line(
        run_script(
            "-m",
            "benchmarks.train_step",
            "--size",
            "1.3b",
            "--tiny-shape",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--checkpointing",
            "on",
            "--optimizer",
            "adamw",
            "--results",
            str(tmp_path / "RESULTS.md"),
        )
    )
    assert t["mixed_precision"] == "bf16" and t["latent_shape"] == [16, 21, 8, 8] and t["chunks"] == 7
    assert t["checkpointing_on/adamw"]["status"] == "ok" and "checkpointing_off/adamw" not in t
    assert t["ratio_time_checkpointing_on_vs_off"] is None
    from benchmarks.results import HEADER

    assert (tmp_path / "RESULTS.md").read_text().count("\n") == HEADER.count("\n") + 2  # one row per script


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four benchmarks in subprocesses: the run's own limit (900 s) applies, not the suite's
def test_gpu_all_script_runs_at_tiny_size(tmp_path):
    """The one-call GPU script, checked on the CPU: every benchmark in it prints its JSON line, OUT gets the rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_all.sh", "--size", "tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in (tmp_path / "gpu_all.jsonl").read_text().splitlines()]
    assert [(r["benchmark"], r["size"]) for r in lines] == [
        ("streaming", "tiny"),
        ("attention_mask", "tiny"),
        ("train_step", "tiny"),
        ("streaming", "tiny"),
    ]
    assert "profile_share" in lines[0] and lines[3]["compile"] == "ffn"
    assert lines[1]["tiny"]["attention"]["max_abs_diff"] < 1e-5  # flex with the block mask = SDPA with the dense one
    rows = [ln for ln in (tmp_path / "RESULTS.md").read_text().splitlines() if ln.startswith("| 20")]
    assert len(rows) == 4
    bad = subprocess.run(
        ["bash", "benchmarks/gpu_all.sh", "--size", "2b"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--size must be tiny or 1.3b" in bad.stdout


def test_ablate_summary_means_and_spreads_by_hand(tmp_path, capsys):
    """Two arms of seed results: mean and sample standard deviation per figure, the difference to the baseline."""
    from benchmarks.ablate import main as ablate

    def result(arm, seed, acc, chunks, curve):
        (tmp_path / arm).mkdir(exist_ok=True)
        (tmp_path / arm / f"seed{seed}.json").write_text(
            json.dumps(
                {
                    "arm": arm,
                    "seed": seed,
                    "overrides": [] if arm == "base" else ["k=v"],
                    "prompts": 8,
                    "eval_seed": 3,
                    "accuracy": {"all": acc, "props": 1.0 - acc / 4},
                    "chunk_accuracy": chunks,
                    "long_rollout": {"segment_accuracy": curve},
                    "teacher": {"accuracy": {"all": 0.9}, "chunk_accuracy": [0.8, 0.9]},
                }
            )
        )

    result("base", 0, 0.5, [0.25, 0.5], [0.5, 0.25, 0.125])
    result("base", 1, 0.75, [0.5, 0.5], [0.75, 0.5, 0.375])
    for seed, acc in enumerate([0.5, 0.625, 0.875]):
        result("other", seed, acc, [acc, acc], [acc, acc])
    (tmp_path / "runs").mkdir()  # training folders are not arms
    ablate(["summary", "--out", str(tmp_path), "--baseline", "base"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_arm = {r["arm"]: r for r in lines}
    assert set(by_arm) == {"base", "other"}
    base, other = by_arm["base"], by_arm["other"]
    assert base["all"]["mean"] == 0.625 and base["all"]["sd"] == round(math.sqrt(2 * 0.125**2), 4)
    assert base["chunk_0"]["mean"] == 0.375 and base["chunk_1"]["sd"] == 0.0
    assert base["drift_first"]["values"] == [0.5, 0.75] and base["drift_last"]["values"] == [0.125, 0.375]
    assert base["slots"] == {
        "props": {"mean": 0.8438, "sd": round(math.sqrt(2 * 0.03125**2), 4), "n": 2, "values": [0.875, 0.8125]}
    }
    mean = (0.5 + 0.625 + 0.875) / 3
    sd = math.sqrt(sum((a - mean) ** 2 for a in (0.5, 0.625, 0.875)) / 2)
    assert other["all"]["mean"] == round(mean, 4) and other["all"]["sd"] == round(sd, 4)
    assert other["ratio"]["delta_all_vs_baseline"] == round(round(mean, 4) - 0.625, 4)
    with pytest.raises(SystemExit):
        ablate(["summary", "--out", str(tmp_path), "--baseline", "nope"])


def test_ablate_summary_of_bidirectional_students(tmp_path, capsys):
    """A LoRA or pruned student has no chunks and no long rollout (null in its seed files): the summary gives its
    mean and spread, and its table has no chunk or drift columns."""
    from benchmarks.ablate import main as ablate

    (tmp_path / "lora").mkdir()
    for seed, acc in enumerate([0.5, 0.75]):
        row = {"arm": "lora", "seed": seed, "overrides": ["k=v"], "prompts": 8, "eval_seed": 3}
        row |= {"accuracy": {"all": acc}, "chunk_accuracy": None, "long_rollout": None, "weights": "final"}
        row["teacher"] = {"accuracy": {"all": 0.9}, "chunk_accuracy": [0.8, 0.9]}
        (tmp_path / "lora" / f"seed{seed}.json").write_text(json.dumps(row))
    ablate(["summary", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    (line,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert line["all"]["mean"] == 0.625 and line["all"]["values"] == [0.5, 0.75]
    assert not [k for k in line if k.startswith(("chunk_", "drift_"))]
    table = [x for x in out.splitlines() if x.startswith("|")]
    assert table[0] == "| arm | seeds | all | overrides |"
    assert table[2] == "| teacher |  | 0.900 |  |" and table[3].startswith("| lora | 0,1 | 0.625 ± 0.177 | k=v")


def test_ablate_checkpoint_at_the_last_step_grades_as_the_finished_run(tmp_path):
    """`checkpoint --step <max_steps>` rebuilds the EMA weights from checkpoint-<max_steps>/ (EMAModel.copy_to) and
    grades them exactly as `run` graded final_ema; an earlier step is graded on the same prompts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    recipe, out = "recipes/toyworld_self_forcing_long.yaml", str(tmp_path / "abl")
    overrides = ["student.init=null", "train.max_steps=2", "train.checkpointing_steps=1", "train.batch_size=2"]
    common = ["--arm", "a", "--seeds", "0", "--out", out, "--prompts", "4", *overrides, "eval.long_rollout_prompts=2"]
    for command in (
        ["run", recipe],
        ["checkpoint", recipe, "--step", "2"],
        ["checkpoint", recipe, "--step", "1"],
        ["errors", recipe, "--refine", "1.0,0.5,0.06"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.ablate", *command, *common],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    finished, last, first = (
        json.loads((tmp_path / "abl" / arm / "seed0.json").read_text()) for arm in ("a", "a@2", "a@1")
    )
    for key in ("accuracy", "chunk_accuracy", "long_rollout"):
        assert last[key] == finished[key]
    assert first["step"] == 1 and first["teacher"] == finished["teacher"]
    # `errors` reads the same videos again: its right reads per slot are the accuracies `run` graded
    for name, graded in (("a/errors_seed0.json", finished), ("teacher_errors_4_777.json", finished["teacher"])):
        table = json.loads((tmp_path / "abl" / name).read_text())
        for slot, acc in graded["accuracy"].items():
            if slot != "all":
                assert table[slot]["right"] / 4 == acc, (name, slot)
                assert table[slot]["right"] + sum(table[slot]["wrong"].values()) == 4
    # --refine: the teacher takes over at its first level at or below σ_r (its 50-step schedule at shift 3, by hand)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(50)
    sigmas = scheduler.sigmas.tolist()
    refined = json.loads((tmp_path / "abl" / "a" / "errors_seed0.json").read_text())["refined"]
    half = next(k for k, s in enumerate(sigmas) if s <= 0.5)
    assert (refined["1.0"]["step"], refined["1.0"]["sigma"]) == (0, 1.0)
    assert (refined["0.5"]["step"], refined["0.5"]["sigma"]) == (half, round(sigmas[half], 4))
    assert refined["0.5"]["subject"]["right"] + sum(refined["0.5"]["subject"]["wrong"].values()) == 4
    # from the teacher's last level (σ < 0.01) one Euler step barely moves the student's samples: the same reads
    student = json.loads((tmp_path / "abl" / "a" / "errors_seed0.json").read_text())
    for slot in ("subject", "clothing", "props", "action", "background"):
        assert {k: refined["0.06"][slot][k] for k in ("right", "wrong")} == {
            k: student[slot][k] for k in ("right", "wrong")
        }, slot
    # `soup`: the mean of two seeds' final EMA weights, tensor by tensor, graded like a seed (seed 1: seed 0's
    # finished run with its weights moved by known noise)
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    runs, weights = tmp_path / "abl" / "runs" / "students", "final_ema/expert_0/diffusion_pytorch_model.safetensors"
    shutil.copytree(runs / "a_s0", runs / "a_s1")
    seeds = [load_file(runs / "a_s0" / weights)]
    seeds.append({k: v + 0.01 * torch.randn_like(v) for k, v in seeds[0].items()})
    save_file(seeds[1], runs / "a_s1" / weights)
    two = [*common[:2], "--seeds", "0,1", *common[4:]]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ablate", "soup", recipe, *two],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    soup = load_file(tmp_path / "abl" / "runs" / "soups" / "a_soup" / weights.removeprefix("final_ema/"))
    assert soup.keys() == seeds[0].keys()
    for k in soup:
        torch.testing.assert_close(soup[k], (seeds[0][k] + seeds[1][k]) / 2, rtol=0, atol=1e-7)
    graded = json.loads((tmp_path / "abl" / "a" / "soup.json").read_text())
    assert graded["soup_of"] == [0, 1] and graded["teacher"] == finished["teacher"]
    assert graded["weights"] == "a_soup"  # the averaged folder was graded, not a seed's own
    assert 0.0 <= graded["accuracy"]["all"] <= 1.0 and len(graded["chunk_accuracy"]) == len(finished["chunk_accuracy"])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ablate", "checkpoint", recipe, "--step", "7", *common],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "checkpoint-7/ema.safetensors: missing" in proc.stderr


def test_read_errors_counts_confusions_and_fit_gaps_by_hand():
    """Rendered clips fit their own templates exactly (IoU 1); a clip whose prompt names another subject is one
    `truth -> read` confusion, and the fit gaps are 1 - the best other template's IoU, averaged over frames."""
    from benchmarks.ablate import read_errors
    from teachers.toyworld import render_video
    from teachers.toyworld.oracle import shape_scores
    from teachers.toyworld.render import PROPS, SUBJECTS

    a = {"subject": "triangle", "clothing": "blue", "props": "ring", "action": "moving right", "background": "teal"}
    b = {"subject": "circle", "clothing": "red", "props": "bar", "action": "moving up", "background": "navy"}
    videos = [render_video(a, 9, seed=1), render_video(b, 9, seed=2)]
    rows = [{"slots": a}, {"slots": {**b, "subject": "square"}}]  # the second video shows a circle
    table = read_errors(videos, rows)
    assert table["subject"]["right"] == 1 and table["subject"]["wrong"] == {"square -> circle": 1}
    for slot in ("clothing", "props", "action", "background"):
        assert table[slot] == {**table[slot], "right": 2, "wrong": {}}
    s_a, s_b = shape_scores(videos[0]), shape_scores(videos[1])
    assert s_a["subject"][SUBJECTS.index("triangle")] == 1.0 and s_b["subject"][SUBJECTS.index("circle")] == 1.0
    gap_a = 1.0 - max(v for k, v in zip(SUBJECTS, s_a["subject"]) if k != "triangle")
    gap_b = 1.0 - max(v for k, v in zip(SUBJECTS, s_b["subject"]) if k != "circle")
    assert table["subject"]["fit_gap"] == {"right": round(gap_a, 4), "wrong": round(gap_b, 4)}
    prop_gaps = [1.0 - max(v for k, v in zip(PROPS, s["props"]) if k != p) for s, p in ((s_a, "ring"), (s_b, "bar"))]
    assert table["props"]["fit_gap"] == {"right": round(sum(prop_gaps) / 2, 4), "wrong": None}


def test_toy_bench_summary_ratios_by_hand():
    from benchmarks.toy_bench import summarise

    report = {
        "num_prompts": 4,
        "seed": 1,
        "teacher": {"accuracy": {"all": 0.8}, "chunk_accuracy": [0.7, 0.9]},
        "students": {
            "causal": {
                "accuracy": {"all": 0.6},
                "nfe": 4.5,
                "chunk_accuracy": [0.5, 0.75],
                "sampling_speedup": 21.234,
                "long_rollout": {"segment_accuracy": [0.5, 0.25, 0.75]},
            },
            "lora": {"accuracy": {"all": 0.8}, "nfe": 4, "chunk_accuracy": None, "sampling_speedup": 9.0},
        },
    }
    out = summarise(report, {"eval": 3.0})
    assert out["ratio_all_causal_vs_teacher"] == 0.75 and out["ratio_all_lora_vs_teacher"] == 1.0
    assert out["students"]["causal"]["drift_first_last"] == [0.5, 0.75]
    assert "drift_first_last" not in out["students"]["lora"] and out["students"]["causal"]["sampling_speedup"] == 21.23
    assert out["stage_seconds"] == {"eval": 3.0} and out["teacher"]["chunk_accuracy"] == [0.7, 0.9]


@pytest.mark.slow
def test_toy_bench_runs_end_to_end_at_a_tiny_budget(tmp_path):
    """The whole bench with 2 training steps per student, 8 clips and 8 eval prompts: every stage runs, the report
    holds all four students and one JSON line is printed and appended to the given RESULTS.md."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.toy_bench",
            "--out",
            str(out),
            "--results",
            str(tmp_path / "R.md"),
            "data.num_prompts=8",
            "train.max_steps=2",
            "train.checkpointing_steps=1",
            "eval.num_prompts=8",
            "eval.long_rollout_prompts=2",
            "eval.long_rollout_factor=2",
            "eval.num_previews=1",
            "eval.student_timing_seconds=0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result["students"]) == {"lora4_dmd", "pruned", "causal_init", "self_forcing"}
    assert result["num_prompts"] == 8 and len(result["students"]["self_forcing"]["chunk_accuracy"]) == 3
    report = json.loads((out / "eval" / "report.json").read_text())
    assert result["ratio_all_pruned_vs_teacher"] == pytest.approx(
        report["students"]["pruned"]["accuracy"]["all"] / report["teacher"]["accuracy"]["all"], abs=1e-4
    )
    assert "make bench-toy" in (tmp_path / "R.md").read_text()


def test_rotary_benchmark_equal_rotations_and_ratios():
    """The complex rotation computes diffusers' strided formula (held in the benchmark as the baseline)."""
    from benchmarks.rotary import main

    result = main(["--repeats", "2", "--no-record"])
    for name in ("toy", "wan21_1.3b_480p_frame"):
        entry = result["rotation"][name]
        assert entry["max_abs_diff"] <= 1e-6, (name, entry)
        assert entry["ratio"] > 0
    assert result["block_causal_forward"]["ratio"] > 0
