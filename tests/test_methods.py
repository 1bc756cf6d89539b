"""The method table (distill/methods.py): adding a method is one file plus one table line, and everything the
recipe and the trainer know about methods derives from the table."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_trainer import write_dataset, write_recipe

from core.recipe_loader import PROJECT_ROOT, RecipeError
from distill.config import MethodConfig, load_recipe
from distill.methods import METHODS

ANCHOR = textwrap.dedent('''
    """A method written for the test: pulls the student's velocity at a random level towards zero."""
    from dataclasses import dataclass

    from core.flow import add_noise, timestep
    from core.seeding import rand_per_sample, randn_per_sample


    class Anchor:
        @dataclass(kw_only=True)
        class Config:
            weight: float = 1.0

        two_player = False
        needs_trajectory = False
        data_free = False
        student_kinds = ("lora",)

        @classmethod
        def from_recipe(cls, recipe, *, teacher, student, unwrapped, critic=None, num_processes=1):
            return cls(recipe.method.anchor, student)

        def __init__(self, config, student):
            self.config, self.student = config, student

        def loss(self, batch):
            sigma = rand_per_sample(batch.generators, batch.device)
            x = add_noise(batch.x0, randn_per_sample(batch.generators, batch.shape, batch.device), sigma)
            v = self.student(x, timestep(sigma), batch.cond.prompt_embeds)
            loss = self.config.weight * v.float().square().mean()
            return loss, {"loss/anchor": loss.detach()}
''')

RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])                 # where the method's file lives
    import distill.methods
    from anchor_method import Anchor
    distill.methods.METHODS["anchor"] = Anchor      # the one table line
    from distill.cli import main
    sys.exit(main(["train", *sys.argv[2:]]))
""")


def test_the_recipe_section_and_the_trainer_derive_from_the_table():
    import dataclasses

    assert [f.name for f in dataclasses.fields(MethodConfig)] == ["name", *METHODS]
    config = MethodConfig(name="self_forcing")
    assert config.critic_config() is config.self_forcing
    assert {n for n, m in METHODS.items() if m.two_player} == {"dmd", "self_forcing"}
    assert {n for n, m in METHODS.items() if m.needs_trajectory} == {"trajectory", "ode_regression"}
    with pytest.raises(ValueError, match="'kd' has no critic"):
        MethodConfig(name="kd").critic_config()


def test_a_new_method_is_one_file_and_one_table_line(tmp_path, tiny_pipeline_dir):
    (tmp_path / "anchor_method.py").write_text(ANCHOR)
    (tmp_path / "run.py").write_text(RUN)
    write_dataset(tmp_path / "out" / "dataset")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        method={"name": "anchor", "anchor": {"weight": 2.0}},
        train={"max_steps": 2, "ema": False, "gradient_accumulation_steps": 1},
    )
    with pytest.raises(RecipeError, match="method.anchor: unknown key"):  # without the table line
        load_recipe(recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(recipe)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "out" / "students" / "s" / "final"
    assert (final / "COMPLETE").is_file()
    # the anchor trained the adapter: LoRA B starts at zero and moved
    lora = {k: v for f in final.rglob("*.safetensors") for k, v in load_file(str(f)).items() if "lora_B" in k}
    assert lora and max(float(v.abs().max()) for v in lora.values()) > 0
    bad = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(recipe), "student.kind=full", "student.name=f"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "method anchor trains only lora students" in bad.stderr
    assert not (Path(tmp_path) / "out" / "students" / "f").exists()


KIND_RUN = textwrap.dedent("""
    import sys
    import students.config as c
    c.KINDS["causal_pruned"] = c.StudentKind(adapters=False, prunes=True, causal=True)   # the one table line
    from distill.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
""")


def test_a_new_student_kind_is_one_table_line(tmp_path, tiny_pipeline_dir):
    """A half-depth causal student (pruned + block-causal), which no shipped kind is: one line in
    `students.config.KINDS`, then trained 2 steps by ODE regression on trajectories."""
    import json

    from test_trainer import write_dataset

    (tmp_path / "run.py").write_text(KIND_RUN)
    write_dataset(tmp_path / "out" / "dataset", trajectory_sigmas=[1.0, 0.75, 0.0])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        student={"kind": "causal_pruned", "keep_blocks": [1], "frames_per_block": 1, "denoising_steps": [1000, 500]},
        method={"name": "ode_regression"},
        train={"max_steps": 2, "ema": False, "gradient_accumulation_steps": 1},
    )
    with pytest.raises(RecipeError, match="student.kind"):  # without the table line the kind is unknown
        load_recipe(recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(recipe)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "out" / "students" / "s" / "final"
    assert json.loads((final / "student.json").read_text())["config"]["kind"] == "causal_pruned"
    config = json.loads((final / "expert_0" / "config.json").read_text())
    teacher = json.loads((tiny_pipeline_dir / "transformer" / "config.json").read_text())
    assert config["num_layers"] == 1 < teacher["num_layers"]
    weights = load_file(str(final / "expert_0" / "diffusion_pytorch_model.safetensors"))
    assert any(k.startswith("blocks.0.") for k in weights) and not any(k.startswith("blocks.1.") for k in weights)
