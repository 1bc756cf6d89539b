"""The `stream` stage: a causal student streams one long video into an mp4 as it is generated.

    python -m distill stream recipes/toyworld_self_forcing.yaml stream.prompt="a red circle moving left" \
        stream.num_chunks=40 'stream.switches=[[8, "a blue square moving right"]]'

Each chunk is encoded as soon as it is decoded, into a fragmented mp4 (`<output>.part`, playable while it grows);
the finished file is renamed into place, so `<output>` only ever holds a whole stream.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from distill.checkpoints import check_finished, is_finished, weights_dir
from distill.config import Recipe
from students.streaming import load_causal_student, stream_video
from teachers.wan import WanTeacher

logger = logging.getLogger(__name__)


class Mp4Writer:
    """uint8 frames [f, H, W, 3] appended chunk by chunk to a fragmented H.264 mp4 (PyAV, yuv420p; odd sizes are
    edge-padded to even, as yuv420p needs)."""

    def __init__(self, path: Path, fps: int):
        import av  # the stream stage's only PyAV use

        self.container = av.open(str(path), mode="w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"})
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "18"}
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        import av

        f, h, w, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self.frames == 0:
            self.stream.height, self.stream.width = frames.shape[1:3]
        for frame in frames:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self.container.mux(packet)
        self.frames += f

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def resolve_student(recipe: Recipe) -> tuple[Path, str]:
    """(folder, name) of the causal student to stream: `stream.student`, else the recipe's finished run."""
    sc = recipe.stream
    if sc.student is not None:
        folder = Path(sc.student)
        if not folder.is_dir():
            raise FileNotFoundError(f"stream.student: {folder}: no such folder (a saved causal student's final/)")
        return folder, folder.name
    if recipe.student is None:
        raise ValueError(f"{recipe.source}: streaming needs a student recipe or stream.student (a saved student)")
    if not is_finished(recipe.student_dir()):
        raise FileNotFoundError(
            f"{recipe.student_dir()}: no finished training run; run `python -m distill train {recipe.source}`"
        )
    check_finished(recipe)
    return weights_dir(recipe.student_dir(), recipe.export.use_ema), recipe.student.name


def stream_stage(recipe: Recipe) -> Path:
    """Stream `recipe.stream` with the recipe's causal student (or `stream.student`) into its mp4; returns it."""
    sc = recipe.stream
    if not sc.prompt:
        raise ValueError(
            'stream.prompt: not set; e.g. `python -m distill stream RECIPE.yaml stream.prompt="a red cat"`'
        )
    folder, name = resolve_student(recipe)
    if sc.continue_from is not None and not Path(sc.continue_from).is_file():
        raise FileNotFoundError(f"stream.continue_from: {sc.continue_from}: no such video or image file")
    out = Path(sc.output) if sc.output else recipe.out / "streams" / f"{name}_seed{sc.seed}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    teacher = WanTeacher.from_config(recipe.teacher)
    student = load_causal_student(teacher, folder)
    part = out.with_name(out.name + ".part")
    writer = Mp4Writer(part, recipe.data.fps)
    t0, first = time.perf_counter(), None
    try:
        chunks = stream_video(
            teacher,
            student,
            sc.prompt,
            sc.num_chunks,
            sc.seed,
            switches=[(int(c), str(p)) for c, p in sc.switches],
            recache=sc.recache,
            continue_from=sc.continue_from,
            keep_chunks=sc.switch_keep_chunks,
            context_noise=sc.switch_context_noise,
        )
        for frames in tqdm(chunks, total=sc.num_chunks, desc=f"stream {name}", unit="chunk"):
            first = first if first is not None else time.perf_counter() - t0
            writer.write(frames)
    finally:
        writer.close()
    os.replace(part, out)
    seconds = time.perf_counter() - t0
    logger.info(
        "stream: %d frames in %.1f s (%.1f frames/s, first chunk after %.2f s) -> %s",
        writer.frames,
        seconds,
        writer.frames / seconds,
        first or 0.0,
        out,
    )
    return out
