"""The recipe: one YAML file with typed sections, one optional `base:` level, dotted overrides.

    output_dir: outputs/toyworld
    data: {...}      synth_data.config.DataConfig
    teacher: {...}   teachers.config.TeacherConfig
    student: {...}   students.config.StudentConfig   (student recipes only)
    method: {...}    MethodConfig                     (student recipes only)
    train: {...}     TrainConfig
    export: {...}    ExportConfig
    eval: {...}      EvalConfig
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from distill.recipe_loader import RecipeError, build, deep_merge, parse_override, read_yaml, set_dotted, to_dict
from students.config import StudentConfig
from synth_data.config import DataConfig
from teachers.config import TeacherConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent

METHODS = ("flow_matching", "kd", "trajectory", "ode_regression", "dmd", "self_forcing")


@dataclass(kw_only=True)
class MethodConfig:
    name: Literal["flow_matching", "kd", "trajectory", "ode_regression", "dmd", "self_forcing"]
    """The algorithm (one file each in `distill/`)."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps (each accumulates `gradient_accumulation_steps` micro-batches)."""
    batch_size: int = 1
    """Per-device micro-batch size."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw8bit` uses bitsandbytes (GPU)."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None
    """`latest`, a `checkpoint-<step>` path, or None to start fresh."""
    seed: int = 0
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    log_every: int = 10
    dataloader_num_workers: int = 0

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit: must be >= 1 or null, got {self.checkpoints_total_limit}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")


@dataclass(kw_only=True)
class ExportConfig:
    formats: list[Literal["diffusers_lora", "comfyui_lora", "transformer", "pipeline"]] = field(
        default_factory=lambda: ["diffusers_lora", "comfyui_lora"]
    )
    """What `export` writes under `<output_dir>/students/<name>/export/`."""
    use_ema: bool = True
    """Export the EMA weights when the run kept an EMA."""
    base_model: str | None = None
    """`base_model` in the model card; None uses `teacher.pretrained`."""


@dataclass(kw_only=True)
class EvalConfig:
    num_prompts: int = 64
    """Fresh prompts drawn for the eval (never the training prompts)."""
    seed: int = 1234
    """Seed for the eval prompts and noise."""
    batch_size: int = 8
    long_rollout_factor: int = 10
    """Causal students: roll out this many times the training length for the drift curve."""
    num_previews: int = 4
    """Prompts rendered as mp4 + GIF previews for the teacher and every student."""

    def __post_init__(self):
        for key in ("num_prompts", "batch_size", "long_rollout_factor"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")


@dataclass(kw_only=True)
class Recipe:
    output_dir: str
    """Everything this recipe produces lives here (see DESIGN.md §1)."""
    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig | None = None
    method: MethodConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str | None = None
    """The recipe file this was loaded from (filled in by `load_recipe`)."""

    def __post_init__(self):
        if (self.student is None) != (self.method is None):
            raise ValueError("student/method: a student recipe needs both a `student` and a `method` section")

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def student_dir(self) -> Path:
        assert self.student is not None
        return self.out / "students" / self.student.name

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resolve_path(path: str | Path) -> Path:
    """A recipe path: as given if it exists, else relative to the project root."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = PROJECT_ROOT / p
    return alt if alt.exists() else p


def load_recipe_dict(path: str | Path) -> dict:
    """The merged mapping of a recipe and its one `base:` level (base path relative to the recipe's folder)."""
    path = resolve_path(path)
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: expected a recipe path, got {base!r}")
    base_path = path.parent / base
    base_data = read_yaml(base_path)
    if "base" in base_data:
        raise RecipeError(f"{base_path}: base: only one level of inheritance is allowed ({path} -> {base_path})")
    return deep_merge(base_data, data)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge `base:`, apply `dotted.key=value` overrides, validate. Errors name file and dotted key."""
    data = load_recipe_dict(path)
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(data, keys, value)
    data.pop("source", None)
    try:
        recipe = build(Recipe, data)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    recipe.source = str(path)
    return recipe
