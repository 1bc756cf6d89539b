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

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Literal

import yaml

from core.recipe_loader import (
    RecipeError,
    build,
    deep_merge,
    parse_override,
    read_yaml,
    resolve_path,
    set_dotted,
    to_dict,
)
from distill.methods import METHODS
from students.config import StudentConfig
from synth_data.config import DataConfig
from teachers.config import TeacherConfig


def _method_config(methods: dict[str, type]) -> type:
    """The recipe's `method` section built from the table `distill.methods.METHODS`: `name` (one of its keys) and one
    sub-section per method, `method.<name>` of type `<class>.Config` (the other methods' sub-sections may be left
    out, and are ignored)."""

    def critic_config(self):
        """The two-player settings (critic kind, rank, learning rate, GAN) of the method `name`."""
        if not methods[self.name].two_player:
            two = ", ".join(n for n, m in methods.items() if m.two_player)
            raise ValueError(f"method.name: {self.name!r} has no critic (two-player methods: {two})")
        return getattr(self, self.name)

    fields = [("name", Literal[tuple(methods)])]  # type: ignore[misc]
    fields += [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in methods.items()]
    cls = make_dataclass(
        "MethodConfig",
        fields,
        kw_only=True,
        namespace={"critic_config": critic_config, "__doc__": _method_config.__doc__},
    )
    cls.__module__ = __name__
    return cls


MethodConfig = _method_config(METHODS)


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
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """(β1, β2) of both optimizers (a two-player method's critic too). Self-Forcing, LongLive and FastVideo's DMD
    run β1 = 0: no momentum, so neither player acts on the other's stale gradients."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Clip both players' gradients to this global norm; 0: no clipping (the norm is still checked to be finite)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    sharding: Literal["none", "fsdp"] = "none"
    """`none`: every process holds every role whole (data-parallel, DDP). `fsdp`: the teacher, student and critic
    are sharded over the processes by Wan block with FSDP2 (the student's and critic's optimizer states too), so a
    process holds about 1/N of each plus one gathered block at a time; checkpoints are gathered into one file per
    role (`distill.sharding`). Needs two processes or more."""
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None
    """`latest`, a `checkpoint-<step>` path, or None to start fresh."""
    seed: int = 0
    """Seeds the student's initialisation and every sample's random stream: derive_seed(seed, sample index)."""
    data_source: Literal["dataset", "toyworld", "prompts"] = "dataset"
    """`dataset`: the generated teacher samples in `<output_dir>/dataset/`; `toyworld`: clips rendered on the fly
    from `data.vocabulary` (toy-world slots) and encoded with the teacher's VAE (trains the toy teacher);
    `prompts`: captions only, for the data-free methods `dmd` and `self_forcing` (as Self-Forcing trains on a
    prompt list): `prompts_file`, else prompts composed afresh every step from `data.vocabulary`."""
    prompts_file: str | None = None
    """`data_source: prompts` only: a text file with one prompt per line (blank and `#` lines skipped), or a
    `.jsonl` with a `prompt` field per row (e.g. a `prompts.jsonl` written by `compose`); every sample draws one
    line at random. None: compose from `data.vocabulary`."""
    toyworld_pool: int = 0
    """`data_source: toyworld` only. 0: every sample is a fresh clip, encoded by the teacher's VAE in its step.
    P > 0: keep P encoded clips in memory and re-render `toyworld_pool_refresh` of them per optimizer step;
    samples draw pool slots at random (`distill.data.RenderedPool`). Cuts the VAE's share of a step by
    batch / refresh at the price of reusing each clip ~batch·P / (refresh·P) times."""
    toyworld_pool_refresh: int = 8
    """Clips re-rendered into the pool per optimizer step; `toyworld_pool` must be a multiple of it."""
    log_with: str | list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers through accelerate, one name or a list: tensorboard, wandb, comet_ml, aim, mlflow, clearml, dvclive,
    swanlab, trackio; `none` for no logging. Local files go to `<output_dir>/students/<name>/logs/`. wandb with no
    WANDB_API_KEY and no WANDB_MODE logs offline there (`wandb sync` uploads it later)."""
    tracker_project: str = "wan-distill"
    """Project name the trackers file the run under (wandb, comet_ml, mlflow, ...); the run is the student's name."""
    validation_steps: int = 0
    """Every this many steps (and at the last), sample the validation prompts with the student and write
    `students/<name>/validation/step-<N>/<i>.gif`, logged as frame strips to the trackers. 0: never."""
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts of the validation previews, each with fixed noise; empty: the first two of the eval's prompts."""
    log_every: int = 10
    dataloader_num_workers: int = 0

    def __post_init__(self):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        names = [self.log_with] if isinstance(self.log_with, str) else list(self.log_with)
        self.log_with = [] if names == ["none"] else names
        bad = [n for n in self.log_with if n not in LOGGER_TYPE_TO_CLASS]
        if bad:
            raise ValueError(
                f"log_with: {bad[0]!r} is not an accelerate tracker; use none or any of "
                f"{', '.join(LOGGER_TYPE_TO_CLASS)}"
            )
        if self.validation_steps < 0:
            raise ValueError(f"validation_steps: must be >= 0 (0: no previews), got {self.validation_steps}")
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm: must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit: must be >= 1 or null, got {self.checkpoints_total_limit}")
        if self.toyworld_pool < 0 or self.toyworld_pool_refresh < 1:
            raise ValueError(
                f"toyworld_pool / toyworld_pool_refresh: must be >= 0 / >= 1, got "
                f"{self.toyworld_pool} / {self.toyworld_pool_refresh}"
            )
        if self.toyworld_pool and self.toyworld_pool % self.toyworld_pool_refresh:
            raise ValueError(
                f"toyworld_pool: must be a multiple of toyworld_pool_refresh "
                f"({self.toyworld_pool_refresh}), got {self.toyworld_pool}"
            )
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas: need two values in [0, 1), e.g. [0.9, 0.999]; got {self.adam_betas}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.prompts_file is not None and self.data_source != "prompts":
            raise ValueError(
                f"prompts_file: only read with data_source: prompts (got data_source: {self.data_source});"
                " set data_source: prompts or drop prompts_file"
            )


@dataclass(kw_only=True)
class ExportConfig:
    formats: list[Literal["diffusers_lora", "comfyui_lora", "comfyui_model", "transformer", "pipeline"]] = field(
        default_factory=lambda: ["diffusers_lora", "comfyui_lora"]
    )
    """What `export` writes under `<output_dir>/students/<name>/export/`: `diffusers_lora` and `comfyui_lora` (LoRA
    students), `comfyui_model` (any student as one Wan-native safetensors for ComfyUI's UNETLoader; a causal student
    there is a plain bidirectional transformer), `transformer` and `pipeline` (diffusers folders)."""
    use_ema: bool = True
    """Export the EMA weights when the run kept an EMA."""
    checkpoint: str | None = None
    """None exports the finished run (`final/`, `final_ema/`); `latest` or `checkpoint-<step>` exports the weights
    saved in that training checkpoint (its EMA when kept), e.g. to grade a run that is still going."""
    base_model: str | None = None
    """`base_model` in the model card; None uses `teacher.pretrained`."""
    hub_repo_id: str | None = None
    """Model repo that `push` (with this student recipe) uploads the export to, e.g. `me/wan21-4step-lora`."""
    hub_private: bool = True
    """Create that repo private (when it does not exist yet)."""


@dataclass(kw_only=True)
class EvalConfig:
    num_prompts: int = 64
    """Fresh prompts composed for the eval from `data.vocabulary` with `seed` (never prompts.jsonl's rows);
    report.json's `train_overlap` says how many of their slot combinations the training prompts also hold."""
    seed: int = 1234
    """Seed of the eval prompts and of prompt i's noise, `derive_seed(seed, i)` (shared by teacher and students).
    Must differ from `data.seed`, else the eval would reuse the training noise."""
    prompt_mode: Literal["balanced", "random"] = "balanced"
    """Composer mode of the eval prompts: `balanced` keeps every slot value's count within ±1 of uniform, so
    per-attribute chance is exactly 1/k for num_prompts divisible by k; `random` draws i.i.d."""
    batch_size: int = 8
    """Videos per sampler call (teacher and students alike); the first batch also serves as the warm-up."""
    grader: Literal["auto", "toyworld", "none"] = "auto"
    """`toyworld`: the toy world's oracle (teachers/toyworld/oracle.py) reads the slots back; `auto` uses it when
    every slot and value of the vocabulary is the toy world's, else `none`; `none`: timings only, accuracy null."""
    students: list[str] | None = None
    """Student names under `<output_dir>/students/` to grade; None grades every finished one (with final/COMPLETE)."""
    use_ema: bool = True
    """Grade a student's `final_ema/` weights when its run kept an EMA (else `final/`)."""
    long_rollout_factor: int = 10
    """Causal students: roll out this many times the training length for the drift curve."""
    long_rollout_prompts: int = 16
    """Causal students: the first this-many eval prompts are rolled out long (the drift curve's resolution is
    1/long_rollout_prompts per segment; at most num_prompts are used)."""
    interactive_prompts: int = 0
    """Causal students, toy world: grade prompt switches (KV re-cache and old cache) and continuation of rendered
    clips on the first this-many eval prompts (`distill.eval_interactive`); 0: skip."""
    switch_keep_chunks: int | None = None
    """The interactive grading's switches: also grade a re-cache that keeps only the latest this-many chunks
    (`stream.switch_keep_chunks`), as the mode `recache_last<n>`."""
    switch_context_noise: int | None = None
    """The interactive grading's switches: also grade a re-cache of the old chunks re-noised to this timestep
    (`stream.switch_context_noise`), as the mode `recache_t<t>` (with switch_keep_chunks: `recache_last<n>_t<t>`).
    Both None: re-cache and old cache only."""
    continuation_chunks: int | None = None
    """The interactive grading's continuation: chunks of the rendered clip given before the student continues;
    None: the whole teacher-length clip; 1: its first chunk only (the toy world's image-to-video: its temporal patch
    of 3 frames has no one-frame chunk)."""
    num_previews: int = 4
    """First prompts rendered as mp4 + GIF previews for the teacher and every student (at most num_prompts;
    0: none)."""
    decode_batch_size: int = 1
    """Videos per VAE decode call (timed with the sampler). 1 suits long 480p clips, whose decode is
    memory-bound; tiny toy-world clips decode ~1.4x faster per video in batches on a CPU."""
    student_timing_seconds: float = 4.0
    """Students' samplers re-run the timed batches until their timed sampling adds up to at least this many seconds
    (at most 10 passes; the time is the mean per pass). A few-step student's pass is ~20x shorter than the
    teacher's, so one pass is noisy (two identical causal students on the toy: 18.3x and 22.1x in one run); the
    teacher's one long pass is steady, and it is timed once. 0: one pass."""
    preview_size: int = 128
    """Previews are upscaled with nearest-neighbour by an integer factor until their shorter side is at least
    this many pixels (toy-world frames are 32 px); Wan's 480p frames stay as they are."""

    def __post_init__(self):
        for key in (
            "num_prompts",
            "batch_size",
            "long_rollout_factor",
            "preview_size",
            "decode_batch_size",
            "long_rollout_prompts",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.student_timing_seconds < 0:
            raise ValueError(f"student_timing_seconds: must be >= 0, got {self.student_timing_seconds}")
        if self.num_previews < 0:
            raise ValueError(f"num_previews: must be >= 0, got {self.num_previews}")
        if self.interactive_prompts < 0:
            raise ValueError(f"interactive_prompts: must be >= 0 (0: skip), got {self.interactive_prompts}")
        if self.switch_keep_chunks is not None and self.switch_keep_chunks < 1:
            raise ValueError(f"switch_keep_chunks: must be >= 1 or null, got {self.switch_keep_chunks}")
        if self.switch_context_noise is not None and not 0 <= self.switch_context_noise <= 1000:
            raise ValueError(f"switch_context_noise: must be a timestep in [0, 1000], got {self.switch_context_noise}")
        if self.continuation_chunks is not None and self.continuation_chunks < 1:
            raise ValueError(f"continuation_chunks: must be >= 1 or null, got {self.continuation_chunks}")
        if self.students is not None and (not self.students or len(set(self.students)) != len(self.students)):
            raise ValueError(f"students: must be null or a non-empty list of distinct names, got {self.students}")


@dataclass(kw_only=True)
class StreamConfig:
    """The `stream` stage: a causal student streams one long video to an mp4, chunk by chunk."""

    prompt: str = ""
    """The starting prompt (required by `stream`)."""
    num_chunks: int = 40
    """Chunks to generate (each `student.frames_per_block` latent frames), after any `continue_from` clip."""
    seed: int = 0
    """Noise seed (the eval's convention: a stream of the eval's length equals the eval's sample of this seed)."""
    switches: list[list[int | str]] = field(default_factory=list)
    """Prompt switches `[[chunk, "prompt"], ...]`: the prompt takes over from that chunk on."""
    recache: bool = True
    """On a switch, recompute the context's KV cache under the new prompt (LongLive's re-cache); false keeps it."""
    switch_keep_chunks: int | None = None
    """With `recache`: re-cache only the latest this-many chunks on a switch, dropping older context (a scene change
    that forgets more of the old scene); None re-caches all the cache holds."""
    switch_context_noise: int | None = None
    """With `recache`: re-cache the old chunks re-noised to this timestep (0..1000) instead of
    `student.context_noise`, so the old scene pulls less on the new one; None: as they were written."""
    continue_from: str | None = None
    """A video file (teacher's size; a whole number of chunks) the stream continues; it is not written again."""
    student: str | None = None
    """Folder of a saved causal student; None: this recipe's trained student (`final_ema/` when kept)."""
    output: str | None = None
    """The mp4 to write; None: `<output_dir>/streams/<student name>_seed<seed>.mp4`."""

    def __post_init__(self):
        if self.num_chunks < 1:
            raise ValueError(f"num_chunks: must be >= 1, got {self.num_chunks}")
        if self.switch_keep_chunks is not None and (self.switch_keep_chunks < 1 or not self.recache):
            raise ValueError(
                f"switch_keep_chunks: must be >= 1 and needs recache: true, got {self.switch_keep_chunks} "
                f"(recache: {self.recache})"
            )
        if self.switch_context_noise is not None and (not 0 <= self.switch_context_noise <= 1000 or not self.recache):
            raise ValueError(
                f"switch_context_noise: must be a timestep in [0, 1000] and needs recache: true, got "
                f"{self.switch_context_noise} (recache: {self.recache})"
            )
        for i, item in enumerate(self.switches):
            if len(item) != 2 or not isinstance(item[0], int) or not isinstance(item[1], str) or item[0] < 0:
                raise ValueError(f'switches[{i}]: expected [chunk >= 0, "prompt"], got {item!r}')


@dataclass(kw_only=True)
class ServeConfig:
    """The `serve` stage: a local page that plays the stream (its prompt, length and seed: the `stream` section)."""

    host: str = "127.0.0.1"
    """Loopback only: 127.0.0.1, ::1 or localhost."""
    port: int = 8765
    """0 picks a free port (logged)."""

    def __post_init__(self):
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"host: {self.host!r}; the page serves loopback addresses only (127.0.0.1, ::1)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")


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
    stream: StreamConfig = field(default_factory=StreamConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source: str | None = None
    """The recipe file this was loaded from (filled in by `load_recipe`)."""

    def __post_init__(self):
        if (self.student is None) != (self.method is None):
            raise ValueError("student/method: a student recipe needs both a `student` and a `method` section")
        kinds = METHODS[self.method.name].student_kinds if self.method is not None else None
        if kinds is not None and self.student.kind not in kinds:
            raise ValueError(
                f"student.kind: method {self.method.name} trains only {' or '.join(kinds)} students; set "
                f"student.kind: {kinds[0]} (got {self.student.kind})"
            )
        if (
            self.method is not None
            and self.method.name == "self_forcing"
            and self.method.self_forcing.ode_regression_weight > 0
            and self.train.data_source != "dataset"
        ):
            raise ValueError(
                "method.self_forcing.ode_regression_weight: the ODE anchor reads the teacher's stored trajectories, "
                f"and train.data_source is {self.train.data_source}; set it to dataset (with data.trajectory_steps) "
                "or the weight to 0"
            )
        if self.method is not None and self.train.data_source == "prompts":
            if not METHODS[self.method.name].data_free:
                free = ", ".join(n for n, m in METHODS.items() if m.data_free)
                raise ValueError(
                    f"train.data_source: prompts gives captions only, and method {self.method.name!r} "
                    "trains on clean latents or teacher trajectories; use data_source: dataset (or "
                    f"toyworld), or a data-free method ({free})"
                )
            if self.method.name == "self_forcing" and self.method.self_forcing.given_first_chunk > 0:
                raise ValueError(
                    "train.data_source: prompts gives no clips to take a first chunk from, and "
                    "method.self_forcing.given_first_chunk > 0 needs them; use data_source: dataset (or toyworld), "
                    "or set given_first_chunk: 0"
                )
            if self.method.critic_config().gan_weight > 0:
                raise ValueError(
                    f"train.data_source: prompts gives no real clips, and method.{self.method.name}."
                    "gan_weight > 0 needs them for the GAN head; use data_source: dataset (or "
                    "toyworld), or set gan_weight: 0"
                )

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
