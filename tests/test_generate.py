"""The generate stage on the tiny teacher: dataset contents, byte-identical resume after SIGKILL, fingerprint
errors, clean failure, and 2 gloo processes giving the same bytes as 1."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.seeding import sample_noise
from distill.accel import make_accelerator
from distill.config import load_recipe
from synth_data.compose_stage import compose_stage
from synth_data.composer import read_prompts
from synth_data.dataset import build_features, decode_video, load_local
from synth_data.generate import generate
from synth_data.layout import is_complete

VENV_BIN = Path(sys.executable).parent
VOCAB = {
    "name": "tinyvocab",
    "slots": {"color": ["red", "green", "blue"], "thing": ["cat", "dog", "circle", "square"]},
    "templates": ["a {color} {thing} moving left", "the {thing} beside a {color} square"],
    "negative_prompt": "blurry noise",
}


def make_project(root: Path, pipeline_dir: Path, **data) -> Path:
    """A recipe with relative paths (output_dir `out`, vocabulary `vocab.yaml`) and its composed prompts."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.yaml").write_text(yaml.safe_dump(VOCAB))
    recipe = {
        "output_dir": "out",
        "data": {
            "vocabulary": "vocab.yaml",
            "num_prompts": 6,
            "batch_size": 2,
            "shard_size": 4,
            "trajectory_steps": [0, 1],
            **data,
        },
        "teacher": {
            "pretrained": str(pipeline_dir),
            "dtype": "float32",
            "height": 16,
            "width": 16,
            "num_frames": 5,
            "num_inference_steps": 2,
            "guidance_scale": 5.0,
            "max_sequence_length": 16,
        },
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with contextlib.chdir(root):
        recipe = load_recipe("recipe.yaml")
        compose_stage(recipe.data, recipe.out)
    return root


def run_generate(root: Path, *overrides: str) -> Path:
    with contextlib.chdir(root):
        recipe = load_recipe("recipe.yaml", overrides)
        return root / generate(recipe.data, recipe.teacher, recipe.out, make_accelerator())


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (hidden ones included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pipeline_dir):
    """One uninterrupted single-process run; every other run must reproduce its bytes."""
    root = make_project(tmp_path_factory.mktemp("ref"), tiny_pipeline_dir)
    run_generate(root)
    return root


def test_end_to_end_dataset(reference, tiny_pipeline_dir, tmp_path, monkeypatch):
    ds_dir = reference / "out" / "dataset"
    prompts = read_prompts(reference / "out" / "prompts.jsonl")
    assert is_complete(ds_dir)
    assert sorted(tree(ds_dir)) == [
        "COMPLETE",
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "generation.json",
    ]
    ds = load_local(ds_dir, cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == [
        "index",
        "caption",
        "slots",
        "seed",
        "video",
        "latents",
        "trajectory",
        "trajectory_sigmas",
    ]
    cols = ds[:]
    assert cols["index"] == list(range(6))
    assert cols["caption"] == [r["prompt"] for r in prompts]
    assert cols["slots"] == [r["slots"] for r in prompts]
    assert cols["seed"] == [r["seed"] for r in prompts]
    arr = ds.with_format("numpy")[:]
    latents, traj = arr["latents"], arr["trajectory"]
    assert latents.shape == (6, 4, 2, 2, 2) and latents.dtype == np.float32
    assert traj.shape == (6, 3, 4, 2, 2, 2) and traj.dtype == np.float32
    np.testing.assert_array_equal(traj[:, -1], latents)  # the clean latents close the trajectory
    for i, row in enumerate(prompts):  # the state before step 0 is the seeded noise
        np.testing.assert_array_equal(traj[i, 0], sample_noise(row["seed"], (4, 2, 2, 2)).numpy())
    sigmas = arr["trajectory_sigmas"]
    assert sigmas.shape == (6, 3) and sigmas[0, 0] == 1.0 and sigmas[0, -1] == 0.0 and 0 < sigmas[0, 1] < 1

    # Same numbers as querying the teacher directly on the first batch.
    from teachers.wan import WanTeacher

    with contextlib.chdir(reference):
        recipe = load_recipe("recipe.yaml")
    teacher = WanTeacher.from_config(recipe.teacher, "cpu")
    noise = torch.stack([sample_noise(r["seed"], (4, 2, 2, 2)) for r in prompts[:2]])
    out = teacher.sample(teacher.encode([r["prompt"] for r in prompts[:2]], "blurry noise"), noise)
    np.testing.assert_array_equal(latents[:2], out.latents.numpy())
    frames = teacher.to_uint8(teacher.decode(out.latents[:1]))[0]
    decoded = decode_video(ds[0]["video"])
    assert decoded.shape == (5, 16, 16, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 12  # lossy H.264 of the teacher's frames

    # `datasets.load_dataset(folder)` restores every feature from the card/parquet metadata.
    import datasets

    plain = datasets.load_dataset(str(ds_dir), split="train", cache_dir=str(tmp_path / "cache2"))
    assert plain.features == build_features(["color", "thing"], (4, 2, 2, 2), True, 3)

    card = (ds_dir / "README.md").read_text()
    # The card's plain snippet (datasets + PyAV, no wan-distill) runs as printed, on this folder.
    snippet = card.split("## Loading")[1].split("```python\n")[1].split("```")[0]
    assert "synth_data" not in snippet
    scope = {}
    exec(snippet.replace('"path/to/dataset"', repr(str(ds_dir))), scope)
    np.testing.assert_array_equal(scope["frames"], decode_video(ds[0]["video"]))
    front = yaml.safe_load(card.split("---")[1])
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    assert front["dataset_info"]["splits"][0]["num_examples"] == 6
    assert front["task_categories"] == ["text-to-video"]
    for text in (
        str(tiny_pipeline_dir),
        "2 steps",
        "CFG 5.0",
        "flow shift 3.0",
        "5 frames of 16x16",
        "tinyvocab",
        "vocab.yaml",
        "'blurry noise'",
        "color|thing",
    ):
        assert text in card, text
    regen = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert regen["data"] == recipe.to_dict()["data"] and regen["teacher"] == recipe.to_dict()["teacher"]
    marker = json.loads((ds_dir / "COMPLETE").read_text())
    assert {k: marker[k] for k in ("num_examples", "num_shards")} == {"num_examples": 6, "num_shards": 2}
    for name, entry in marker["shards"].items():  # the checksums loading verifies, by hand
        data = (ds_dir / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(marker["shards"]) == [f"data/train-0000{i}-of-00002.parquet" for i in range(2)]

    # A complete folder is returned as is, and a run killed after its last shard only finalizes: no teacher.
    before = tree(ds_dir)
    monkeypatch.setattr(WanTeacher, "from_config", lambda *a, **k: pytest.fail("teacher loaded"))
    run_generate(reference)
    assert tree(ds_dir) == before
    (ds_dir / "COMPLETE").unlink()
    (ds_dir / "README.md").unlink()
    run_generate(reference)
    assert tree(ds_dir) == before


SLOW_GENERATE = """
import time, torch
torch.set_num_threads(1)
from teachers.wan import WanTeacher
from distill.accel import make_accelerator
from distill.config import load_recipe
from synth_data.generate import generate
sample = WanTeacher.sample
def slow_sample(self, *a, **k):
    time.sleep(0.5)
    return sample(self, *a, **k)
WanTeacher.sample = slow_sample
recipe = load_recipe("recipe.yaml")
generate(recipe.data, recipe.teacher, recipe.out, make_accelerator())
"""


def test_resume_after_sigkill_is_byte_identical(reference, tiny_pipeline_dir, tmp_path, monkeypatch):
    root = make_project(tmp_path / "killed", tiny_pipeline_dir)
    ds_dir = root / "out" / "dataset"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_GENERATE], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 90
    while not list(ds_dir.glob(".work/part-*.parquet")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_complete(ds_dir)
    done = {int(p.stem.split("-")[1]) for p in ds_dir.glob(".work/part-*.parquet")}
    for shard in ds_dir.glob("data/train-*.parquet"):  # train-0000s-of-00002: indices 4s .. 4s+3
        done |= set(range(6)[int(shard.name[6:11]) * 4 :][:4])
    assert 0 < len(done) < 6
    expected_calls = sum(not {i, i + 1} <= done for i in (0, 2, 4))  # batches (0,1), (2,3), (4,5)

    from teachers.wan import WanTeacher

    calls = []
    sample = WanTeacher.sample
    monkeypatch.setattr(
        WanTeacher, "sample", lambda self, cond, *a, **k: calls.append(len(cond)) or sample(self, cond, *a, **k)
    )
    run_generate(root)
    assert len(calls) == expected_calls  # finished samples are not redone
    assert tree(ds_dir) == tree(reference / "out" / "dataset")


def test_fingerprint_mismatch_names_the_changed_key(reference):
    ds_dir = reference / "out" / "dataset"
    before = tree(ds_dir)
    with pytest.raises(
        ValueError,
        match=r"dataset was generated with another config "
        r"\(teacher.num_inference_steps: 2 -> 3\); use another output_dir",
    ):
        run_generate(reference, "teacher.num_inference_steps=3")
    with pytest.raises(ValueError, match=r"data.video_crf: 18 -> 20; teacher.guidance_scale: 5.0 -> 4.0"):
        run_generate(reference, "teacher.guidance_scale=4.0", "data.video_crf=20")
    run_generate(reference, "data.hub_repo_id=me/x", "teacher.encode_cache_size=4")  # not fingerprinted
    assert tree(ds_dir) == before


def test_bad_inputs_fail_before_writing(tmp_path, tiny_pipeline_dir):
    root = make_project(tmp_path / "bad", tiny_pipeline_dir)
    with pytest.raises(ValueError, match=r"data.trajectory_steps: \[2\] out of range .*num_inference_steps=2"):
        run_generate(root, "data.trajectory_steps=[0,2]")
    prompts = root / "out" / "prompts.jsonl"
    lines = prompts.read_text().splitlines()
    lines[2] = lines[2].replace('"seed": ', '"seed": "x", "oops": ')
    prompts.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"out/prompts.jsonl:3: "):
        run_generate(root)
    prompts.unlink()
    with pytest.raises(FileNotFoundError, match=r"run `python -m distill compose RECIPE` first"):
        run_generate(root)
    assert not (root / "out" / "dataset").exists()


def test_a_run_that_failed_before_its_first_sample_does_not_bind_the_folder(tmp_path, tiny_pipeline_dir, reference):
    """A typo that fails once generation.json is written (a teacher path that does not load) leaves nothing
    rendered: the corrected run is not refused as "another config" and gives the reference's bytes."""
    root = make_project(tmp_path / "typo", tiny_pipeline_dir)
    with pytest.raises(Exception):  # noqa: B017 (diffusers' own error for a folder that is no pipeline)
        run_generate(root, f"teacher.pretrained={tmp_path / 'no_such_pipeline'}")
    assert (root / "out" / "dataset" / "generation.json").is_file()
    run_generate(root)
    assert tree(root / "out" / "dataset") == tree(reference / "out" / "dataset")


def test_error_mid_run_keeps_finished_samples_and_no_partial_files(reference, tiny_pipeline_dir, tmp_path, monkeypatch):
    from teachers.wan import WanTeacher

    root = make_project(tmp_path / "crash", tiny_pipeline_dir)
    ds_dir = root / "out" / "dataset"
    sample, calls = WanTeacher.sample, []

    def failing_sample(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return sample(self, *a, **k)

    monkeypatch.setattr(WanTeacher, "sample", failing_sample)
    with pytest.raises(RuntimeError, match="simulated"):
        run_generate(root)
    assert sorted(tree(ds_dir)) == [".work/part-000000000.parquet", ".work/part-000000001.parquet", "generation.json"]
    monkeypatch.setattr(WanTeacher, "sample", sample)
    run_generate(root)
    assert tree(ds_dir) == tree(reference / "out" / "dataset")


@pytest.mark.xdist_group("multiproc")
def test_two_processes_give_the_same_bytes(reference, tiny_pipeline_dir, tmp_path):
    root = make_project(tmp_path / "multi", tiny_pipeline_dir)
    with socket.socket() as s:  # a free port, so parallel test sessions don't collide on 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(VENV_BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(Path(__file__).parent / "generate_probe.py"),
        "recipe.yaml",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "process 0 of 2 renders shards [0]" in res.stderr, res.stderr[-3000:]
    assert "process 1 of 2 renders shards [1]" in res.stderr, res.stderr[-3000:]
    assert tree(root / "out" / "dataset") == tree(reference / "out" / "dataset")


def test_non_finite_teacher_latents_are_never_written(tmp_path, tiny_pipeline_dir, monkeypatch):
    """The teacher's second batch comes back with a NaN: generate stops naming the rows; the first batch's parts
    stay, no shard and no COMPLETE is written, and a clean rerun completes the same dataset."""
    from teachers.wan import WanTeacher

    root = make_project(tmp_path / "nan", tiny_pipeline_dir)
    ds_dir = root / "out" / "dataset"
    sample, calls = WanTeacher.sample, []

    def nan_sample(self, *a, **k):
        out = sample(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            out.latents[-1, 0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(WanTeacher, "sample", nan_sample)
    with pytest.raises(ValueError, match=r"generate: the teacher's latents of row\(s\) \[3\] are not finite"):
        run_generate(root)
    assert sorted(tree(ds_dir)) == [".work/part-000000000.parquet", ".work/part-000000001.parquet", "generation.json"]


# ---- image-to-video (Wan2.2 TI2V) --------------------------------------------------------------------------------
def write_images(folder: Path, n: int, size: int = 40) -> list[np.ndarray]:
    """`n` random PNGs of size x size px (not the video's 32 x 32: generate resizes them)."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"frame_{i}.png")
    return arrays


def test_image_to_video_rows_start_from_their_image(tmp_path, tiny_ti2v_dir):
    from PIL import Image

    from teachers.wan import WanTeacher

    root = make_project(tmp_path / "p", tiny_ti2v_dir, num_prompts=3, images="images")
    write_images(root / "images", 2)
    ti2v = ["teacher.height=32", "teacher.width=32"]
    ds = load_local(run_generate(root, *ti2v), cache_dir=str(tmp_path / "cache"))
    assert ds.column_names[-2:] == ["image", "image_file"]
    assert ds["image_file"] == ["frame_0.png", "frame_1.png", "frame_0.png"]  # row i: image i mod 2
    first = ds[0]["image"]
    assert isinstance(first, Image.Image) and first.size == (32, 32)
    # The same numbers as the teacher's own image-to-video sample from that (resized) image.
    with contextlib.chdir(root):
        recipe = load_recipe("recipe.yaml", ti2v)
    teacher = WanTeacher.from_config(recipe.teacher, "cpu")
    pixels = torch.from_numpy(np.array(first)).permute(2, 0, 1)[None].float() / 127.5 - 1
    image_latent = teacher.encode_image(pixels)
    row = read_prompts(root / "out" / "prompts.jsonl")[0]
    shape = teacher.latent_shape(5, 32, 32)
    out = teacher.sample(
        teacher.encode([row["prompt"]], "blurry noise"),
        sample_noise(row["seed"], shape)[None],
        first_frame=image_latent,
    )
    latents = torch.from_numpy(ds.with_format("numpy")[0]["latents"])
    assert (latents[:, :1] - image_latent[0]).abs().max() <= 1e-6  # the stored image is the frame given
    assert (latents - out.latents[0]).abs().max() <= 1e-5
    card = (root / "out" / "dataset" / "README.md").read_text()
    assert "image-to-video" in card and "`image` column" in card


def test_image_to_video_input_errors(tmp_path, tiny_pipeline_dir, tiny_ti2v_dir):
    root = make_project(tmp_path / "empty", tiny_ti2v_dir, images="images")
    (root / "images").mkdir()
    with pytest.raises(ValueError, match="data.images: images is not a folder with .png/.jpg/.jpeg/.webp files"):
        run_generate(root, "teacher.height=32", "teacher.width=32")
    root = make_project(tmp_path / "t2v", tiny_pipeline_dir, images="images")
    write_images(root / "images", 1)
    with pytest.raises(ValueError, match="data.images: teacher.pretrained .* has no image conditioning"):
        run_generate(root)
    root = make_project(tmp_path / "bad", tiny_ti2v_dir, images="images")
    write_images(root / "images", 1)
    (root / "images" / "frame_1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"data.images: .*frame_1.png is not a readable image"):
        run_generate(root, "teacher.height=32", "teacher.width=32")
    assert not list((root / "out" / "dataset").rglob("train-*.parquet"))


def test_image_to_video_from_the_first_frames_of_a_generated_dataset(tmp_path, tiny_ti2v_dir):
    """data.images may name a dataset folder made by generate: row i starts from the first frame of its row i mod n,
    and its shards' checksums bind the new dataset (a changed source refuses to resume)."""
    ti2v = ["teacher.height=32", "teacher.width=32"]
    source = run_generate(make_project(tmp_path / "t2v", tiny_ti2v_dir, num_prompts=2), *ti2v)
    root = make_project(tmp_path / "i2v", tiny_ti2v_dir, num_prompts=3, images=str(source))
    ds = load_local(run_generate(root, *ti2v), cache_dir=str(tmp_path / "cache"))
    assert ds["image_file"] == ["dataset#0", "dataset#1", "dataset#0"]
    first_frames = [decode_video(v)[0] for v in load_local(source, cache_dir=str(tmp_path / "c2"))["video"]]
    for row, want in zip(ds, [0, 1, 0]):
        assert np.abs(np.array(row["image"]).astype(int) - first_frames[want].astype(int)).max() <= 1
    generation = json.loads((root / "out" / "dataset" / "generation.json").read_text())
    assert set(generation["data.images.sha256"]["dataset"]) == {"data/train-00000-of-00001.parquet"}
