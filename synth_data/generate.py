"""The `generate` stage: `<output_dir>/prompts.jsonl` -> teacher samples -> `<output_dir>/dataset/`.

Layout and columns: `synth_data.dataset`. How the work is cut, so that any number of processes and any
number of interruptions give the same bytes:
  1. Sample i's noise is `randn(latent_shape, generator=torch.Generator("cpu").manual_seed(seed_i))`, float32,
     with seed_i = derive_seed(data.seed, i) from prompts.jsonl.
  2. Shards of `data.shard_size` consecutive indices are split across processes (accelerate). Inside a shard,
     batches of `data.batch_size` sit at fixed positions, so a batch's contents (hence its numerics) never
     depend on the process count or on what an earlier run finished.
  3. Each finished sample is written at once as a one-row part file in `dataset/.work/` (atomic: temp file
     in the same folder, then os.replace); a shard is assembled from its parts once all exist. A rerun
     after any crash (SIGKILL included) redoes only unfinished batches.
  4. Rank 0 writes README.md, removes `.work/` and writes COMPLETE last.

`dataset/generation.json` is the fingerprint: the `data` and `teacher` sections minus NOT_FINGERPRINTED,
the resolved negative prompt and the sha256 of prompts.jsonl. Resuming with another fingerprint fails.
`data.batch_size` and `teacher.cfg_batch` are fingerprinted: batched and unbatched forwards differ in the
last bits, and the dataset promises to be exactly reproducible from its recorded config.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from core.files import write_text_atomic
from core.locking import exclusive
from core.recipe_loader import resolve_path, to_dict
from core.seeding import sample_noise
from core.vocabulary import load_vocabulary
from core.wan_lora import lora_digests
from synth_data.composer import format_coverage, read_prompts
from synth_data.config import DataConfig
from synth_data.dataset import (
    DATA_DIR,
    build_features,
    dataset_card,
    decode_video,
    encode_video,
    features_of,
    read_parquet,
    rows_per_row_group,
    shard_checksums,
    shard_name,
    write_parquet,
)
from synth_data.layout import WORK_DIR, is_complete
from teachers.config import TeacherConfig
from teachers.wan import IMAGE_SUFFIXES, WanTeacher

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when the dataset layout changes; part of the fingerprint."""
NOT_FINGERPRINTED = frozenset(
    {
        "data.vocabulary",  # its effect is fingerprinted: prompts.sha256 and teacher.negative_prompt (resolved)
        "data.hub_repo_id",
        "data.hub_private",  # push only
        "data.images",  # its effect is fingerprinted: data.images.sha256 (the files' or the dataset's content)
        "teacher.offload",
        "teacher.encode_cache_size",  # memory placement / caching: same numbers
    }
)


# ---- image-to-video ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One first frame `data.images` offers: an image file, or the first frame of row `row` of a generated dataset."""

    path: Path
    row: int | None = None

    @property
    def name(self) -> str:
        """The `image_file` column: the file's name, or `<dataset folder>#<row>`."""
        return self.path.name if self.row is None else f"{self.path.name}#{self.row}"


def _is_dataset(path: Path) -> bool:
    return (path / "COMPLETE").is_file() and (path / DATA_DIR).is_dir()


def image_items(spec: str) -> list[ImageItem]:
    """What `data.images` names, in order: the sorted image files of a folder, or the rows of a dataset folder made
    by `generate` (its videos' first frames); a clear error when there is none."""
    path = resolve_path(spec)
    if path.is_dir() and _is_dataset(path):
        rows = sum(pq.read_metadata(p).num_rows for p in sorted((path / DATA_DIR).glob("*.parquet")))
        return [ImageItem(path, r) for r in range(rows)]
    files = sorted(p for p in path.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise ValueError(
            f"data.images: {spec} is not a folder with {'/'.join(IMAGE_SUFFIXES)} files or a generated dataset "
            "folder; give the first frames to start from, or remove the key for text-to-video"
        )
    return [ImageItem(p) for p in files]


def images_digest(spec: str) -> dict:
    """The fingerprint of `data.images`' content: each image file's sha256, or a dataset's shard checksums."""
    items = image_items(spec)
    if items[0].row is not None:
        return {"dataset": shard_checksums(items[0].path)}
    return {item.name: hashlib.sha256(item.path.read_bytes()).hexdigest() for item in items}


def _first_frame(item: ImageItem):
    """The PIL image of an item: the file, or the first frame of the dataset row's video."""
    from PIL import Image, UnidentifiedImageError

    if item.row is None:
        try:
            with Image.open(item.path) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"data.images: {item.path} is not a readable image ({e}); fix or remove it") from e
    offset = item.row
    for shard in sorted((item.path / DATA_DIR).glob("*.parquet")):
        rows = pq.read_metadata(shard).num_rows
        if offset < rows:
            stat = shard.stat()
            return Image.fromarray(
                decode_video(_video_column(shard, stat.st_mtime_ns, stat.st_size)[offset].as_py())[0]
            )
        offset -= rows
    raise ValueError(f"data.images: {item.path} has no row {item.row}")


@functools.lru_cache(maxsize=1)
def _video_column(shard: Path, mtime_ns: int, size: int):
    """A source shard's `video` column, read once while consecutive rows are taken from it (keyed by the file's
    mtime and size too, so a rewritten shard is read again)."""
    return pq.read_table(shard, columns=["video"]).column("video")


def load_image(item: ImageItem, teacher) -> tuple[torch.Tensor, bytes]:
    """An item's image resized to the teacher's video size by diffusers' video processor (as its image-to-video
    pipeline does) -> ([1, 3, H, W] in [-1, 1] on 8-bit levels, the PNG bytes of exactly those pixels)."""
    from PIL import Image

    # Quantised to the 8 bits the dataset stores, so the `image` column is exactly the frame the teacher was given.
    rgb = teacher.resize_image(_first_frame(item))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1, buffer.getvalue()


# ---- fingerprint ----------------------------------------------------------------------------------
def fingerprint(data: DataConfig, teacher: TeacherConfig, prompts_path: Path, negative_prompt: str) -> dict:
    """The generation-affecting config as flat dotted keys (JSON-normalised), see the module docstring."""
    sections = {"data": to_dict(data), "teacher": to_dict(teacher)}
    fp = {"format_version": FORMAT_VERSION, "prompts.sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest()}
    for section in ("data", "teacher"):
        for key, value in sections[section].items():
            if f"{section}.{key}" not in NOT_FINGERPRINTED:
                fp[f"{section}.{key}"] = value
    fp["teacher.negative_prompt"] = negative_prompt
    if teacher.lora:
        fp["teacher.lora.sha256"] = lora_digests(teacher.lora, "teacher.lora")
    if data.images:
        fp["data.images.sha256"] = images_digest(data.images)
    return json.loads(json.dumps(dict(sorted(fp.items()))))


_ABSENT = object()


def _show(value) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_fingerprint(dataset_dir: Path, fp: dict) -> None:
    """Raise ValueError naming the changed keys when `dataset_dir` holds samples generated with another fingerprint
    (a generation.json with no sample rendered under it yet is dropped)."""
    path = dataset_dir / "generation.json"
    if not path.is_file():
        if any(dataset_dir.rglob("*.parquet")):
            raise ValueError(
                f"{dataset_dir}: has parquet files but no generation.json, so they can't be checked against this "
                "config; use another output_dir or delete it"
            )
        return
    if not any(dataset_dir.rglob("*.parquet")):
        # nothing was rendered under the old config (e.g. a typo failed before the first sample): it binds nothing,
        # and the corrected run writes its own generation.json
        path.unlink(missing_ok=True)
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    changed = [
        f"{k}: {_show(old.get(k, _ABSENT))} -> {_show(fp.get(k, _ABSENT))}"
        for k in sorted(set(old) | set(fp))
        if old.get(k, _ABSENT) != fp.get(k, _ABSENT)
    ]
    if changed:
        raise ValueError(
            f"{dataset_dir} was generated with another config ({'; '.join(changed)}); "
            "use another output_dir or delete it"
        )


# ---- the stage ------------------------------------------------------------------------------------
@dataclass
class _Job:
    data: DataConfig
    teacher: TeacherConfig
    out: Path
    dataset_dir: Path
    rows: list[dict]
    slot_names: list[str]
    negative_prompt: str
    vocab_name: str
    num_shards: int
    images: list[ImageItem]
    """`data.images`' first frames, in order (empty: text-to-video)."""

    def shard_path(self, shard: int) -> Path:
        return self.dataset_dir / shard_name(shard, self.num_shards)

    def shard_rows(self, shard: int) -> list[dict]:
        size = self.data.shard_size
        return self.rows[shard * size : (shard + 1) * size]

    def part_path(self, index: int) -> Path:
        return self.dataset_dir / WORK_DIR / f"part-{index:09d}.parquet"


def generate(data: DataConfig, teacher: TeacherConfig, out: Path, accelerator: Accelerator) -> Path:
    """Render every prompt of `out/prompts.jsonl` (written by `compose_stage`) with the teacher into `out/dataset/`.

    Resumes an interrupted run (byte-identical result); returns at once when the folder is complete.
    Raises ValueError when the folder was generated with another config (see `fingerprint`).
    """
    accelerator.wait_for_everyone()  # `compose` writes prompts.jsonl on rank 0 only
    with exclusive(Path(out) / ".generate.lock", "`generate`", accelerator.is_main_process):
        return _generate(data, teacher, Path(out), accelerator)


def _generate(data: DataConfig, teacher: TeacherConfig, out: Path, accelerator: Accelerator) -> Path:
    job, fp = _prepare(data, teacher, Path(out))
    check_fingerprint(job.dataset_dir, fp)
    if is_complete(job.dataset_dir):
        logger.info("generate: %s is complete, nothing to do", job.dataset_dir)
        return job.dataset_dir
    pending = [s for s in range(job.num_shards) if not job.shard_path(s).is_file()]
    accelerator.wait_for_everyone()  # everyone listed `pending` before anyone writes
    if accelerator.is_main_process:
        for stray in job.dataset_dir.rglob(".*.tmp"):  # temp files of a killed run
            stray.unlink()
        if not (job.dataset_dir / "generation.json").is_file():
            write_text_atomic(job.dataset_dir / "generation.json", json.dumps(fp, indent=2) + "\n")
    accelerator.wait_for_everyone()
    with accelerator.split_between_processes(pending) as mine:
        logger.info(
            "generate: process %d of %d renders shards %s", accelerator.process_index, accelerator.num_processes, mine
        )
        if mine:
            _render_shards(job, mine, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finalize(job)
    accelerator.wait_for_everyone()
    return job.dataset_dir


def _prepare(data: DataConfig, teacher: TeacherConfig, out: Path) -> tuple[_Job, dict]:
    """Read and check the prompts and cross-section settings; no teacher needed yet."""
    prompts_path = out / "prompts.jsonl"
    if not prompts_path.is_file():
        raise FileNotFoundError(f"{prompts_path}: not found; run `python -m distill compose RECIPE` first")
    rows = read_prompts(prompts_path)
    slot_names = list(rows[0]["slots"])
    for line, row in enumerate(rows, start=1):
        if not row["slots"] or set(row["slots"]) != set(slot_names):
            raise ValueError(
                f"{prompts_path}:{line}: slots: has {sorted(row['slots'])}, line 1 has {sorted(slot_names)}; "
                "every row needs the same non-empty slots (rerun `python -m distill compose RECIPE`)"
            )
    bad = [s for s in data.trajectory_steps if s >= teacher.num_inference_steps]
    if bad:
        raise ValueError(
            f"data.trajectory_steps: {bad} out of range for teacher.num_inference_steps={teacher.num_inference_steps}; "
            f"use step indices in [0, {teacher.num_inference_steps - 1}] (the clean latents are always appended)"
        )
    vocab = load_vocabulary(resolve_path(data.vocabulary))
    negative = teacher.negative_prompt if teacher.negative_prompt is not None else vocab.negative_prompt
    num_shards = -(-len(rows) // data.shard_size)
    job = _Job(
        data=data,
        teacher=teacher,
        out=out,
        dataset_dir=out / "dataset",
        rows=rows,
        slot_names=slot_names,
        negative_prompt=negative,
        vocab_name=vocab.name,
        num_shards=num_shards,
        images=image_items(data.images) if data.images else [],
    )
    return job, fingerprint(data, teacher, prompts_path, negative)


def _render_shards(job: _Job, shards: list[int], accelerator: Accelerator) -> None:
    """Render this process's shards batch by batch; parts first, then each shard from its parts."""
    data = job.data
    teacher = WanTeacher.from_config(job.teacher, accelerator.device)
    if data.images and not teacher.image_conditioned:
        raise ValueError(
            f"data.images: teacher.pretrained {job.teacher.pretrained} has no image conditioning (no expand_timesteps "
            "in its model_index.json); image-to-video data needs a TI2V teacher such as "
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers, or remove data.images"
        )
    cfg = teacher.cfg
    shape = teacher.latent_shape(cfg.num_frames, cfg.height, cfg.width)
    num_traj = len(data.trajectory_steps) + 1 if data.trajectory_steps else 0
    features = build_features(job.slot_names, shape, data.save_latents, num_traj, images=bool(data.images))
    group = rows_per_row_group(features, data.shard_size)
    todo = sum(not job.part_path(r["index"]).is_file() for s in shards for r in job.shard_rows(s))
    bar = tqdm(total=todo, desc="generate", unit="sample", disable=not accelerator.is_main_process)
    for shard in shards:
        rows = job.shard_rows(shard)
        for start in range(0, len(rows), data.batch_size):
            batch = rows[start : start + data.batch_size]
            missing = {r["index"] for r in batch if not job.part_path(r["index"]).is_file()}
            if not missing:
                continue
            for row, sample in zip(batch, _render_batch(teacher, batch, job, shape)):
                if row["index"] in missing:
                    write_parquet(job.part_path(row["index"]), {k: [v] for k, v in sample.items()}, features, group)
            bar.update(len(missing))
        parts = [job.part_path(r["index"]) for r in rows]
        table = pa.concat_tables([read_parquet(p) for p in parts])
        write_parquet(job.shard_path(shard), table, features, group)
        for p in parts:
            p.unlink()
        logger.debug("generate: wrote %s", job.shard_path(shard))
    bar.close()


def _render_batch(teacher, batch: list[dict], job: _Job, shape: tuple[int, ...]) -> list[dict]:
    """One teacher call (CFG batched by the teacher) for a batch of prompt rows -> one dict per sample."""
    data, steps = job.data, teacher.cfg.num_inference_steps
    noise = torch.stack([sample_noise(r["seed"], shape) for r in batch])
    cond = teacher.encode([r["prompt"] for r in batch], job.negative_prompt)
    save_at = [*data.trajectory_steps, steps] if data.trajectory_steps else []
    first, images = None, []
    if job.images:
        picked = [job.images[r["index"] % len(job.images)] for r in batch]
        images = [(item, *load_image(item, teacher)) for item in picked]
        first = teacher.encode_image(torch.cat([pixels for _, pixels, _ in images]))
    out = teacher.sample(cond, noise, save_at=save_at, first_frame=first)
    bad = [r["index"] for r, lat in zip(batch, out.latents) if not torch.isfinite(lat).all()]
    if bad:  # a NaN clip decodes to a black video and would enter the dataset as if it were a sample
        raise ValueError(
            f"generate: the teacher's latents of row(s) {bad} are not finite; nothing of this batch was "
            "written. Check teacher.guidance_scale, teacher.shift and teacher.dtype (fp16 overflows)"
        )
    samples = []
    for i, row in enumerate(batch):
        frames = teacher.to_uint8(teacher.decode(out.latents[i : i + 1]))[0]  # one at a time: VAE memory
        sample = {
            "index": row["index"],
            "caption": row["prompt"],
            "slots": row["slots"],
            "seed": row["seed"],
            "video": {"bytes": encode_video(frames, data.fps, data.video_crf), "path": None},
        }
        if data.save_latents:
            sample["latents"] = out.latents[i].float().cpu().numpy()
        if save_at:
            sample["trajectory"] = out.trajectory[i].float().cpu().numpy()
            sample["trajectory_sigmas"] = out.sigmas[save_at].float().cpu().tolist()
        if images:
            sample["image"] = {"bytes": images[i][2], "path": None}
            sample["image_file"] = images[i][0].name
        samples.append(sample)
    return samples


def _finalize(job: _Job) -> None:
    """Rank 0, after every process finished: check the shards, write README.md, drop .work/, write COMPLETE."""
    dataset_dir = job.dataset_dir
    paths = [job.shard_path(s) for s in range(job.num_shards)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"{missing[0]}: missing after generation (a process failed?); rerun generate to finish it")
    coverage_path = job.out / "coverage.json"
    coverage_text = (
        format_coverage(json.loads(coverage_path.read_text(encoding="utf-8"))) if coverage_path.is_file() else None
    )
    card = dataset_card(
        data=job.data,
        teacher=job.teacher,
        output_dir=str(job.out),
        features=features_of(paths[0]),
        num_examples=len(job.rows),
        num_bytes=sum(p.stat().st_size for p in paths),
        vocab_name=job.vocab_name,
        negative_prompt=job.negative_prompt,
        coverage_text=coverage_text,
    )
    write_text_atomic(dataset_dir / "README.md", card)
    shutil.rmtree(dataset_dir / WORK_DIR, ignore_errors=True)
    marker = {"num_examples": len(job.rows), "num_shards": job.num_shards, "shards": shard_checksums(dataset_dir)}
    write_text_atomic(dataset_dir / "COMPLETE", json.dumps(marker, sort_keys=True) + "\n")
    logger.info("generate: %s is complete (%d samples in %d shards)", dataset_dir, len(job.rows), job.num_shards)
