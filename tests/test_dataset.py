"""The dataset format: mp4 round trip and determinism, deterministic atomic parquet, loading, the card."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Features, Video

from core.files import atomic_path
from distill.config import load_recipe
from synth_data.dataset import (
    build_features,
    dataset_card,
    decode_video,
    encode_video,
    features_of,
    load_local,
    rows_per_row_group,
    shard_name,
    write_parquet,
)


def smooth_video(f=5, h=16, w=16) -> np.ndarray:
    """A moving colour gradient (compresses well, so H.264 errors stay small)."""
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    rgb = np.stack([8 * x + 10 * t, 8 * y, 255 - 6 * (x + y)], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def rows(n: int, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    return {
        "index": list(range(n)),
        "caption": [f"a red cat {i}" for i in range(n)],
        "slots": [{"color": "red", "thing": f"cat {i}"} for i in range(n)],
        "seed": [100 + i for i in range(n)],
        "video": [{"bytes": encode_video(smooth_video(), fps=8), "path": None} for _ in range(n)],
        "latents": [rng.standard_normal((4, 2, 2, 2), dtype=np.float32) for _ in range(n)],
        "trajectory": [rng.standard_normal((3, 4, 2, 2, 2), dtype=np.float32) for _ in range(n)],
        "trajectory_sigmas": [[1.0, 0.5, 0.0] for _ in range(n)],
    }


FEATURES = build_features(["color", "thing"], (4, 2, 2, 2), save_latents=True, num_trajectory=3)


def test_video_round_trip_and_byte_determinism():
    frames = smooth_video()
    data = encode_video(frames, fps=8)
    assert data[4:8] == b"ftyp" and data == encode_video(frames.copy(), fps=8)  # same frames, same bytes
    assert encode_video(frames, fps=8, crf=30) != data and encode_video(frames, fps=16) != data
    out = decode_video(data)
    assert out.shape == (5, 16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frames).mean() < 4
    assert np.array_equal(decode_video({"bytes": data, "path": None}), out)
    with pytest.raises(ValueError, match="even height and width"):
        encode_video(smooth_video(h=15), fps=8)
    with pytest.raises(ValueError, match=r"expected uint8 \[F, H, W, 3\]"):
        encode_video(frames.astype(np.float32), fps=8)


def test_parquet_is_deterministic_and_loads_with_its_features(tmp_path):
    a, b = tmp_path / "a" / shard_name(0, 1), tmp_path / "b" / shard_name(0, 1)
    write_parquet(a, rows(3), FEATURES, rows_per_group=2)
    write_parquet(b, rows(3), FEATURES, rows_per_group=2)
    assert a.read_bytes() == b.read_bytes()
    assert pq.ParquetFile(a).metadata.num_row_groups == 2
    assert features_of(a) == FEATURES
    assert sorted(p.name for p in a.parent.iterdir()) == [a.name]  # no temp file left

    ds = load_local(tmp_path / "a", cache_dir=str(tmp_path / "cache"))
    assert ds.features == Features({**FEATURES, "video": Video(decode=False)})
    got = ds.with_format("numpy")[:]
    np.testing.assert_array_equal(got["latents"], np.stack(rows(3)["latents"]))
    np.testing.assert_array_equal(got["trajectory"], np.stack(rows(3)["trajectory"]))
    assert ds[1]["caption"] == "a red cat 1" and ds[1]["slots"] == {"color": "red", "thing": "cat 1"}
    assert decode_video(ds[2]["video"]).shape == (5, 16, 16, 3)


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / shard_name(0, 1)
    write_parquet(path, rows(2), FEATURES, rows_per_group=2)
    before = path.read_bytes()
    bad = rows(2)
    bad["latents"][1] = np.zeros((4, 2, 2, 3), np.float32)  # wrong shape
    with pytest.raises(ValueError, match=r"latents\[1\]: expected shape \(4, 2, 2, 2\), got \(4, 2, 2, 3\)"):
        write_parquet(path, bad, FEATURES, rows_per_group=2)
    bad = rows(2)
    bad["video"][1] = {"bytes": b"\xff", "path": b"\xff" * 3}  # fails inside datasets' writer, temp file open
    with pytest.raises(Exception):  # noqa: B017 (what datasets raises varies; the files are what matters)
        write_parquet(path, bad, FEATURES, rows_per_group=2)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with pytest.raises(KeyError), atomic_path(tmp_path / "x.txt") as tmp:
        tmp.write_text("partial")
        raise KeyError("boom")
    assert not (tmp_path / "x.txt").exists() and [p.name for p in path.parent.iterdir()] == [path.name]


def test_load_local_without_shards_names_the_folder(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=rf"{tmp_path}: no parquet shards in data/; run `python -m distill "
        rf"generate",
    ):
        load_local(tmp_path)


def test_row_groups_stay_small_for_big_latents():
    wan = build_features(["a"], (16, 21, 60, 104), save_latents=True, num_trajectory=5)  # ~8 MB + ~42 MB per row
    assert rows_per_row_group(wan, 64) == 2  # row groups of ~100 MB
    assert rows_per_row_group(build_features(["a"], (16, 21, 60, 104), True, 0), 64) == 12
    assert rows_per_row_group(FEATURES, 64) == 64


def test_dataset_card(tmp_path):
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "data": {"vocabulary": "v.yaml", "num_prompts": 3, "trajectory_steps": [0, 2]},
                "teacher": {"pretrained": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "revision": "abc123"},
                "train": {"max_steps": 7},
            }
        )
    )
    recipe = load_recipe(tmp_path / "r.yaml")
    kwargs = dict(
        data=recipe.data,
        teacher=recipe.teacher,
        output_dir=recipe.output_dir,
        features=FEATURES,
        num_examples=3,
        num_bytes=1234,
        vocab_name="wan",
        negative_prompt="blurry",
        coverage_text="coverage of 3 prompts",
    )
    card = dataset_card(**kwargs)
    assert card == dataset_card(**kwargs)  # deterministic: no timestamps
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert front["dataset_info"]["splits"] == [{"name": "train", "num_bytes": 1234, "num_examples": 3}]
    assert Features._from_yaml_list(front["dataset_info"]["features"]) == FEATURES
    assert front["task_categories"] == ["text-to-video"]
    for text in (
        "`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` @ `abc123`",
        "50 steps, CFG 5.0",
        "flow shift 3.0",
        "81 frames of 832x480 px at 16 fps",
        "latents [C, F, H, W] = [4, 2, 2, 2]",
        "'blurry'",
        "global seed 0",
        "before steps [0, 2]",
        "`wan` (`v.yaml`)",
        "coverage of 3 prompts",
    ):
        assert text in card, text
    regen = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert list(regen) == ["output_dir", "data", "teacher"]  # student/train sections don't belong to the data
    assert regen["teacher"]["revision"] == "abc123" and regen["data"]["trajectory_steps"] == [0, 2]


def test_loading_is_content_addressed_and_verified(tmp_path):
    """An edited copy of a folder with the same name and file names never gets the first folder's cached rows (the
    failure of `load_dataset(folder)`, whose cache key is the folder's name), and a shard changed after generation
    is refused by name before anything is read."""
    import json
    import os
    import shutil

    from synth_data.dataset import shard_checksums

    cache = str(tmp_path / "cache")
    first = tmp_path / "one" / "dataset"
    write_parquet(first / shard_name(0, 1), rows(3), FEATURES, rows_per_group=2)
    (first / "COMPLETE").write_text(json.dumps({"shards": shard_checksums(first)}))
    assert load_local(first, cache_dir=cache)[1]["caption"] == "a red cat 1"
    second = tmp_path / "two" / "dataset"  # same base name, same file names, other rows
    other = rows(3)
    other["caption"] = ["a big dog 0", "a big dog 1", "a big dog 2"]  # as long as the first's
    write_parquet(second / shard_name(0, 1), other, FEATURES, rows_per_group=2)
    (second / "COMPLETE").write_text(json.dumps({"shards": shard_checksums(second)}))
    stat = (first / shard_name(0, 1)).stat()  # as a copy that keeps times (cp -p, shutil.copy2) would have
    os.utime(second / shard_name(0, 1), ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [r["caption"] for r in load_local(second, cache_dir=cache)] == other["caption"]

    shard = first / shard_name(0, 1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated after generation
    with pytest.raises(ValueError, match=rf"{shard}: changed since generation \({len(data) // 2} bytes"):
        load_local(first, cache_dir=cache)
    shutil.copy(second / shard_name(0, 1), shard)  # replaced by another dataset's shard
    with pytest.raises(ValueError, match=rf"{shard}: changed since generation"):
        load_local(first, cache_dir=cache)
    shard.unlink()
    (first / shard_name(0, 2)).write_bytes(data)
    with pytest.raises(ValueError, match="missing, though COMPLETE lists it|not a shard of this dataset"):
        load_local(first, cache_dir=cache)


def test_atomic_files_get_the_umask_mode_not_0600(tmp_path):
    """mkstemp's temp files are private (0600); what replaces the target must read like any file the user writes."""
    import os
    import stat

    from core.files import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        os.umask(0o077)
        write_text_atomic(tmp_path / "b.txt", "y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600
    assert (tmp_path / "a.txt").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
