"""Presentation of an eval: markdown tables, matplotlib plots, mp4/GIF previews (DESIGN.md §1, `eval` stage).

Everything here is pure: it takes the report dict (see `distill/eval.py`) or uint8 videos [F, H, W, 3]
and writes files; nothing loads a model. Plots use matplotlib's object API on an Agg canvas, so no
global backend is touched and no display is needed.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from synth_data.composer import write_prompts
from synth_data.dataset import encode_video

GAP = 2
"""Pixels of grey between tiles of a preview grid."""
GAP_VALUE = 96


# ---- tables --------------------------------------------------------------------------------------
def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def attribute_keys(report: dict) -> list[str]:
    """The accuracy keys of the report ("all" first), or [] when nothing was graded."""
    acc = report["teacher"]["accuracy"]
    return [] if acc is None else ["all", *(k for k in acc if k != "all")]


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (written out: two lines do not justify scipy)."""
    centre, denom = accuracy + z * z / (2 * n), 1 + z * z / n
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


def summary_table(report: dict) -> str:
    """The markdown table: model, NFE, all-attribute accuracy with its 95% interval over the prompts, per-attribute
    accuracy, s/video, speedup."""
    keys = attribute_keys(report)
    ci = ["acc all 95% CI"] if keys else []
    chunked = any(e.get("chunk_accuracy") for e in [report["teacher"], *report["students"].values()])
    head = [
        "model",
        "NFE",
        *(f"acc {k}" for k in keys[:1]),
        *ci,
        *(["acc per chunk"] if chunked else []),
        *(f"acc {k}" for k in keys[1:]),
        "s/video",
        "speedup",
        "sampling speedup",
    ]
    rows = [["teacher", report["teacher"], 1.0, 1.0]]
    rows += [[name, s, s["speedup"], s["sampling_speedup"]] for name, s in report["students"].items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, entry, speedup, sampling in rows:
        acc = entry["accuracy"]
        interval = (
            []
            if not keys
            else ["n/a" if acc is None else "{:.2f}–{:.2f}".format(*wilson_interval(acc["all"], report["num_prompts"]))]
        )
        values = [_fmt(None if acc is None else acc[k], ".3f") for k in keys]
        per_chunk = [] if not chunked else [" / ".join(f"{a:.3f}" for a in entry.get("chunk_accuracy") or []) or "n/a"]
        cells = [
            name,
            str(entry["nfe"]),
            *values[:1],
            *interval,
            *per_chunk,
            *values[1:],
            _fmt(entry["seconds_per_video"], ".4g"),
            f"{speedup:.2f}x",
            f"{sampling:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict, files: dict[str, str], previews: dict[str, dict[str, str]]) -> str:
    """report.md: settings, the summary table, links to the plots and previews.

    files: plot name -> file name (`accuracy`, `drift`, `first_frames`, `compare`), only those written;
    previews: model -> {"mp4": file, "gif": file}.
    """
    grader, overlap = report["grader"], report["train_overlap"]
    lines = [
        "# Eval report",
        "",
        f"{report['num_prompts']} fresh prompts from vocabulary `{report['vocabulary']}` (eval.seed={report['seed']}, "
        f"mode={report['prompt_mode']}); teacher and students share each prompt's noise. "
        + (
            "No training prompts.jsonl was found to compare with."
            if overlap is None
            else f"{overlap:.0%} of their slot combinations also occur in the training prompts (the noise never does)."
        ),
        "",
        f"Grader: {'the toy-world oracle (fraction of videos with the slot read back right)' if grader else 'none'}"
        + ("" if grader else " — this vocabulary has no oracle, so accuracy is n/a; timings are real."),
        f"Timing: sampling + VAE decode per video on `{report['device']}`, after one warm-up batch (students' "
        "sampling: the mean of their timing passes); "
        "speedup = teacher s/video ÷ student s/video, measured in this run; sampling speedup = the same for the "
        "sampler alone (noise to latents), without the VAE decode both share.",
        "",
        summary_table(report),
        "",
    ]
    if "accuracy" in files:
        lines += ["## Accuracy per attribute", "", f"![per-attribute accuracy]({files['accuracy']})", ""]
    if "drift" in files:
        lines += ["## Long-rollout drift", "", f"![drift]({files['drift']})", ""]
    lines += interactive_tables(report)
    if previews:
        lines += ["## Previews", "", f"The first {report['num_previews']} prompts, same noise for every model.", ""]
        if "first_frames" in files:
            lines += [f"![first frames]({files['first_frames']})", ""]
        if "compare" in files:
            lines += [f"All models side by side (rows in table order): [{files['compare']}]({files['compare']})", ""]
        lines += ["| model | mp4 | gif |", "|---|---|---|"]
        lines += [f"| {m} | [{p['mp4']}]({p['mp4']}) | ![{m}]({p['gif']}) |" for m, p in previews.items()]
        lines.append("")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------
def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_accuracy(accuracy: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Grouped bars: one group per attribute ("all" first), one bar per model."""
    models = list(accuracy)
    keys = ["all", *(k for k in accuracy[models[0]] if k != "all")]
    fig = Figure(figsize=(max(6.0, 1.2 * len(keys) * max(1, len(models)) / 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    x = np.arange(len(keys))
    for j, model in enumerate(models):
        values = [accuracy[model][k] for k in keys]
        bars = ax.bar(x + (j - (len(models) - 1) / 2) * width, values, width, label=model)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, keys)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("oracle accuracy")
    ax.set_title("Per-attribute accuracy")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, Path(path))


def interactive_tables(report: dict) -> list[str]:
    """Markdown tables of the causal students' prompt-switch and continuation figures (`distill.eval_interactive`)."""
    rows = {n: s for n, s in report["students"].items() if s.get("switch")}
    if not rows:
        return []
    first = next(iter(rows.values()))["switch"]
    lines = [
        "## Prompt switches and continuation",
        "",
        f"Streams of {first['chunks']} chunks switched at chunk {first['switch_chunk']} ({first['num_prompts']} "
        "prompts). One slot changed: the changed slot reads the new value in the second chunk after the switch "
        "(`within 2`), and unchanged slots keep theirs (`kept`). All slots changed: all-attribute accuracy from the "
        "third chunk after the switch on, against a fresh stream of the new prompt on the same chunks. Continuation: "
        "rendered ground-truth clips continued for the long-rollout length, all-attribute accuracy of the clip's "
        "slots.",
        "",
        "| student | cache | 1 slot: within 2 | 1 slot: kept | all slots: after | fresh | continuation |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in rows.items():
        sw, cont = s["switch"], s.get("continuation") or {}
        for mode in [m for m in sw if m == "keep_cache" or m.startswith("recache")]:
            one, every = sw[mode]["one_slot"], sw[mode]["all_slots"]
            lines.append(
                f"| {name} | {mode} | {one['changed_within_2']:.3f} | {one['unchanged_kept']:.3f} | "
                f"{every['after_accuracy']:.3f} | {sw['fresh_accuracy']:.3f} | "
                + (f"{cont['accuracy']:.3f}" if "accuracy" in cont else "n/a")
                + " |"
            )
    return [*lines, ""]


def plot_drift(curves: dict[str, dict], path: str | Path) -> Path:
    """All-attribute accuracy per time segment of long rollouts: model -> {"segment_accuracy": [...], ...}."""
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for model, curve in curves.items():
        acc = curve["segment_accuracy"]
        ax.plot(np.arange(1, len(acc) + 1), acc, marker="o", label=model)
    ax.set_xlabel("segment (training-length window of the rollout)")
    ax.set_ylabel("all-attribute accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Long-rollout drift")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_first_frames(frames: dict[str, list[np.ndarray]], prompts: list[str], path: str | Path) -> Path:
    """Grid of first frames [H, W, 3]: one row per model, one column per prompt (titled with the prompt)."""
    models = list(frames)
    cols = len(prompts)
    fig = Figure(figsize=(2.2 * cols + 0.8, 2.3 * len(models) + 0.6), layout="constrained")
    axes = fig.subplots(len(models), cols, squeeze=False)
    for r, model in enumerate(models):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(frames[model][c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(prompts[c], 28)[:3]), fontsize=6)
            if c == 0:
                ax.set_ylabel(model, fontsize=8)
    return _save(fig, Path(path))


# ---- previews ------------------------------------------------------------------------------------
def upscale_factor(height: int, width: int, min_side: int) -> int:
    """The smallest integer factor that brings the shorter side to at least `min_side` pixels (>= 1)."""
    return max(1, math.ceil(min_side / min(height, width)))


def upscale_nearest(video: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [..., H, W, 3] -> [..., H·factor, W·factor, 3] by pixel repetition, then edge-padded to even H, W
    (yuv420p needs even dimensions)."""
    out = video.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else video
    pad_h, pad_w = out.shape[-3] % 2, out.shape[-2] % 2
    if pad_h or pad_w:
        widths = [(0, 0)] * (out.ndim - 3) + [(0, pad_h), (0, pad_w), (0, 0)]
        out = np.pad(out, widths, mode="edge")
    return out


def tile(videos: list[list[np.ndarray]]) -> np.ndarray:
    """Rows of uint8 videos [F, H, W, 3] (all one shape) -> one [F, H', W', 3] grid with grey gaps (even H', W'
    for even H, W)."""
    f, h, w, _ = videos[0][0].shape
    rows, cols = len(videos), max(len(r) for r in videos)
    grid = np.full((f, rows * h + (rows - 1) * GAP, cols * w + (cols - 1) * GAP, 3), GAP_VALUE, dtype=np.uint8)
    for r, row in enumerate(videos):
        for c, video in enumerate(row):
            if video.shape != (f, h, w, 3):
                raise ValueError(f"tile: video [{r}][{c}] has shape {video.shape}, expected {(f, h, w, 3)}")
            y, x = r * (h + GAP), c * (w + GAP)
            grid[:, y : y + h, x : x + w] = video
    return upscale_nearest(grid, 1)


def write_mp4(path: str | Path, video: np.ndarray, fps: int) -> Path:
    """uint8 [F, H, W, 3] (even H, W) -> H.264 mp4 (libx264, yuv420p, bit-exact: same frames, same bytes)."""
    Path(path).write_bytes(encode_video(video, fps))
    return Path(path)


def write_gif(path: str | Path, video: np.ndarray, fps: int) -> Path:
    """uint8 [F, H, W, 3] -> looping GIF (PIL; each frame quantised to its own 256-colour palette)."""
    images = [Image.fromarray(frame) for frame in video]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)), loop=0)
    return Path(path)


def write_outputs(
    out: Path, report: dict, rows: list[dict], previews: dict[str, list[np.ndarray]], *, fps: int, preview_size: int
) -> Path:
    """Write the eval's files (report.json, report.md, plots, previews at `fps`, upscaled to `preview_size` px, the
    prompts) to `out/eval.tmp/`, then swap it in as `out/eval/`."""
    final, tmp = out / "eval", out / "eval.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_prompts(rows, tmp / "prompts.jsonl")
    files: dict[str, str] = {}
    if report["grader"] is not None:
        accuracy = {"teacher": report["teacher"]["accuracy"]}
        accuracy.update({n: s["accuracy"] for n, s in report["students"].items()})
        files["accuracy"] = plot_accuracy(accuracy, tmp / "accuracy.png").name
    drift = {n: s["long_rollout"] for n, s in report["students"].items() if s.get("long_rollout")}
    if drift:
        files["drift"] = plot_drift(drift, tmp / "drift.png").name
    preview_files = _write_previews(tmp, previews, rows, fps, preview_size, files) if report["num_previews"] else {}
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "report.md").write_text(markdown_report(report, files, preview_files))
    old = out / "eval.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_previews(
    folder: Path,
    previews: dict[str, list[np.ndarray]],
    rows: list[dict],
    fps: int,
    preview_size: int,
    files: dict[str, str],
) -> dict[str, dict[str, str]]:
    """preview_<model>.mp4/.gif (the preview prompts side by side), compare.mp4 (one row per model) and
    first_frames.png; returns model -> {"mp4", "gif"} file names."""
    first = next(iter(previews.values()))[0]
    factor = upscale_factor(first.shape[1], first.shape[2], preview_size)
    big = {m: [upscale_nearest(v, factor) for v in vids] for m, vids in previews.items()}
    out = {}
    for model, videos in tqdm(big.items(), desc="eval previews", unit="model", leave=False):
        grid = tile([videos])
        stem = "preview_teacher" if model == "teacher" else f"preview_student_{model}"
        write_mp4(folder / f"{stem}.mp4", grid, fps)
        write_gif(folder / f"{stem}.gif", grid, fps)
        out[model] = {"mp4": f"{stem}.mp4", "gif": f"{stem}.gif"}
    files["compare"] = write_mp4(folder / "compare.mp4", tile(list(big.values())), fps).name
    prompts = [r["prompt"] for r in rows[: len(previews["teacher"])]]
    files["first_frames"] = plot_first_frames(
        {m: [v[0] for v in vids] for m, vids in previews.items()}, prompts, folder / "first_frames.png"
    ).name
    return out
