"""Recipes: typed loading, dotted-key errors, one `base:` level, overrides, the CLI's --dry-run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.recipe_loader import RecipeError
from distill.cli import main
from distill.config import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

MINIMAL = {
    "output_dir": "out",
    "data": {"vocabulary": "synth_data/vocab/wan.yaml", "num_prompts": 4},
    "teacher": {"pretrained": "some/folder"},
}


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.output_dir and recipe.data.num_prompts >= 1 and recipe.teacher.pretrained
    # The resolved recipe is plain YAML that loads back to the same recipe.
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()


def test_at_least_the_issue_recipes_ship():
    names = {p.name for p in RECIPES}
    assert {"wan21_t2v_1.3b_synth.yaml", "wan22_t2v_a14b_synth.yaml"} <= names


def test_wan_recipes_carry_the_documented_settings():
    r = load_recipe(ROOT / "recipes/wan21_t2v_1.3b_synth.yaml")
    t = r.teacher
    assert (t.pretrained, t.height, t.width, t.num_frames, t.num_inference_steps, t.guidance_scale, t.shift) == (
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        480,
        832,
        81,
        50,
        5.0,
        3.0,
    )
    r = load_recipe(ROOT / "recipes/wan22_t2v_a14b_synth.yaml")
    assert r.teacher.pretrained == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert (r.teacher.dtype, r.teacher.offload) == ("bfloat16", "group")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.num_promptz=3", "data.num_promptz: unknown key (did you mean data.num_prompts?)"),
        ("data.num_prompts=high", "data.num_prompts: expected int, got 'high'"),
        ("data.num_prompts=0", "data.num_prompts: must be >= 1, got 0"),
        ("teacher.dtype=fp8", "teacher.dtype: expected one of"),
        ("teacher.shift=-1", "teacher.shift: must be > 0"),
        ("train.max_steps=1.5", "train.max_steps: expected int, got 1.5"),
        ("bogus=1", "bogus: unknown key"),
        ("data=3", "data: expected a mapping"),
        ("teacher.guidance_scale=.nan", "teacher.guidance_scale: must be a finite number, got nan"),
        ("teacher.shift=.inf", "teacher.shift: must be a finite number, got inf"),
        ("train.learning_rate=-1e999", "train.learning_rate: must be a finite number"),
        ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0"),
        ("train.adam_betas=[0.9]", "train.adam_betas: need two values in [0, 1)"),
        ("train.adam_betas=[0.9,1.0]", "train.adam_betas: need two values in [0, 1)"),
    ],
)
def test_bad_values_name_the_dotted_key(tmp_path, override, message):
    path = write(tmp_path, "r.yaml", MINIMAL)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, [override])
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_missing_required_key_is_named(tmp_path):
    data = {**MINIMAL, "teacher": {}}
    with pytest.raises(RecipeError, match=r"teacher.pretrained: required key is missing"):
        load_recipe(write(tmp_path, "r.yaml", data))


def test_base_inheritance_is_one_level(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL)
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "data": {"num_prompts": 9}})
    r = load_recipe(child, ["data.seed=7"])
    assert (r.data.num_prompts, r.data.seed, r.teacher.pretrained) == (9, 7, "some/folder")
    assert r.data.vocabulary == MINIMAL["data"]["vocabulary"]  # deep-merged, not replaced
    write(tmp_path, "grandchild.yaml", {"base": "child.yaml"})
    with pytest.raises(RecipeError, match="only one level"):
        load_recipe(tmp_path / "grandchild.yaml")


def test_student_needs_method(tmp_path):
    data = {**MINIMAL, "student": {"name": "s", "kind": "lora"}}
    with pytest.raises(RecipeError, match="student/method"):
        load_recipe(write(tmp_path, "r.yaml", data))


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_dry_run_prints_resolved_recipe(tmp_path, capsys):
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert main(["compose", str(path), "data.seed=3", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["seed"] == 3 and printed["data"]["mode"] == "balanced"
    assert printed["teacher"]["guidance_scale"] == 5.0
    assert main(["compose", str(path), "--dry-run", "data.seed=4", "data.num_prompts=2"]) == 0  # overrides after it
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["data"]["seed"], printed["data"]["num_prompts"]) == (4, 2)


def test_dry_run_runs_the_stage_checks(capsys):
    """--dry-run refuses what the stage would refuse at start-up, before any model loads, in one line."""
    root = Path(__file__).resolve().parent.parent / "recipes"
    cases = [
        (["train", str(root / "toyworld.yaml")], "`train` needs a student recipe"),
        (["train", str(root / "toyworld_self_forcing.yaml"), "train.mixed_precision=fp16"], "fp16 can't train"),
        (["train", str(root / "toyworld_lora4.yaml"), "train.log_with=[aim]"], "aim is not installed"),
        (["stream", str(root / "toyworld_self_forcing.yaml")], "stream.prompt: not set"),
        (["push", str(root / "toyworld_lora4.yaml")], "export.hub_repo_id: not set"),
    ]
    for args, message in cases:
        if "aim" in message and importlib.util.find_spec("aim") is not None:
            continue
        assert main([*args, "--dry-run"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (args, err)
    assert main(["train", str(root / "toyworld_self_forcing.yaml"), "--dry-run"]) == 0
    assert "passes `train`'s checks" in capsys.readouterr().err


def test_cli_reports_bad_key_without_traceback(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "compose", str(path), "data.num_promptz=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "data.num_promptz: unknown key (did you mean data.num_prompts?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compose_stage_writes_prompts_and_coverage(tmp_path):
    from synth_data.composer import read_prompts

    data = {**MINIMAL, "output_dir": str(tmp_path / "out"), "data": {**MINIMAL["data"], "num_prompts": 25}}
    path = write(tmp_path, "r.yaml", data)
    assert main(["compose", str(path)]) == 0
    rows = read_prompts(tmp_path / "out/prompts.jsonl")
    cov = yaml.safe_load((tmp_path / "out/coverage.json").read_text())
    assert len(rows) == 25 and cov["num_prompts"] == 25
    assert all(c["spread"] <= 1 for c in cov["slots"].values())
    before = (tmp_path / "out/prompts.jsonl").stat().st_mtime_ns
    assert main(["compose", str(path)]) == 0  # up to date: not rewritten
    assert (tmp_path / "out/prompts.jsonl").stat().st_mtime_ns == before
    # Once a dataset exists, a different prompt set is an error instead of a silent mix.
    (tmp_path / "out/dataset").mkdir()
    assert main(["compose", str(path), "data.num_prompts=26"]) == 2
    assert len(read_prompts(tmp_path / "out/prompts.jsonl")) == 25


def test_compose_missing_vocabulary_is_named(tmp_path, capsys):
    data = {**MINIMAL, "output_dir": str(tmp_path / "out"), "data": {"vocabulary": "nope.yaml", "num_prompts": 3}}
    assert main(["compose", str(write(tmp_path, "r.yaml", data))]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_nested_errors_inside_optional_sections_name_the_key(tmp_path):
    data = {**MINIMAL, "student": {"name": "s", "kind": "lora"}, "method": {"name": "kd"}}
    path = write(tmp_path, "r.yaml", data)
    with pytest.raises(RecipeError, match=r"method\.kd\.output_weight: expected float, got 'high'"):
        load_recipe(path, ["method.kd.output_weight=high"])
    with pytest.raises(RecipeError, match=r"student\.lora_rank: must be >= 1"):
        load_recipe(path, ["student.lora_rank=0"])


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """`train.learning_rate=1e-4` (a string to PyYAML's YAML 1.1 resolver) is the float every user means."""
    path = write(tmp_path, "r.yaml", MINIMAL)
    recipe = load_recipe(path, ["train.learning_rate=1e-4", "teacher.shift=3E+0"])
    assert recipe.train.learning_rate == 1e-4 and recipe.teacher.shift == 3.0
    with pytest.raises(RecipeError, match="train.learning_rate: expected float, got '1e-4x'"):
        load_recipe(path, ["train.learning_rate=1e-4x"])


def test_cli_and_trainer_import_without_pyav_or_datasets():
    """The GPU image has neither: training the toy teacher or a student from rendered clips must not need them."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['av'] = sys.modules['datasets'] = None\n"
        "import distill.cli, distill.trainer, distill.export_stage, distill.data"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_adam_betas_reach_both_optimizers(tmp_path):
    """train.adam_betas sets (β1, β2) of the optimizer that `make_optimizer` builds (the student's and the critic's)."""
    import torch

    from distill.trainer import make_optimizer

    path = write(tmp_path, "r.yaml", MINIMAL)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert make_optimizer(params, load_recipe(path).train).param_groups[0]["betas"] == (0.9, 0.999)
    opt = make_optimizer(params, load_recipe(path, ["train.adam_betas=[0.0,0.99]"]).train, lr=3e-4)
    assert opt.param_groups[0]["betas"] == (0.0, 0.99) and opt.param_groups[0]["lr"] == 3e-4


def test_duplicate_keys_are_an_error_naming_the_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a pasted second `teacher:` would silently replace the first."""
    path = tmp_path / "dup.yaml"
    path.write_text(
        "output_dir: out\nteacher:\n  pretrained: a\ndata:\n  vocabulary: v.yaml\n  num_prompts: 4\n"
        "teacher:\n  pretrained: b\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}:7: not valid YAML: duplicate key 'teacher' (first at line 2); keep one of them"
    nested = tmp_path / "nested.yaml"
    nested.write_text("output_dir: out\nteacher:\n  pretrained: a\n  pretrained: b\n")
    with pytest.raises(RecipeError, match=r"nested.yaml:4: not valid YAML: duplicate key 'pretrained'"):
        load_recipe(nested)


@pytest.mark.parametrize("name", [".", "..", "a/b", "a\\b", ""])
def test_student_names_that_are_not_one_folder_are_refused(tmp_path, name):
    recipe = {**MINIMAL, "student": {"name": name, "kind": "lora"}, "method": {"name": "flow_matching"}}
    with pytest.raises(RecipeError, match="student.name: must be a plain folder name"):
        load_recipe(write(tmp_path, "r.yaml", recipe))


def test_stage_help_lists_the_keys_it_reads_with_defaults_and_docs(capsys):
    from distill.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m distill train RECIPE.yaml")
    assert "  train.adam_betas = [0.9, 0.999]\n      (β1, β2) of both optimizers" in text
    assert (
        "  method.name = required\n      One of: flow_matching, kd, trajectory, ode_regression, dmd, self_forcing."
        in text
    )
    assert "  method.self_forcing.guidance_scale = null\n      Teacher CFG w for the real score" in text  # inherited
    assert "\ndata:" not in text  # train reads no data section
    with pytest.raises(SystemExit):
        main(["compose", "-h"])
    text = capsys.readouterr().out
    assert "  data.num_prompts = required\n      How many prompts to compose and render." in text
    assert "\ntrain:" not in text


def test_wan_distill_console_script_is_the_same_cli():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "wan-distill"
    proc = subprocess.run([str(script), "export", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "export.formats = " in proc.stdout
