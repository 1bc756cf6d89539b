"""The `--dry-run` memory plan against the tensors the trainer's roles really hold, on tiny models: weights, gradients,
AdamW moments, EMA, per role, exactly; and its total, activations included, against the peak of real training runs."""

from __future__ import annotations

import pytest
import torch
from test_trainer import write_recipe

from distill.config import load_recipe
from distill.memory_plan import GIB, plan_memory


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def held(recipe) -> dict[tuple[str, str], int]:
    """What the trainer's roles hold after one optimizer step, built as `distill.trainer` builds them."""
    from diffusers.training_utils import EMAModel, cast_training_params

    from distill.methods import METHODS
    from distill.trainer import make_critic, make_optimizer
    from students.student import build_student
    from teachers.wan import WanTeacher

    teacher = WanTeacher.from_config(recipe.teacher, "cpu")
    student = build_student(recipe.student, teacher.pipe.transformer)
    roles = {"student": student}
    if METHODS[recipe.method.name].two_player:
        roles["critic"] = make_critic(recipe, teacher)
    out = {}
    adapters = set()
    for role, module in roles.items():
        cast_training_params(module, torch.float32)
        params = module.trainable_parameters()
        adapters |= {id(p) for p in params}
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer = make_optimizer(params, recipe.train)
        optimizer.step()
        moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
        out[(role, "trainable")] = nbytes(params)
        out[(role, "gradients")] = nbytes(p.grad for p in params)
        out[(role, "moments")] = nbytes(moments)
        if role == "student" and recipe.train.ema:
            out[(role, "EMA")] = nbytes(EMAModel(params).shadow_params)
    frozen = [p for p in teacher.pipe.transformer.parameters() if id(p) not in adapters]
    out[("teacher", "transformer")] = nbytes(frozen)
    out[("text encoder", "")] = nbytes(teacher.pipe.text_encoder.parameters())
    out[("VAE", "")] = nbytes(teacher.pipe.vae.parameters())
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=kd", "train.ema=true"],  # LoRA student inside the teacher, EMA
        ["method.name=kd", "teacher.dtype=float16"],  # float16: T5's `wo` and Wan's norms stay float32
        [  # full student, LoRA critic, gradients held in their own phase only
            "method.name=dmd",
            "student.kind=full",
            "student.denoising_steps=[1000,500]",
            "train.gradient_accumulation_steps=1",
        ],
        [  # causal student, full critic, bf16 teacher
            "method.name=self_forcing",
            "student.kind=causal",
            "student.frames_per_block=1",
            "student.denoising_steps=[1000,500]",
            "method.self_forcing.critic=full",
            "teacher.dtype=bfloat16",
        ],
        [  # Self-Forcing's order: the student's gradients are gone before the critic's pass
            "method.name=self_forcing",
            "student.kind=causal",
            "student.frames_per_block=1",
            "student.denoising_steps=[1000,500]",
            "method.self_forcing.critic_after_generator=true",
            "train.gradient_accumulation_steps=1",
        ],
    ],
)
def test_plan_equals_what_the_roles_hold(overrides, tmp_path, tiny_pipeline_dir):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir), overrides)
    plan = plan_memory(recipe)
    real = held(recipe)
    planned = {}
    for line in plan.lines:
        if line.role == "activations":
            continue
        kind = next((k for k in ("trainable", "gradients", "moments", "EMA", "transformer") if k in line.what), "")
        planned[(line.role, kind)] = line.bytes
    assert planned.keys() == real.keys()
    for key, value in real.items():
        assert planned[key] == value, key
    assert "configs of" in plan.source and plan.activations
    # the step's peak: what is held all step, plus the larger of the student's and the critic's phase: its
    # activations and its gradients (unless micro-batches accumulate them all step); in the trainer's default order
    # the critic's pass runs before the student's update, so the student's gradients are alive in both
    gradients = {role: v for (role, kind), v in real.items() if kind == "gradients"}
    if recipe.train.gradient_accumulation_steps > 1:
        gradients = dict.fromkeys(gradients, 0)
    activations = {line.phases: line.bytes for line in plan.lines if line.role == "activations"}
    student = gradients["student"] + activations[("student",)]
    critic = 0
    if "critic" in gradients:
        before = 0 if recipe.method.critic_config().critic_after_generator else gradients["student"]
        critic = before + gradients["critic"] + activations[("critic",)]
    assert set(activations) == {(role,) for role in gradients}
    assert plan.total == sum(real.values()) - sum(gradients.values()) + max(student, critic)


def test_plan_of_a_ti2v_teacher_equals_what_it_holds(tmp_path, tiny_ti2v_dir):
    """Wan2.2 TI2V's layout: the 48-channel residual VAE (with its 2x2 patchify) and a 48-channel transformer."""
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_ti2v_dir),
        ["method.name=kd", "teacher.height=32", "teacher.width=32"],
    )
    plan, real = plan_memory(recipe), held(recipe)
    states = sum(x.bytes for x in plan.lines if x.role != "activations")
    assert states == sum(real.values())
    assert next(x.bytes for x in plan.lines if x.role == "VAE") == real[("VAE", "")]


def test_fsdp_divides_the_sharded_roles_and_offload_keeps_one(tmp_path, tiny_pipeline_dir):
    recipe_path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    whole = {(x.role, x.what.split(" / ")[0]): x.bytes for x in plan_memory(load_recipe(recipe_path)).lines}
    sharded = plan_memory(load_recipe(recipe_path, ["train.sharding=fsdp"]), processes=4)
    for line in sharded.lines:
        if line.role == "activations":  # each process runs its own batch: not divided
            continue
        factor = 1 if line.role in ("text encoder", "VAE") else 4
        assert line.bytes * factor == whole[(line.role, line.what.split(" / ")[0])]
    offload = plan_memory(load_recipe(recipe_path, ["teacher.offload=group"]))
    block = offload.lines[0]
    assert "one block" in block.what and block.bytes < whole[("teacher", next(k for r, k in whole if r == "teacher"))]
    assert "does NOT fit" in sharded.table(gpu_memory_gib=1e-9) and "GiB left" in sharded.table(80.0)
    assert GIB == 2**30


def test_dry_run_prints_the_plan(tmp_path, tiny_pipeline_dir, capsys):
    from distill.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    assert main(["train", str(recipe), "--dry-run", "--gpu-memory", "80", "--processes", "2"]) == 0
    err = capsys.readouterr().err
    assert "memory plan per GPU (2 processes; configs of" in err and "GiB left" in err and "activations" in err
    assert main(["train", str(recipe), "--dry-run", "--gpu-memory", "0.000001"]) == 0
    assert "does NOT fit" in capsys.readouterr().err
    assert main(["generate", str(recipe), "--dry-run", "--gpu-memory", "80"]) == 0  # the teacher's parts only
    roles = [line.split()[0] for line in capsys.readouterr().err.splitlines() if line.startswith("  ")]
    assert roles == ["teacher", "text", "VAE", "total", "against"]


def test_a_teacher_an_earlier_stage_writes_leaves_the_dry_run_passing(tmp_path, tiny_pipeline_dir, capsys):
    from distill.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tmp_path / "not_yet")
    assert main(["train", str(recipe), "--dry-run"]) == 0
    assert "memory plan: not available: teacher.pretrained: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, shape, checkpointing",
    [
        ("kd_lora", "5x64x64", True),
        ("kd_lora", "9x128x128", False),
        ("trajectory_lora", "9x128x128", False),
        ("dmd_full", "9x128x128", False),
        ("self_forcing", "9x96x96", False),
        ("self_forcing", "9x128x128", True),
    ],
)
def test_plan_is_within_15_percent_of_a_real_runs_peak(case, shape, checkpointing, tmp_path):
    """`benchmarks.memory_plan`'s runs (a small pipeline where activations are most of the memory): the peak of the
    CPU storage alive while `train` runs, against the plan's total."""
    from benchmarks.memory_plan import measure

    r = measure(case, shape, checkpointing, tmp_path)
    assert r["activations"] > 0.3 * r["plan"] or checkpointing  # the activations weigh in the total
    assert abs(r["measured"] / r["plan"] - 1) < 0.15, r
