"""The training loop: resume == uninterrupted, resume errors, 2 processes == 1 process with the doubled batch,
data determinism, and smoke runs of every method / student kind on the tiny model."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from core.recipe_loader import PROJECT_ROOT, RecipeError, deep_merge
from distill.config import load_recipe

SHAPE = (4, 2, 2, 2)  # latents [C, F, H, W] of 5 frames at 16x16 px for the tiny VAE
CAPTIONS = [
    "a red circle moving left",
    "a blue square moving right",
    "a green cat on black background",
    "a white dog beside it",
    "the red square with a blue circle",
    "an green circle moving right",
]
TOLERANCE = 1e-5
"""Max |Δw| allowed between 2 processes × batch b and 1 process × batch 2b after 4 AdamW steps at lr 1e-2: batch-1
vs batch-2 forwards and gloo's all-reduce round differently, and Adam rescales tiny gradients (measured 4e-7)."""


def write_dataset(folder: Path, n: int = 6, trajectory_sigmas: list[float] | None = None) -> Path:
    """A tiny dataset in the generated layout (synth_data.dataset features), with a COMPLETE marker."""
    from synth_data.dataset import build_features, encode_video, rows_per_row_group, shard_name, write_parquet

    num_traj = len(trajectory_sigmas) if trajectory_sigmas else 0
    features = build_features(["subject"], SHAPE, True, num_traj)
    g = torch.Generator().manual_seed(0)
    video = {"bytes": encode_video(np.zeros((5, 16, 16, 3), np.uint8), 16), "path": None}
    rows = {
        "index": list(range(n)),
        "caption": CAPTIONS[:n],
        "slots": [{"subject": "circle"}] * n,
        "seed": list(range(n)),
        "video": [video] * n,
        "latents": [torch.randn(SHAPE, generator=g).numpy() for _ in range(n)],
    }
    if num_traj:
        rows["trajectory"] = [torch.randn(num_traj, *SHAPE, generator=g).numpy() for _ in range(n)]
        rows["trajectory_sigmas"] = [list(trajectory_sigmas)] * n
    write_parquet(folder / shard_name(0, 1), rows, features, rows_per_row_group(features, n))
    (folder / "COMPLETE").write_text("{}\n")
    return folder


def write_recipe(path: Path, out: Path, pipeline: Path, **sections) -> Path:
    base = {
        "output_dir": str(out),
        "data": {"vocabulary": "synth_data/vocab/toyworld.yaml", "num_prompts": 6},
        "teacher": {
            "pretrained": str(pipeline),
            "dtype": "float32",
            "height": 16,
            "width": 16,
            "num_frames": 5,
            "num_inference_steps": 4,
            "guidance_scale": 2.0,
            "max_sequence_length": 8,
            "negative_prompt": "blurry noise",
        },
        "student": {"name": "s", "kind": "lora", "lora_rank": 4, "lora_alpha": 4.0},
        "method": {"name": "flow_matching", "flow_matching": {"cfg_dropout": 0.2}},
        "train": {
            "max_steps": 4,
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-2,
            "lr_scheduler": "constant_with_warmup",
            "lr_warmup_steps": 3,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 1,
            "ema": True,
            "ema_decay": 0.9,
            "log_with": "none",
        },
    }
    path.write_text(yaml.safe_dump(deep_merge(base, sections)))
    return path


def run_train(recipe_path: Path, *overrides: str) -> Path:
    """`train` in this process with a fresh accelerate state (as a new `python -m distill train` would have)."""
    from accelerate.state import AcceleratorState, GradientState

    from distill.trainer import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train(load_recipe(recipe_path, list(overrides)))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f"{f.relative_to(folder)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_pipeline_dir):
    """4 uninterrupted steps: LoRA, flow matching, 1 process × batch 2 × accumulation 2, EMA, tensorboard."""
    root = tmp_path_factory.mktemp("lora_run")
    write_dataset(root / "out" / "dataset")
    recipe = write_recipe(root / "recipe.yaml", root / "out", tiny_pipeline_dir)
    final = run_train(recipe, "train.log_with=tensorboard")
    return recipe, final


def test_uninterrupted_run_outputs(lora_run):
    recipe, final = lora_run
    student_dir = final.parent
    assert final == student_dir.parent.parent / "students" / "s" / "final" and (final / "COMPLETE").is_file()
    state = json.loads((final / "training_state.json").read_text())
    assert (state["step"], state["data_position"], state["fingerprint"]["num_processes"]) == (4, 16, 1)
    # checkpoints_total_limit=1 kept only the last one; EMA saved next to the final weights
    assert [p.name for p in student_dir.glob("checkpoint-*")] == ["checkpoint-4"]
    w, w_ema = weights(final), weights(student_dir / "final_ema")
    lora_b = [v for k, v in w.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # trained (lora_B starts at 0)
    assert 0 < max_diff(w, w_ema)  # the EMA differs from the last weights
    assert list((student_dir / "logs" / "train").glob("events.out.tfevents.*"))


def test_resume_equals_uninterrupted(lora_run, tmp_path, tiny_pipeline_dir, monkeypatch):
    from distill.flow_matching import FlowMatching

    _, final_a = lora_run
    write_dataset(tmp_path / "out" / "dataset")
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "out", tiny_pipeline_dir)
    real_loss, calls = FlowMatching.loss, []

    def interrupted(self, batch):  # dies in step 3, after checkpoint-2 was written
        calls.append(1)
        if len(calls) > 2 * 2:
            raise KeyboardInterrupt("simulated crash")
        return real_loss(self, batch)

    monkeypatch.setattr(FlowMatching, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(recipe)
    monkeypatch.setattr(FlowMatching, "loss", real_loss)
    student_dir = tmp_path / "out" / "students" / "s"
    assert [p.name for p in student_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (student_dir / "final").exists()
    # the EMA is safetensors + JSON, no pickle; a planted pickle that would run code is never read
    ckpt = student_dir / "checkpoint-2"
    assert (ckpt / "ema.safetensors").is_file() and not list(ckpt.glob("custom_checkpoint_*"))
    pwned = tmp_path / "pwned"
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_RunsCode(str(pwned))))
    with pytest.raises(ValueError, match=r"checkpoint-2: holds pickled state \(custom_checkpoint_0.pkl\)"):
        run_train(recipe, "train.resume_from_checkpoint=latest")
    assert not pwned.exists()
    (ckpt / "custom_checkpoint_0.pkl").unlink()
    for name in ("ema.safetensors", "0_student_trainable.safetensors"):  # cut short (a full disk, a killed copy)
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 3])
        with pytest.raises(ValueError, match=rf"{ckpt / name}: not a readable safetensors file"):
            run_train(recipe, "train.resume_from_checkpoint=latest")
        (ckpt / name).write_bytes(data)
    final_b = run_train(recipe, "train.resume_from_checkpoint=latest")
    assert max_diff(weights(final_a), weights(final_b)) == 0.0
    assert max_diff(weights(final_a.parent / "final_ema"), weights(final_b.parent / "final_ema")) == 0.0


class _RunsCode:
    """Unpickling this touches a file: what a crafted checkpoint could do with a shell command instead."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_resume_errors(lora_run, tmp_path, tiny_pipeline_dir):
    from distill.trainer import train

    recipe, _ = lora_run
    with pytest.raises(
        ValueError,
        match=r"checkpoint-4 was written by another recipe \(student\.kind: checkpoint "
        r"has 'lora', recipe has 'pruned'",
    ):
        train(load_recipe(recipe, ["train.resume_from_checkpoint=latest", "student.kind=pruned"]))
    with pytest.raises(ValueError, match=r"method\.name: checkpoint has 'flow_matching', recipe has 'kd'"):
        train(load_recipe(recipe, ["train.resume_from_checkpoint=latest", "method.name=kd"]))
    with pytest.raises(ValueError, match=r"train\.batch_size: checkpoint has 2, recipe has 1"):
        train(load_recipe(recipe, ["train.resume_from_checkpoint=latest", "train.batch_size=1"]))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: null, but .*students/s already has checkpoint-4"):
        train(load_recipe(recipe))
    fresh = write_recipe(tmp_path / "fresh.yaml", tmp_path / "out", tiny_pipeline_dir)
    with pytest.raises(FileNotFoundError, match=r"latest: no finished checkpoint-<step>/ in .*students/s"):
        train(load_recipe(fresh, ["train.resume_from_checkpoint=latest"]))
    with pytest.raises(FileNotFoundError, match=r"not a finished checkpoint"):
        train(load_recipe(fresh, [f"train.resume_from_checkpoint={tmp_path / 'nowhere'}"]))
    (tmp_path / "out" / "dataset").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'out' / 'dataset'}: no generated dataset"):
        run_train(fresh)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(recipe: Path, out: Path, *overrides: str) -> Path:
    """`accelerate launch` 2 CPU processes of the trainer; returns the run's final/."""
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
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
        str(free_port()),
        "-m",
        "distill.trainer",
        str(recipe),
        f"output_dir={out}",
        "train.batch_size=1",
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "students" / "s" / "final"


@pytest.mark.xdist_group("multiproc")
def test_two_processes_equal_one_process_with_double_batch(lora_run):
    recipe, final_one = lora_run
    out2 = share_dataset(final_one, final_one.parent.parent.parent.parent / "out2")
    final_two = launch_two(recipe, out2)
    state = json.loads((final_two / "training_state.json").read_text())
    assert state["fingerprint"]["num_processes"] == 2 and state["samples_per_step"] == 4
    diff = max_diff(weights(final_one), weights(final_two))
    print(f"1 process × batch 2 vs 2 processes × batch 1: max |Δw| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert max_diff(weights(final_one.parent / "final_ema"), weights(final_two.parent / "final_ema")) <= TOLERANCE


def test_data_is_independent_of_the_process_count(tmp_path, tiny_pipeline_dir):
    from distill.data import training_batches
    from teachers.wan import WanTeacher

    write_dataset(tmp_path / "out" / "dataset")
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    for source, size in (("dataset", 16), ("toyworld", 32), ("prompts", 16)):  # the renderer needs >= 20 px
        common = [f"train.data_source={source}", "train.max_steps=2", f"teacher.height={size}", f"teacher.width={size}"]
        if source == "prompts":  # captions only: a data-free method
            common += ["method.name=dmd", "student.kind=full"]
        one = load_recipe(path, common)
        two = load_recipe(path, [*common, "train.batch_size=1"])
        teacher = WanTeacher.from_config(one.teacher, "cpu")
        single = list(training_batches(one, teacher, start_step=1, num_processes=1, rank=0))
        ranks = [list(training_batches(two, teacher, start_step=1, num_processes=2, rank=r)) for r in (0, 1)]
        # step 1, 1 process: micro-batches [4,5], [6,7]; 2 processes: rank 0 [4], [5]; rank 1 [6], [7]
        assert [b.indices for b in single] == [[4, 5], [6, 7]]
        assert [b.indices for b in ranks[0] + ranks[1]] == [[4], [5], [6], [7]]
        split = ranks[0] + ranks[1]
        for i, b in enumerate(split):
            whole, j = single[i // 2], i % 2
            assert b.captions[0] == whole.captions[j]
            if source == "prompts":  # captions only: the rollout takes the teacher's latent shape
                assert b.x0 is None and b.shape == SHAPE and len(b) == 1
                continue
            # stored latents are bit-equal; rendered clips go through a batched VAE encode (float rounding)
            torch.testing.assert_close(b.x0[0], whole.x0[j], atol=0 if source == "dataset" else 1e-5, rtol=0)
            assert torch.equal(b.generators[0].get_state(), whole.generators[j].get_state())
        assert len({c for b in single for c in b.captions}) > 1  # not one repeated sample


def test_toyworld_pool_resume_ranks_and_refresh(tiny_pipeline_dir, tmp_path):
    """The rolling pool: rebuilt on resume it yields the same batches; 2 ranks split 1 rank's; R slots per step."""
    from distill.data import RenderedPool, training_batches
    from teachers.wan import WanTeacher

    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    common = [
        "train.data_source=toyworld",
        "train.max_steps=5",
        "teacher.height=32",
        "teacher.width=32",
        "train.toyworld_pool=8",
        "train.toyworld_pool_refresh=2",
    ]
    one = load_recipe(path, common)
    teacher = WanTeacher.from_config(one.teacher, "cpu")
    through = list(training_batches(one, teacher, start_step=0, num_processes=1, rank=0))
    resumed = list(training_batches(one, teacher, start_step=3, num_processes=1, rank=0))
    assert len(through) == 10 and len(resumed) == 4
    for a, b in zip(through[6:], resumed, strict=True):
        assert a.indices == b.indices and a.captions == b.captions
        assert torch.equal(a.x0, b.x0)  # same encode groups -> same bits
    two = load_recipe(path, [*common, "train.batch_size=1"])
    ranks = [list(training_batches(two, teacher, start_step=3, num_processes=2, rank=r)) for r in (0, 1)]
    for i, b in enumerate(ranks[0][:2] + ranks[1][:2]):  # step 3: rank 0 [12], [13]; rank 1 [14], [15]
        whole, j = resumed[i // 2], i % 2
        assert b.indices == [whole.indices[j]] and b.captions[0] == whole.captions[j]
        assert torch.equal(b.x0[0], whole.x0[j])

    from core.vocabulary import load_vocabulary

    vocab = load_vocabulary("synth_data/vocab/toyworld.yaml")
    pool = RenderedPool(vocab, 8, 2, 0, "balanced", 5, 32, 32, encode=lambda v: v * 2)
    pool.build(0)
    before = pool.x0.clone()
    pool.step(0)  # clips 8, 9 -> slots 0, 1
    changed = [j for j in range(8) if not torch.equal(before[j], pool.x0[j])]
    assert changed == [0, 1]
    pool.step(3)  # clips 14, 15 -> slots 6, 7
    assert pool.captions[6] == pool._rows(0)[14]["prompt"]
    with pytest.raises(ValueError, match="multiple of"):
        load_recipe(path, [*common, "train.toyworld_pool=7"])


def share_dataset(final: Path, out: Path) -> Path:
    """Point another output_dir at the lora run's dataset."""
    out.mkdir(parents=True, exist_ok=True)
    os.symlink(final.parent.parent.parent / "dataset", out / "dataset")
    return out


def test_pruned_feature_kd_and_full_toyworld_smoke(lora_run, tmp_path):
    from teachers.tiny import tiny_transformer

    recipe, final = lora_run
    short = ["train.max_steps=2", "train.gradient_accumulation_steps=1", "train.batch_size=1", "train.ema=false"]
    # pruned student (teacher block 1 only), output + feature KD against teacher block 1
    out = share_dataset(final, tmp_path / "p")
    final_p = run_train(
        recipe,
        *short,
        f"output_dir={out}",
        "student.name=pruned",
        "student.kind=pruned",
        "student.keep_blocks=[1]",
        "method.name=kd",
        "method.kd.feature_weight=1.0",
        "method.kd.layer_map={0: 1}",
    )
    w = weights(final_p)
    assert (final_p / "COMPLETE").is_file() and not (final_p.parent / "final_ema").exists()
    teacher_q = tiny_transformer().blocks[1].attn1.to_q.weight
    trained_q = next(v for k, v in w.items() if k.endswith("blocks.0.attn1.to_q.weight"))
    assert trained_q.shape == teacher_q.shape and not torch.equal(trained_q, teacher_q)
    assert not any("blocks.1." in k for k in w)  # one block only
    # a full copy trained on freshly rendered toy-world clips
    final_f = run_train(
        recipe,
        *short,
        f"output_dir={tmp_path / 'f'}",
        "student.name=full",
        "student.kind=full",
        "train.data_source=toyworld",
        "teacher.height=32",
        "teacher.width=32",
    )
    assert (final_f / "COMPLETE").is_file() and any("blocks.1." in k for k in weights(final_f))


def test_trajectory_smoke(tmp_path, tiny_pipeline_dir):
    write_dataset(tmp_path / "out" / "dataset", trajectory_sigmas=[1.0, 0.75, 0.0])
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        student={"denoising_steps": [1000, 500], "experts": 2, "expert_boundaries": [0.9]},
        method={"name": "trajectory"},
        train={"max_steps": 2, "gradient_accumulation_steps": 1, "ema": False},
    )
    final = run_train(recipe)
    # σ = 1.0 trains expert 0 and σ = shift(0.5) = 0.75 expert 1: both adapters moved
    for expert in ("expert_0", "expert_1"):
        lora_b = [v for k, v in weights(final).items() if k.startswith(expert) and "lora_B" in k]
        assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    write_dataset(tmp_path / "bad" / "dataset")  # no trajectory column
    with pytest.raises(ValueError, match="no `trajectory` column; set data.trajectory_steps"):
        run_train(recipe, f"output_dir={tmp_path / 'bad'}")


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(lora_run, monkeypatch):
    from distill.trainer import make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as on a CPU-only install
    recipe = load_recipe(lora_run[0], ["train.optimizer=adamw8bit"])
    with pytest.raises(ValueError, match="train.optimizer: adamw8bit needs bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], recipe.train)


def test_checkpoint_without_a_newer_key_resumes_only_at_its_default(tmp_path):
    """A key added to the toolkit after a checkpoint was written counts as its default, nothing else."""
    import json

    from distill.checkpoints import TRAINING_STATE, check_checkpoint

    expected = {"student.kind": "full", "student.sink": 0, "method.name": "flow_matching"}
    (tmp_path / TRAINING_STATE).write_text(
        json.dumps({"step": 2, "fingerprint": {"student.kind": "full", "method.name": "flow_matching"}})
    )
    assert check_checkpoint(tmp_path, expected)["step"] == 2
    with pytest.raises(ValueError, match=r"student.sink: checkpoint has 0, recipe has 3"):
        check_checkpoint(tmp_path, {**expected, "student.sink": 3})
    with pytest.raises(ValueError, match=r"student.kind: checkpoint has 'full', recipe has 'lora'"):
        check_checkpoint(tmp_path, {**expected, "student.kind": "lora"})


def test_export_from_a_checkpoint_equals_the_finished_run(lora_run):
    """export.checkpoint: the last checkpoint of a finished run holds the same weights as final/ and final_ema/."""
    from distill.export_stage import checkpoint_dir, student_from_checkpoint
    from students.student import Student
    from teachers.wan import WanTeacher

    recipe_path, final = lora_run
    student_dir = final.parent
    for use_ema, folder in ((True, "final_ema"), (False, "final")):
        recipe = load_recipe(recipe_path, ["export.checkpoint=latest", f"export.use_ema={str(use_ema).lower()}"])
        teacher = WanTeacher.from_config(recipe.teacher)
        path = checkpoint_dir(recipe, "latest")
        assert path == checkpoint_dir(recipe, "checkpoint-4") == student_dir / "checkpoint-4"
        got = student_from_checkpoint(recipe, teacher, path).trainable_state_dict()
        fresh = WanTeacher.from_config(recipe.teacher)  # a LoRA student's adapter lives on its teacher's transformer
        want = Student.from_pretrained(
            student_dir / folder, fresh.pipe.transformer, cfg=recipe.student
        ).trainable_state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), folder
    with pytest.raises(FileNotFoundError, match="checkpoint-4"):
        checkpoint_dir(recipe, "checkpoint-3")


def test_prompts_file_formats_and_errors(tmp_path):
    from distill.data import read_prompts_file

    text = tmp_path / "prompts.txt"
    text.write_text("# a comment\n\n  a red circle moving left  \na blue square\n")
    assert read_prompts_file(text) == ["a red circle moving left", "a blue square"]
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "a red circle", "seed": 1}\n\n{"prompt": "# not a comment in jsonl"}\n')
    assert read_prompts_file(rows) == ["a red circle", "# not a comment in jsonl"]
    rows.write_text('{"prompt": "a red circle"}\n{"caption": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected a JSON object with a non-empty string `prompt`"):
        read_prompts_file(rows)
    rows.write_text("not json\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1:"):
        read_prompts_file(rows)
    text.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts_file(text)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_prompts_file(tmp_path / "missing.txt")


def test_prompts_source_draws_lines_and_refuses_what_needs_latents(tmp_path, tiny_pipeline_dir):
    from distill.data import training_batches
    from teachers.wan import WanTeacher

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS) + "\n")
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    recipe = load_recipe(
        path,
        [
            "method.name=dmd",
            "student.kind=full",
            "train.data_source=prompts",
            f"train.prompts_file={prompts}",
            "train.max_steps=8",
        ],
    )
    teacher = WanTeacher.from_config(recipe.teacher, "cpu")
    batches = list(training_batches(recipe, teacher, start_step=0, num_processes=1, rank=0))
    seen = [c for b in batches for c in b.captions]
    assert len(seen) == 32 and set(seen) <= set(CAPTIONS) and len(set(seen)) == len(CAPTIONS)  # no dataset read
    assert not (tmp_path / "out" / "dataset").exists()
    # without a file: every step composes its own balanced prompts from the vocabulary (4 values per slot, 4 per step)
    from collections import Counter

    from core.seeding import derive_seed
    from core.vocabulary import load_vocabulary
    from synth_data.composer import compose

    composed = load_recipe(
        path,
        [
            "method.name=dmd",
            "student.kind=full",
            "train.data_source=prompts",
            "train.max_steps=3",
            "train.gradient_accumulation_steps=1",
            "train.batch_size=4",
        ],
    )
    steps = [b.captions for b in training_batches(composed, teacher, start_step=0, num_processes=1, rank=0)]
    vocab = load_vocabulary(PROJECT_ROOT / "synth_data/vocab/toyworld.yaml")
    rows = [compose(vocab, 4, derive_seed(0, -(s + 1)), "balanced") for s in range(3)]
    assert steps == [[r["prompt"] for r in step] for step in rows]
    assert len({tuple(c) for c in steps}) == 3  # fresh every step, not one set repeated
    assert all(max(Counter(r["slots"]["subject"] for r in step).values()) == 1 for step in rows)
    # methods that train on clean latents or trajectories, and the GAN's real clips, need another source
    for override, match in (
        ([], "method 'flow_matching' trains on clean latents"),
        (["method.name=dmd", "method.dmd.gan_weight=0.01"], "gan_weight > 0 needs them"),
        (
            ["method.name=self_forcing", "student.kind=causal", "method.self_forcing.given_first_chunk=0.5"],
            "given_first_chunk > 0 needs them",
        ),
        (
            ["method.name=self_forcing", "student.kind=causal", "method.self_forcing.ode_regression_weight=0.5"],
            "the ODE anchor reads the teacher's stored trajectories, and train.data_source is prompts",
        ),
    ):
        with pytest.raises(RecipeError, match=match):
            load_recipe(path, ["train.data_source=prompts", *override])
    with pytest.raises(RecipeError, match="prompts_file: only read with data_source: prompts"):
        load_recipe(path, [f"train.prompts_file={prompts}"])


def test_edited_prompts_file_refuses_to_resume(tmp_path, tiny_pipeline_dir):
    from distill.checkpoints import check_checkpoint, fingerprint, write_state

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    overrides = ["method.name=dmd", "student.kind=full", "train.data_source=prompts", f"train.prompts_file={prompts}"]
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    write_state(checkpoint, 1, 2, fingerprint(load_recipe(path, overrides), 1))
    assert check_checkpoint(checkpoint, fingerprint(load_recipe(path, overrides), 1))["step"] == 1
    prompts.write_text("a red circle\na blue square\n")
    with pytest.raises(ValueError, match="train.prompts_sha256: checkpoint has"):
        check_checkpoint(checkpoint, fingerprint(load_recipe(path, overrides), 1))
    bad = tmp_path / "bad.jsonl"  # bad rows fail before any model loads
    bad.write_text('{"no": "prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1:"):
        fingerprint(load_recipe(path, [*overrides[:3], f"train.prompts_file={bad}"]), 1)


def test_run_of_a_captions_only_recipe_composes_and_generates_nothing(tmp_path, tiny_pipeline_dir, monkeypatch):
    import distill.cli as cli

    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    called = []
    for stage in ("compose", "generate", "train", "export"):
        monkeypatch.setattr(cli, f"stage_{stage}", lambda recipe, stage=stage: called.append(stage))
    cli.stage_run(load_recipe(path, ["method.name=dmd", "student.kind=full", "train.data_source=prompts"]))
    assert called == ["train", "export"]  # a Wan teacher's dataset takes GPU-hours: prompts need none
    called.clear()
    cli.stage_run(load_recipe(path))
    assert called == ["compose", "generate", "train", "export"]


@pytest.mark.parametrize("fault, max_grad_norm", [("loss", "1.0"), ("gradient", "0")])
def test_non_finite_loss_or_gradient_stops_before_the_update(
    tmp_path, tiny_pipeline_dir, monkeypatch, fault, max_grad_norm, capsys
):
    """A NaN loss (or a finite loss with a NaN gradient, with clipping off) at step 3 of 4: the CLI exits 2 with one
    line naming the step and the term; checkpoint-2 (finite) is kept; nothing later, no final, no COMPLETE."""
    from distill.cli import main
    from distill.flow_matching import FlowMatching

    write_dataset(tmp_path / "out" / "dataset")
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tmp_path / "out", tiny_pipeline_dir, train={"checkpoints_total_limit": 3}
    )
    real, calls = FlowMatching.loss, []

    def faulty(self, batch):
        loss, logs = real(self, batch)
        calls.append(1)
        if len(calls) == 5:  # step 3's first micro-batch (2 micro-batches per step)
            if fault == "loss":
                loss = loss * float("nan")
            else:  # value 0, gradient 0/0 = NaN
                p = next(q for q in self.student.parameters() if q.requires_grad)
                loss = loss + torch.sqrt((p - p.detach()).abs()).sum()
        return loss, logs

    monkeypatch.setattr(FlowMatching, "loss", faulty)
    assert main(["train", str(recipe), f"train.max_grad_norm={max_grad_norm}"]) == 2
    err = [line[line.index("error:") :] for line in capsys.readouterr().err.splitlines() if "error:" in line]
    term = "loss is nan" if fault == "loss" else "gradient norm is nan"
    assert len(err) == 1 and "train: step 3: the " + term in err[0] and "checkpoint-2 is the last checkpoint" in err[0]
    student_dir = tmp_path / "out" / "students" / "s"
    assert sorted(p.name for p in student_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (student_dir / "final").exists()
    assert all(torch.isfinite(v).all() for v in weights(student_dir / "checkpoint-2").values())


def test_run_and_export_refuse_weights_trained_under_another_recipe(lora_run, capsys):
    """`run` skips a finished student only when its training config is the recipe's; `export` would otherwise state
    the new learning rate on the old weights' card. Keys that do not touch the weights (logging) may change."""
    from distill.checkpoints import check_finished
    from distill.cli import main

    recipe, final = lora_run
    check_finished(load_recipe(recipe, ["train.log_every=7", "train.checkpointing_steps=3"]))  # same weights
    for override, key in (
        ("train.learning_rate=0.5", "train.learning_rate"),
        ("method.flow_matching.cfg_dropout=0.4", "method.flow_matching.cfg_dropout"),
    ):
        with pytest.raises(ValueError, match=rf"final: trained under another recipe \({key}: trained with"):
            check_finished(load_recipe(recipe, [override]))
        before = sorted(p.name for p in (final.parent).iterdir())
        assert main(["export", str(recipe), override]) == 2
        assert key in capsys.readouterr().err
        assert sorted(p.name for p in final.parent.iterdir()) == before  # nothing written


def test_a_run_finished_before_a_key_existed_counts_as_its_default(lora_run, tmp_path):
    """A key added to the toolkit after a run finished (absent from its stored config) reads as the key's default:
    the run still exports; the key set to something else is a change."""
    import shutil

    from distill.checkpoints import TRAINING_STATE, check_finished

    recipe, final = lora_run
    out = tmp_path / "out"
    shutil.copytree(final.parent.parent.parent, out)
    state_file = out / "students" / "s" / "final" / TRAINING_STATE
    state = json.loads(state_file.read_text())
    for key in ("student.init_lora", "teacher.lora"):
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    check_finished(load_recipe(recipe, [f"output_dir={out}"]))
    with pytest.raises(ValueError, match=r"student.init_lora: trained with \[\], recipe has \[\{'path'"):
        check_finished(load_recipe(recipe, [f"output_dir={out}", "student.init_lora=[{path: a.safetensors}]"]))


def test_run_checks_the_dataset_fingerprint_before_skipping_generate(tmp_path, tiny_pipeline_dir, capsys):
    from distill.cli import main

    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        data={"num_prompts": 2, "shard_size": 2, "batch_size": 2},
    )
    data_only = tmp_path / "data.yaml"
    spec = yaml.safe_load(recipe.read_text())
    data_only.write_text(yaml.safe_dump({k: spec[k] for k in ("output_dir", "data", "teacher")}))
    assert main(["run", str(data_only)]) == 0
    dataset = sorted(p.name for p in (tmp_path / "out" / "dataset").rglob("*"))
    assert main(["run", str(data_only), "teacher.guidance_scale=3.0"]) == 2
    assert "teacher.guidance_scale" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "dataset").rglob("*")) == dataset


class FakeWandb(types.ModuleType):
    """Stands in for the `wandb` package (not installed in the test environment): records what accelerate's
    WandBTracker sends it, including the mode it finds in the environment when the run starts."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []
        outer = self

        class Run:
            class config:  # noqa: N801 (wandb's attribute name)
                @staticmethod
                def update(values, allow_val_change=False):
                    outer.stored = dict(values)

            @staticmethod
            def log(values, step=None, **kwargs):
                outer.logged.append((step, dict(values)))

            @staticmethod
            def finish():
                pass

        self.Run = Run
        self.config = Run.config  # module-level `wandb.config`, as the real package has

        class Image:
            def __init__(self, array):
                self.array = np.asarray(array)

        self.Image = Image

    def init(self, project=None, **kwargs):
        self.inits.append({"project": project, "mode": os.environ.get("WANDB_MODE"), **kwargs})
        return self.Run


def test_validation_previews_and_trackers(tmp_path, tiny_pipeline_dir, monkeypatch):
    """train.validation_steps writes GIFs of fixed prompts and noise and logs frame strips to tensorboard and wandb
    (offline when there is no API key); a tracker that is not installed is named before training starts."""
    import importlib.util as iu

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_dataset(tmp_path / "out" / "dataset")
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "out", tiny_pipeline_dir)
    with pytest.raises(ValueError, match=r"train.log_with: wandb is not installed; `pip install wandb`"):
        run_train(recipe, "train.log_with=[tensorboard,wandb]")
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real_find_spec = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: object() if name == "wandb" else real_find_spec(name, *a))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    final = run_train(
        recipe,
        "train.log_with=[tensorboard,wandb]",
        "train.validation_steps=2",
        "train.validation_prompts=[a red circle,a blue square]",
    )
    val = final.parent / "validation"
    assert sorted(p.name for p in val.iterdir()) == ["step-000002", "step-000004"]
    gifs = {s: [Image.open(val / s / f"{i}.gif") for i in range(2)] for s in ("step-000002", "step-000004")}
    for images in gifs.values():
        assert [im.size for im in images] == [(16, 16)] * 2 and all(im.n_frames == 5 for im in images)
    assert (val / "step-000002" / "prompts.txt").read_text() == "0\ta red circle\n1\ta blue square\n"
    events = next((final.parent / "logs" / "train").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert {"validation/0", "validation/1"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("validation/0")] == [2, 4]
    (init,) = fake.inits
    assert init["project"] == "wan-distill" and init["name"] == "s" and init["mode"] == "offline"
    assert fake.stored["student.name"] == "s"
    images = [(step, v) for step, v in fake.logged if "validation/0" in v]
    assert [step for step, _ in images] == [2, 4]
    strip = images[0][1]["validation/0"][0].array
    assert strip.shape == (16, 48, 3) and strip.dtype == np.uint8  # first, middle and last frame side by side
    assert any(k.startswith("loss") for _, v in fake.logged for k in v)
