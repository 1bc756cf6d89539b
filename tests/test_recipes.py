"""Every shipped recipe: validated, round-tripped through `--dry-run`, and smoke-run through the CLI on tiny models.

Data recipes (no student) run `compose` + `generate` for 2 prompts; student recipes run `train` for 2 steps and
`export`, after the data stage of their `output_dir` (shared by the recipes of that folder, as on a real run).
Teachers are replaced by tiny stand-ins (HUB_STANDINS; local toy-world folders by an untrained toy pipeline
from `teachers.toyworld.build`) and Wan shapes by 5 frames of 16x16 px (the tiny VAE compresses 4x / 8x).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from safetensors.torch import load_file

from core.recipe_loader import PROJECT_ROOT
from distill.cli import main
from distill.config import Recipe, load_recipe
from students.sampling import student_sigmas

pytestmark = pytest.mark.xdist_group("recipes")

RECIPES_DIR = PROJECT_ROOT / "recipes"
RECIPES = sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))

HUB_STANDINS = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "tiny",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "tiny",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "tiny_two_expert",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "tiny_ti2v",
}
"""Hub teacher -> tiny stand-in fixture. Local teacher folders (the toy world's) -> an untrained toy pipeline."""
WAN_SCHEDULER = dict(
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    final_sigmas_type="zero",
    solver_order=2,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
)
"""The sampler of Wan-AI's Diffusers repos (UniPCMultistepScheduler, scheduler_config.json), `flow_shift` aside."""
TINY_STEPS = 12
"""Tiny teachers sample 12 steps: 4 would leave no stored state within max_sigma_gap of a 4-step student's σ."""
EXPORT_FILES = {
    "diffusers_lora": "diffusers/pytorch_lora_weights.safetensors",
    "comfyui_lora": "comfyui/{name}.safetensors",
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "pipeline": "pipeline/model_index.json",
}


def cli(*args: str) -> int:
    """`python -m distill ...` in this process, with a fresh accelerate state (as a new process would have)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return main([str(a) for a in args])


def recipe_of(name: str, *overrides: str) -> Recipe:
    return load_recipe(RECIPES_DIR / name, list(overrides))


@pytest.fixture(scope="session")
def toy_pipeline_dir(tmp_path_factory) -> Path:
    """An untrained toy-world teacher (the architecture of teachers/toyworld/pipeline)."""
    from teachers.toyworld.build import main as build

    path = tmp_path_factory.mktemp("toy") / "pipeline"
    build([str(path)])
    return path


@pytest.fixture(scope="session")
def narrow_transformer_dir(tmp_path_factory) -> Path:
    """A student init narrower than the tiny teacher (width 16 vs 24, 1 block vs 2), like 1.3B vs 14B."""
    from teachers.tiny import tiny_transformer

    path = tmp_path_factory.mktemp("narrow") / "transformer"
    tiny_transformer(num_layers=1, num_heads=2, head_dim=8, seed=7).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def standins(
    tiny_pipeline_dir, tiny_two_expert_dir, tiny_ti2v_dir, toy_pipeline_dir, narrow_transformer_dir
) -> dict[str, Path]:
    return {
        "tiny": tiny_pipeline_dir,
        "tiny_two_expert": tiny_two_expert_dir,
        "tiny_ti2v": tiny_ti2v_dir,
        "toy": toy_pipeline_dir,
        "student_init": narrow_transformer_dir,
    }


def teacher_standin(recipe: Recipe, standins: dict[str, Path]) -> tuple[str, Path]:
    pretrained = recipe.teacher.pretrained
    if pretrained in HUB_STANDINS:
        return HUB_STANDINS[pretrained], standins[HUB_STANDINS[pretrained]]
    if pretrained.count("/") == 1 and not pretrained.startswith((".", "/", "~")) and not Path(pretrained).exists():
        pytest.fail(f"{recipe.source}: add a tiny stand-in for teacher.pretrained={pretrained} to HUB_STANDINS")
    return "toy", standins["toy"]


def original_scheduler(recipe: Recipe, standins: dict[str, Path]):
    """The recipe's real sampler at its shift: Wan's UniPC for Hub teachers, the toy pipeline's own otherwise."""
    kind, folder = teacher_standin(recipe, standins)
    if kind == "toy":
        config = FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=recipe.teacher.shift)
    return UniPCMultistepScheduler(**WAN_SCHEDULER, flow_shift=recipe.teacher.shift)


def standin_scheduler(recipe: Recipe, standins: dict[str, Path]):
    """The stand-in teacher's own sampler class at the recipe's shift (what the smoke run samples with)."""
    import diffusers

    _, folder = teacher_standin(recipe, standins)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(config, **{"flow_shift" if "flow_shift" in config else "shift": recipe.teacher.shift})


def sigmas_at(scheduler, steps: int, indices: list[int]) -> list[float]:
    scheduler.set_timesteps(steps)
    return [float(scheduler.sigmas[i]) for i in indices]


def tiny_trajectory_steps(recipe: Recipe, standins: dict[str, Path]) -> list[int]:
    """Indices of a TINY_STEPS Euler sampler nearest to the σ the recipe's real sampler stores."""
    wanted = sigmas_at(
        original_scheduler(recipe, standins), recipe.teacher.num_inference_steps, recipe.data.trajectory_steps
    )
    tiny = standin_scheduler(recipe, standins)
    tiny.set_timesteps(TINY_STEPS)
    grid = tiny.sigmas[:-1]
    return sorted({int((grid - s).abs().argmin()) for s in wanted})


def smoke_overrides(recipe: Recipe, out: Path, standins: dict[str, Path]) -> list[str]:
    kind, teacher = teacher_standin(recipe, standins)
    o = [
        f"output_dir={out}",
        "data.num_prompts=2",
        "data.shard_size=2",
        "data.batch_size=2",
        f"teacher.pretrained={teacher}",
        "teacher.dtype=float32",
        "teacher.offload=none",
        "teacher.quantize=none",
        f"teacher.num_inference_steps={TINY_STEPS}",
    ]
    if kind != "toy":  # the tiny TI2V VAE compresses 16x: 2x2 latent px, one transformer patch
        side = 32 if kind == "tiny_ti2v" else 16
        o += [f"teacher.height={side}", f"teacher.width={side}", "teacher.num_frames=5"]
    if recipe.data.trajectory_steps:
        o.append(f"data.trajectory_steps={tiny_trajectory_steps(recipe, standins)}")
    if recipe.student is not None:
        o += [
            "train.max_steps=2",
            "train.batch_size=1",
            "train.gradient_accumulation_steps=1",
            "train.mixed_precision=no",
            "train.log_with=none",
            "train.lr_warmup_steps=0",
        ]
        if recipe.train.toyworld_pool:  # the toy teacher's 8,192-clip pool takes minutes to fill; the path stays
            o += ["train.toyworld_pool=2", "train.toyworld_pool_refresh=1"]
        if recipe.train.sharding == "fsdp":
            o.append("train.sharding=none")  # one process here; tests/test_fsdp.py runs FSDP on two
        if recipe.train.optimizer == "adamw8bit":
            o.append("train.optimizer=adamw")  # bitsandbytes is CUDA-only
        if recipe.method.name in ("dmd", "self_forcing"):  # the generator too must take both steps
            o.append(f"method.{recipe.method.name}.generator_update_interval=1")
        if recipe.student.init is not None:
            chained = chained_init(recipe)
            o.append(f"student.init={out / chained[1] if chained else standins['student_init']}")
    return o


def chained_init(recipe: Recipe) -> tuple[str, str] | None:
    """(recipe, path inside output_dir) when `student.init` is the output of another recipe of the same output_dir
    (a stage-2 recipe starting from stage 1's `final/expert_0`), else None."""
    init, prefix = recipe.student.init, recipe.output_dir.rstrip("/") + "/"
    if not init.startswith(prefix):
        return None
    for name in RECIPES:
        other = recipe_of(name)
        if (
            other.student is not None
            and other.output_dir == recipe.output_dir
            and init.startswith(f"{other.student_dir()}/")
        ):
            return name, init[len(prefix) :]
    pytest.fail(f"{recipe.source}: student.init={init} lies in output_dir but no recipe in recipes/ writes it")


class Smoke:
    """Tiny runs under one tmp folder; one data stage per recipe `output_dir`, shared by its student recipes."""

    def __init__(self, root: Path, standins: dict[str, Path]):
        self.root, self.standins, self.done, self.trained = root, standins, set(), set()

    def out(self, recipe: Recipe) -> Path:
        return self.root / Path(recipe.output_dir).name

    def overrides(self, name: str) -> list[str]:
        recipe = recipe_of(name)
        return smoke_overrides(recipe, self.out(recipe), self.standins)

    def data(self, name: str) -> Path:
        """compose + generate for the output_dir of `name` (with its data recipe when there is one)."""
        recipe = recipe_of(name)
        out = self.out(recipe)
        if out not in self.done:
            same = [n for n in RECIPES if recipe_of(n).output_dir == recipe.output_dir and recipe_of(n).student is None]
            source = RECIPES_DIR / (same[0] if same else name)
            for stage in ("compose", "generate"):
                assert cli(stage, source, *self.overrides(source.name)) == 0, f"{stage} {source.name} failed"
            self.done.add(out)
        return out

    def train(self, name: str) -> None:
        """`train` for student recipe `name` (once), after the recipe its student.init chains from."""
        if name in self.trained:
            return
        recipe = recipe_of(name)
        chained = chained_init(recipe) if recipe.student.init is not None else None
        if chained:
            self.train(chained[0])
        if recipe.train.data_source == "dataset":
            self.data(name)
        assert cli("train", RECIPES_DIR / name, *self.overrides(name)) == 0, f"train {name} failed"
        self.trained.add(name)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, standins) -> Smoke:
    return Smoke(tmp_path_factory.mktemp("recipes"), standins)


# ---- static checks ----------------------------------------------------------------------------------------
def test_every_recipe_is_covered():
    assert {"wan21_1.3b_kd_lora.yaml", "wan21_14b_to_1.3b_kd.yaml", "toyworld.yaml"} <= set(RECIPES)


def test_yaml_no_yes_on_off_are_strings(tmp_path):
    """YAML 1.1 reads `no` as False: `train.mixed_precision: no` (and the override every smoke run uses) must stay
    'no'."""
    assert recipe_of("toyworld_lora4.yaml", "train.mixed_precision=no").train.mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text(
        "output_dir: out\ndata: {vocabulary: v.yaml, num_prompts: 1}\nteacher: {pretrained: p}\n"
        "train: {mixed_precision: no, ema: false, gradient_checkpointing: true}\n"
    )
    train = load_recipe(path).train
    assert (train.mixed_precision, train.ema, train.gradient_checkpointing) == ("no", False, True)


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_prints_yaml_that_loads_back_to_the_same_recipe(name, tmp_path, capsys):
    assert cli("run", RECIPES_DIR / name, "--dry-run") == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    again, original = load_recipe(tmp_path / "printed.yaml").to_dict(), recipe_of(name).to_dict()
    again.pop("source"), original.pop("source")
    assert again == original
    assert "base" not in yaml.safe_load(printed)  # resolved: the base recipe is merged in


def test_recipes_sharing_an_output_dir_agree_on_data_and_teacher():
    """A dataset is generated once per output_dir: every recipe reading it must describe the same generation."""
    from synth_data.generate import NOT_FINGERPRINTED

    by_dir: dict[str, dict] = {}
    for name in RECIPES:
        d = recipe_of(name).to_dict()
        gen = {
            f"{s}.{k}": v for s in ("data", "teacher") for k, v in d[s].items() if f"{s}.{k}" not in NOT_FINGERPRINTED
        }
        first = by_dir.setdefault(d["output_dir"], {"name": name, "gen": gen})
        diff = [k for k in gen if gen[k] != first["gen"][k]]
        assert not diff, f"{name} and {first['name']} share {d['output_dir']} but differ in {diff}"
    assert recipe_of("wan21_14b_to_1.3b_kd.yaml").output_dir != recipe_of("wan21_t2v_1.3b_synth.yaml").output_dir


@pytest.mark.parametrize(
    "name", [n for n in RECIPES if recipe_of(n).method is not None and recipe_of(n).method.name == "trajectory"]
)
def test_trajectory_recipes_store_states_at_the_students_sigmas(name, standins):
    recipe = recipe_of(name)
    stored = sigmas_at(
        original_scheduler(recipe, standins), recipe.teacher.num_inference_steps, recipe.data.trajectory_steps
    )
    wanted = [
        s for s in student_sigmas(recipe.student, recipe.teacher.shift, recipe.teacher.num_inference_steps) if s > 0
    ]
    gaps = [min(abs(s - t) for t in stored) for s in wanted]
    assert max(gaps) <= recipe.method.trajectory.max_sigma_gap, (wanted, stored)
    if name == "wan21_1.3b_kd_lora.yaml":  # the numbers its header quotes
        assert [round(s, 3) for s in stored] == [1.0, 0.905, 0.75, 0.514]
        assert [round(s, 3) for s in wanted] == [1.0, 0.9, 0.75, 0.5]


def test_wan_recipes_key_settings():
    lora = recipe_of("wan21_1.3b_kd_lora.yaml")
    assert (lora.student.kind, lora.student.lora_rank, lora.method.name) == ("lora", 64, "trajectory")
    assert len(lora.student.lora_target_modules) == 10 and lora.student.denoising_steps == [1000, 750, 500, 250]
    assert (lora.train.mixed_precision, lora.train.gradient_checkpointing, lora.train.ema) == ("bf16", True, True)
    assert lora.export.formats == ["diffusers_lora", "comfyui_lora"]
    kd = recipe_of("wan21_14b_to_1.3b_kd.yaml")
    assert kd.teacher.pretrained == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert (kd.student.kind, kd.student.init) == ("full", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert kd.method.kd.feature_weight == 0 and not kd.method.kd.layer_map and kd.method.kd.output_weight > 0


# ---- student.init ------------------------------------------------------------------------------------------
def test_student_init_loads_transformer_and_pipeline_folders_and_hub_ids(
    tiny_pipeline_dir, narrow_transformer_dir, tmp_path, monkeypatch
):
    from diffusers import WanTransformer3DModel

    import students.student as student_module
    from students.config import StudentConfig
    from teachers.tiny import tiny_transformer

    teacher = tiny_transformer()
    cfg = dict(name="s", kind="full")
    narrow = WanTransformer3DModel.from_pretrained(narrow_transformer_dir)
    s = student_module.build_student(StudentConfig(**cfg, init=str(narrow_transformer_dir)), teacher)
    assert torch.equal(s.experts[0].proj_out.weight, narrow.proj_out.weight) and s.teacher_num_layers == 1
    pipe_tf = WanTransformer3DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    s = student_module.build_student(StudentConfig(**cfg, init=str(tiny_pipeline_dir)), teacher)
    assert torch.equal(s.experts[0].proj_out.weight, pipe_tf.proj_out.weight)
    calls = []

    def fake(name, **kwargs):  # no network: record the Hub call and hand back the narrow transformer
        calls.append((name, kwargs))
        return narrow

    monkeypatch.setattr(student_module.WanTransformer3DModel, "from_pretrained", fake)
    student_module.build_student(StudentConfig(**cfg, init="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), teacher)
    assert calls == [("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", {"subfolder": "transformer", "torch_dtype": torch.float32})]
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match="student.init"):
            student_module.build_student(StudentConfig(**cfg, init=str(bad)), teacher)


# ---- smoke runs -----------------------------------------------------------------------------------------------
def assert_dataset(out: Path, recipe: Recipe) -> None:
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 2
    assert (out / "dataset" / "COMPLETE").is_file()
    table = pq.read_table(sorted((out / "dataset" / "data").glob("train-*.parquet")))
    assert table.num_rows == 2 and {"caption", "latents", "video"} <= set(table.column_names)
    if recipe.data.trajectory_steps:
        sigmas = table.column("trajectory_sigmas").to_pylist()[0]
        assert len(sigmas) == len(recipe.data.trajectory_steps) + 1 and sigmas[-1] == 0.0
    generation = json.loads((out / "dataset" / "generation.json").read_text())
    assert generation["teacher.pretrained"] == recipe.teacher.pretrained  # made by this recipe's teacher


def changed_from_source(recipe: Recipe, final: Path, standins: dict[str, Path]) -> bool:
    """LoRA: some lora_B moved off its zero init; full / pruned: proj_out differs from the source transformer."""
    weights = {k: v for f in sorted((final / "expert_0").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    if recipe.student.kind == "lora":
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        return bool(lora_b) and any(v.abs().max() > 0 for v in lora_b)
    source = recipe.student.init or Path(recipe.teacher.pretrained) / "transformer"
    ref = {k: v for f in Path(source).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    return not torch.equal(weights["proj_out.weight"], ref["proj_out.weight"])


@pytest.mark.parametrize("name", RECIPES)
def test_smoke_run(name, smoke):
    recipe_path = RECIPES_DIR / name
    overrides = smoke.overrides(name)
    recipe = recipe_of(name, *overrides)
    if recipe.student is None:
        out = smoke.data(name)
        assert_dataset(out, recipe)
        return
    if recipe.train.data_source == "dataset":
        assert_dataset(smoke.data(name), recipe)
    smoke.train(name)
    final = recipe.student_dir() / "final"
    assert (final / "COMPLETE").is_file()
    state = json.loads((final / "training_state.json").read_text())
    assert (state["step"], state["data_position"]) == (2, 2)
    optimizer = torch.load(recipe.student_dir() / "checkpoint-2" / "optimizer.bin", weights_only=False)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {2}  # 2 real AdamW steps on every weight
    assert (recipe.student_dir() / "final_ema").is_dir() == recipe.train.ema
    assert changed_from_source(recipe, final, smoke.standins)
    assert cli("export", recipe_path, *overrides) == 0
    export = recipe.student_dir() / "export"
    for fmt in recipe.export.formats:
        path = export / EXPORT_FILES[fmt].format(name=recipe.student.name)
        assert path.is_file(), f"{fmt}: {path} missing"
        assert (path.parent / "README.md").is_file()


def test_feature_kd_between_different_widths_is_a_clear_error(smoke, capsys):
    """14B -> 1.3B: the tiny stand-ins differ in width (24 vs 16) like 5120 vs 1536; a layer map must fail clearly."""
    name = "wan21_14b_to_1.3b_kd.yaml"
    smoke.data(name)
    overrides = [
        *smoke.overrides(name),
        "student.name=feature",
        "method.kd.feature_weight=0.1",
        "method.kd.layer_map={0: 0}",
    ]
    assert cli("train", RECIPES_DIR / name, *overrides) == 2
    assert "feature KD needs blocks of the same width" in capsys.readouterr().err
