"""The synthetic dataset format: parquet shards + dataset card, loadable with `datasets.load_dataset(folder)`.

    <output_dir>/dataset/
      data/train-00000-of-00003.parquet ...   rows in index order, `data.shard_size` per shard
      README.md                               dataset card (YAML `configs` + `dataset_info`, generation params)
      generation.json                         the generation fingerprint (see `synth_data.generate`)
      COMPLETE                                written last

Columns (in this order):
    index       int64                    row of prompts.jsonl
    caption     string                   the prompt
    slots       struct of strings        the composer's slot values
    seed        int64                    noise seed, derive_seed(data.seed, index)
    video       datasets.Video           mp4 bytes (libx264, yuv420p, data.fps), decoded by `decode_video`
    latents     Array4D float32 [C, F, H, W]     teacher's clean latents          (data.save_latents)
    trajectory  Array5D float32 [S, C, F, H, W]  states before data.trajectory_steps, then the clean latents
    trajectory_sigmas  float32 [S]       σ of each trajectory state (the last is 0: clean)   (data.trajectory_steps)
    image       datasets.Image           image-to-video: the first frame given, PNG at the video's size  (data.images)
    image_file  string                   its file name in data.images                                      (data.images)

The features live in each shard's parquet schema metadata (`huggingface` key, as datasets writes it) and
in the card, so `load_dataset` restores them. Video decoding in `datasets` needs torchcodec (CUDA-only
here), so `load_local` keeps the mp4 bytes (`Video(decode=False)`) and `decode_video` uses PyAV.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets import (
    Array4D,
    Array5D,
    Dataset,
    DatasetInfo,
    Features,
    Image,
    List,
    SplitDict,
    SplitInfo,
    Value,
    Video,
)
from datasets import config as hf_datasets_config
from datasets.arrow_writer import ParquetWriter
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCardData

from core.files import atomic_path
from core.recipe_loader import to_dict

DATA_DIR = "data"
SPLIT = "train"
MAX_ROW_GROUP_BYTES = 100 * 2**20
"""Row groups stay under ~100 MB (datasets' `config.MAX_ROW_GROUP_SIZE`), so the Hub viewer can page them."""
X264_OPTIONS = {"preset": "medium", "threads": "1"}
"""Fixed encoder options: one x264 thread and no timestamps make the mp4 bytes reproducible."""


def shard_name(shard: int, num_shards: int) -> str:
    return f"{DATA_DIR}/{SPLIT}-{shard:05d}-of-{num_shards:05d}.parquet"


# ---- atomic files ---------------------------------------------------------------------------------
# ---- features and parquet -------------------------------------------------------------------------
def build_features(
    slot_names: list[str],
    latent_shape: tuple[int, int, int, int],
    save_latents: bool,
    num_trajectory: int,
    images: bool = False,
) -> Features:
    """The dataset's features; `latent_shape` is (C, F, H, W), `num_trajectory` 0 means no trajectory columns,
    `images` adds the image-to-video columns."""
    features = {
        "index": Value("int64"),
        "caption": Value("string"),
        "slots": {name: Value("string") for name in slot_names},
        "seed": Value("int64"),
        "video": Video(),
    }
    if save_latents:
        features["latents"] = Array4D(shape=tuple(latent_shape), dtype="float32")
    if num_trajectory:
        features["trajectory"] = Array5D(shape=(num_trajectory, *latent_shape), dtype="float32")
        features["trajectory_sigmas"] = List(Value("float32"), length=num_trajectory)
    if images:
        features["image"] = Image()
        features["image_file"] = Value("string")
    return Features(features)


def rows_per_row_group(features: Features, max_rows: int) -> int:
    """How many rows fit a row group of ~MAX_ROW_GROUP_BYTES (tensor columns dominate the row size)."""
    row_bytes = 1 << 16  # video, caption and slots: a generous constant
    for name in ("latents", "trajectory"):
        if name in features:
            row_bytes += 4 * int(np.prod(features[name].shape))
    return max(1, min(max_rows, MAX_ROW_GROUP_BYTES // row_bytes))


def write_parquet(
    path: str | os.PathLike, data: dict[str, list] | pa.Table, features: Features, rows_per_group: int
) -> None:
    """Write rows (a column dict or an Arrow table) atomically with datasets' ParquetWriter.

    Deterministic: the same rows give the same bytes (fixed row order and options, no timestamps).
    """
    if isinstance(data, dict):
        _check_arrays(data, features)
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        writer = ParquetWriter(stream=stream, features=features, writer_batch_size=rows_per_group)
        if isinstance(data, pa.Table):
            writer.write_table(data)
        else:
            writer.write_batch(data)
        writer.finalize(close_stream=False)


def _check_arrays(data: dict[str, list], features: Features) -> None:
    """datasets writes an ArrayND of the wrong shape without complaint; refuse it here."""
    for name, feature in features.items():
        if isinstance(feature, (Array4D, Array5D)):
            for i, value in enumerate(data[name]):
                if np.shape(value) != tuple(feature.shape):
                    raise ValueError(f"{name}[{i}]: expected shape {tuple(feature.shape)}, got {np.shape(value)}")


def read_parquet(path: str | os.PathLike) -> pa.Table:
    return pq.read_table(path)


def features_of(path: str | os.PathLike) -> Features:
    """The datasets features stored in a shard's schema metadata."""
    return Features.from_arrow_schema(pq.read_schema(path))


# ---- video ----------------------------------------------------------------------------------------
def encode_video(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """uint8 [F, H, W, 3] RGB -> mp4 bytes (H.264 via PyAV's libx264, yuv420p). Same frames, same bytes."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"encode_video: expected uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"encode_video: yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps, options={**X264_OPTIONS, "crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def decode_video(data: bytes | dict) -> np.ndarray:
    """mp4 bytes (or a `Video(decode=False)` value `{"bytes": ..., "path": ...}`) -> uint8 [F, H, W, 3] RGB."""
    if isinstance(data, dict):
        data = data["bytes"] if data.get("bytes") is not None else Path(data["path"]).read_bytes()
    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


# ---- loading --------------------------------------------------------------------------------------
def shard_checksums(dataset_dir: str | os.PathLike) -> dict[str, dict]:
    """{shard path relative to the folder: {"bytes": size, "sha256": hex}} of every parquet shard in `data/`."""
    dataset_dir = Path(dataset_dir)
    out = {}
    for path in sorted((dataset_dir / DATA_DIR).glob(f"{SPLIT}-*.parquet")):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                digest.update(block)
        out[path.relative_to(dataset_dir).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return out


def verify_shards(dataset_dir: str | os.PathLike) -> dict[str, dict]:
    """The shards' checksums, checked against those `generate` wrote into COMPLETE: a shard edited, truncated,
    replaced, missing or added since is a one-line ValueError naming it. A folder whose COMPLETE predates checksums
    is not checked. Returns the checksums found."""
    dataset_dir = Path(dataset_dir)
    found = shard_checksums(dataset_dir)
    try:
        marker = json.loads((dataset_dir / "COMPLETE").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = {}
    expected = marker.get("shards") if isinstance(marker, dict) else None
    if not expected:
        return found
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            raise ValueError(
                f"{dataset_dir / name}: missing, though COMPLETE lists it; restore it or regenerate "
                "the dataset (delete the folder and rerun generate)"
            )
        if name not in expected:
            raise ValueError(
                f"{dataset_dir / name}: not a shard of this dataset (COMPLETE does not list it); remove it"
            )
        if found[name] != expected[name]:
            raise ValueError(
                f"{dataset_dir / name}: changed since generation ({found[name]['bytes']} bytes, sha256 "
                f"{found[name]['sha256'][:12]}…; COMPLETE has {expected[name]['bytes']} bytes, "
                f"{expected[name]['sha256'][:12]}…); restore it or regenerate the dataset"
            )
    return found


def load_local(dataset_dir: str | os.PathLike, **load_kwargs) -> Dataset:
    """The train split of a generated dataset folder, with `video` as raw mp4 bytes (decode with `decode_video`).

    The shards are checked against COMPLETE's checksums first (`verify_shards`), and read through datasets'
    parquet builder from their paths into a cache folder named by their content, so an edited or copied folder
    can never be served another folder's cached rows (datasets keys a folder's cache by its name and file names).
    `load_kwargs` go to `datasets.load_dataset` (e.g. `cache_dir`, `streaming=True`).
    """
    from datasets import load_dataset

    dataset_dir = Path(dataset_dir)
    if not any((dataset_dir / DATA_DIR).glob(f"{SPLIT}-*.parquet")):
        raise FileNotFoundError(
            f"{dataset_dir}: no parquet shards in {DATA_DIR}/; run `python -m distill generate RECIPE.yaml` first"
        )
    shards = verify_shards(dataset_dir)
    content = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16]
    base = load_kwargs.pop("cache_dir", None) or hf_datasets_config.HF_DATASETS_CACHE
    files = [str(dataset_dir / name) for name in sorted(shards)]
    ds = load_dataset(
        "parquet",
        data_files={SPLIT: files},
        split=SPLIT,
        cache_dir=str(Path(base) / "wan-distill" / content),
        **load_kwargs,
    )
    return ds.cast_column("video", Video(decode=False))


# ---- dataset card ---------------------------------------------------------------------------------
def dataset_card(
    *,
    data,
    teacher,
    output_dir: str,
    features: Features,
    num_examples: int,
    num_bytes: int,
    vocab_name: str,
    negative_prompt: str,
    coverage_text: str | None,
) -> str:
    """README.md: YAML front matter (configs, dataset_info, task, tags) and the generation parameters.

    Deterministic (no timestamps, no token); `data` and `teacher` are the recipe's sections (`DataConfig`,
    `TeacherConfig`), `output_dir` its output folder.
    """
    card = DatasetCardData(
        pretty_name=f"{vocab_name} synthetic videos from {teacher.pretrained}",
        task_categories=["image-to-video"] if data.images else ["text-to-video"],
        tags=["synthetic", "video", "distillation", "wan-distill"],
        configs=[{"config_name": "default", "data_files": [{"split": SPLIT, "path": f"{DATA_DIR}/{SPLIT}-*"}]}],
    )
    info = DatasetInfo(
        features=features,
        download_size=num_bytes,
        dataset_size=num_bytes,
        splits=SplitDict({SPLIT: SplitInfo(name=SPLIT, num_examples=num_examples, num_bytes=num_bytes)}),
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card)
    regen = {"output_dir": output_dir, "data": to_dict(data), "teacher": to_dict(teacher)}
    shape = (
        features["latents"].shape
        if "latents" in features
        else features["trajectory"].shape[1:]
        if "trajectory" in features
        else None
    )
    latents_line = f"latents [C, F, H, W] = {list(shape)}" if shape else "no latents stored"
    lines = [
        "---",
        card.to_yaml(),
        "---",
        "",
        f"# {vocab_name} synthetic videos from `{teacher.pretrained}`",
        "",
        f"{num_examples} {'image' if data.images else 'text'}-to-video samples rendered by a frozen teacher with "
        "wan-distill, for distilling it into a small student."
        + (" Each starts from the image in its `image` column (the first frame)." if data.images else ""),
        "",
        "## Generation",
        "",
        f"- teacher: `{teacher.pretrained}`" + (f" @ `{teacher.revision}`" if teacher.revision else ""),
        f"- sampler: {teacher.num_inference_steps} steps, CFG {teacher.guidance_scale}"
        + (f" (low-noise expert {teacher.guidance_scale_2})" if teacher.guidance_scale_2 is not None else "")
        + f" (v = v_uncond + w·(v_cond - v_uncond)), flow shift {teacher.shift}, dtype {teacher.dtype}",
        f"- video: {teacher.num_frames} frames of {teacher.width}x{teacher.height} px at {data.fps} fps "
        f"(H.264 yuv420p, crf {data.video_crf}); {latents_line}",
        f"- negative prompt: {negative_prompt!r}",
        f"- seeds: global seed {data.seed}; sample i uses noise seed `derive_seed({data.seed}, i)` "
        "(first 8 bytes of sha256(f\"{seed}:{i}\"), 63 bits) with `torch.Generator('cpu')` float32 randn",
        f"- trajectory: states before steps {data.trajectory_steps} + the clean latents"
        if data.trajectory_steps
        else "- trajectory: none",
        f"- vocabulary: `{vocab_name}` (`{data.vocabulary}`), {data.num_prompts} prompts, mode `{data.mode}`",
        "",
        "## Coverage",
        "",
        *(["```", coverage_text, "```"] if coverage_text else ["No coverage.json was found next to prompts.jsonl."]),
        "",
        "## Loading",
        "",
        "With `datasets` and PyAV only (`pip install datasets av`; datasets' own video decoding needs torchcodec):",
        "",
        "```python",
        "import io",
        "",
        "import av",
        "import numpy as np",
        "from datasets import Video, load_dataset",
        "",
        f'ds = load_dataset("{data.hub_repo_id or "path/to/dataset"}", split="train")',
        'ds = ds.cast_column("video", Video(decode=False))  # the mp4 bytes',
        'with av.open(io.BytesIO(ds[0]["video"]["bytes"])) as container:',
        '    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])',
        'print(ds[0]["caption"], frames.shape)',
        "```",
        "",
        "With wan-distill installed (checks the shards against their checksums first):",
        "",
        "```python",
        "from synth_data.dataset import load_local, decode_video",
        'ds = load_local("path/to/dataset")',
        'frames = decode_video(ds[0]["video"])  # uint8 [F, H, W, 3]',
        "```",
        "",
        "## Recipe (data + teacher sections, resolved)",
        "",
        "Regenerate exactly with `python -m distill generate recipe.yaml` (same library versions and device type):",
        "",
        "```yaml",
        yaml.safe_dump(regen, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
