"""The memory plan `--dry-run` prints for a training recipe: the bytes each role holds per GPU, from the configs.

Counted exactly: the models are built on PyTorch's meta device from their config.json files (no weight is read, no
memory is taken), through the same `build_student` / `build_critic` the trainer calls, so LoRA ranks, target modules,
pruned blocks and timestep experts count as they will train:
- the teacher's transformer(s), text encoder (in `teacher.dtype`) and VAE (float32), as `WanTeacher` loads them;
  `teacher.quantize` stores int8 weights in 1 byte and nf4 in half a byte (plus per-block scales, not counted);
  `teacher.offload: model` keeps them off the GPU between uses (the largest one is counted), `group` keeps one block;
- the student's and the critic's trainable weights in float32 (the trainer's master weights under mixed precision),
  their gradients, AdamW's two moments (4 bytes each; `adamw8bit`: 1 byte each), the EMA's float32 copy;
- `train.sharding: fsdp` divides the teacher's transformers, the student, the critic and their states by the number
  of processes (the VAE and text encoder are not sharded).
Not planned: activations (they follow the method's graph, checkpointing and the attention kernel; measure them with
`benchmarks/train_step.py` on the GPU), the CUDA context and the allocator's slack.

Configs come from `teacher.pretrained` (a local folder, or the Hub: config.json files only). When the Hub is not
reachable, the released configs of the Wan ids in `RELEASED` are used, and the plan says so.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from distill.config import Recipe
from distill.methods import METHODS
from students.critic import build_critic
from students.student import build_student

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5}

WAN21_13B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
"""Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (1.42B parameters)."""
WAN21_14B_TRANSFORMER = {**WAN21_13B_TRANSFORMER, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
"""Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (dim 5120 = 40 heads x 128); the A14B experts' too."""
_UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
WAN21_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)
"""Wan2.1 vae/config.json; latents_mean / latents_std are AutoencoderKLWan's defaults, which are Wan2.1's."""
WAN22_TI2V_5B_TRANSFORMER = {
    **WAN21_13B_TRANSFORMER,
    "num_attention_heads": 24,
    "in_channels": 48,
    "out_channels": 48,
    "ffn_dim": 14336,
}
"""Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/config.json (dim 3072 = 24 heads x 128, 30 blocks, 48 channels)."""
WAN22_VAE = {
    **WAN21_VAE,
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}
"""Wan2.2-TI2V-5B vae/config.json (the Wan2.2 VAE: 2x2 patchify, residual blocks, 16x spatial / 4x temporal). Its
latent statistics stand in as 0 / 1 here: they change no byte of the plan."""
RELEASED = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": {"transformer": WAN21_13B_TRANSFORMER},
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": {"transformer": WAN21_14B_TRANSFORMER},
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": {"transformer": WAN21_14B_TRANSFORMER, "transformer_2": WAN21_14B_TRANSFORMER},
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": {"transformer": WAN22_TI2V_5B_TRANSFORMER, "vae": WAN22_VAE},
}
"""The released transformer (and, where it is not Wan2.1's, VAE) config.json of each Wan id the recipes name (text
encoder: UMT5-XXL's encoder, shared by all), for planning without the Hub."""


@dataclass
class Line:
    role: str
    what: str
    bytes: float
    """Per GPU."""


@dataclass
class Plan:
    lines: list[Line] = field(default_factory=list)
    source: str = ""
    processes: int = 1

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.lines)

    def add(self, role: str, what: str, nbytes: float) -> None:
        self.lines.append(Line(role, what, nbytes))

    def table(self, gpu_memory_gib: float | None = None) -> str:
        rows = [f"memory plan per GPU ({self.processes} process{'es' if self.processes > 1 else ''}; {self.source})"]
        rows += [f"  {line.role:<13} {line.what:<62} {line.bytes / GIB:8.2f} GiB" for line in self.lines]
        rows.append(
            f"  {'total':<13} {'weights and optimizer states (activations not planned)':<62} "
            f"{self.total / GIB:8.2f} GiB"
        )
        if gpu_memory_gib is not None:
            left = gpu_memory_gib - self.total / GIB
            verdict = f"{left:.1f} GiB left for activations" if left > 0 else f"does NOT fit: {-left:.1f} GiB over"
            rows.append(f"  against --gpu-memory {gpu_memory_gib:g} GiB: {verdict}")
        return "\n".join(rows)


def _configs(recipe: Recipe) -> tuple[dict, str]:
    """{component: config dict} of the teacher (transformer, transformer_2 if any, text_encoder, vae) and where
    they came from."""
    pretrained, revision = recipe.teacher.pretrained, recipe.teacher.revision
    folder = Path(pretrained).expanduser()
    if not folder.is_dir() and (pretrained.startswith(("/", ".", "~")) or pretrained.count("/") != 1):
        raise ValueError(f"teacher.pretrained: {pretrained} is not there yet (an earlier stage writes it)")
    try:
        if folder.is_dir():
            read = lambda sub: json.loads((folder / sub / "config.json").read_text())  # noqa: E731
            index = json.loads((folder / "model_index.json").read_text())
            where = f"configs of {folder}"
        else:
            from huggingface_hub import hf_hub_download

            def read(sub):
                return json.loads(
                    Path(hf_hub_download(pretrained, f"{sub}/config.json", revision=revision)).read_text()
                )

            index = json.loads(Path(hf_hub_download(pretrained, "model_index.json", revision=revision)).read_text())
            where = f"configs of {pretrained} from the Hub"
        parts = [p for p in ("transformer", "transformer_2") if (index.get(p) or [None])[0] is not None]
        return {**{p: read(p) for p in parts}, "text_encoder": read("text_encoder"), "vae": read("vae")}, where
    except (OSError, ValueError) as e:
        if pretrained not in RELEASED:
            raise ValueError(
                f"teacher.pretrained: can't read the configs of {pretrained} for the memory plan: {e}"
            ) from e
        return {"vae": WAN21_VAE, **RELEASED[pretrained], "text_encoder": _UMT5_XXL}, (
            f"the released configs of {pretrained} (the Hub was not reachable)"
        )


def _init_config(init: str) -> dict | None:
    """The transformer config of `student.init` (the places `students.student.load_init_transformer` reads); None
    for a local folder that does not exist yet (an earlier stage's output)."""
    path = Path(init).expanduser()
    if path.is_dir():
        sub = path / "transformer" if (path / "model_index.json").is_file() else path
        return json.loads((sub / "config.json").read_text())
    if init.startswith(("/", ".", "~")) or init.count("/") != 1:  # a local folder an earlier stage will write
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(init, "transformer/config.json")).read_text())
    except (OSError, ValueError) as e:
        if init in RELEASED:
            return RELEASED[init]["transformer"]
        raise ValueError(f"student.init: can't read the config of {init} for the memory plan: {e}") from e


def _weight_bytes(module: torch.nn.Module, nbytes: float, keep_fp32: bool = True) -> float:
    """Bytes of `module`'s weights loaded in a `nbytes`-byte dtype: its `_keep_in_fp32_modules` (Wan: time embedder,
    modulation tables, norms) stay float32, as `from_pretrained(torch_dtype=...)` keeps them (`keep_fp32`)."""
    keep = [] if nbytes == 4 or not keep_fp32 else list(getattr(module, "_keep_in_fp32_modules", None) or [])
    return sum(
        p.numel() * (4 if any(k in name.split(".") for k in keep) else nbytes) for name, p in module.named_parameters()
    )


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def plan_memory(recipe: Recipe, processes: int = 1, teacher_only: bool = False) -> Plan:
    """The plan of `recipe`'s `train` stage on `processes` processes (one GPU each), or with `teacher_only` of its
    `generate` stage (the teacher's parts); see the module docstring."""
    configs, source = _configs(recipe)
    tc, teacher_cfg = recipe.train, recipe.teacher
    shard = processes if tc.sharding == "fsdp" else 1
    plan = Plan(source=source, processes=processes)
    with torch.device("meta"):
        experts = [
            WanTransformer3DModel.from_config(_clean(configs[p]))
            for p in ("transformer", "transformer_2")
            if p in configs
        ]
        text = UMT5EncoderModel(UMT5Config(**_clean(configs["text_encoder"])))
        vae = AutoencoderKLWan.from_config(_clean(configs["vae"]))
    weight = QUANT_BYTES.get(teacher_cfg.quantize, DTYPE_BYTES[teacher_cfg.dtype])
    sizes = [_numel(m) for m in experts]
    held = [_weight_bytes(m, weight) for m in experts]
    if teacher_cfg.offload == "model":
        plan.add("teacher", f"transformer(s) {_b(sizes)} params, offloaded: the largest while it runs", max(held))
    elif teacher_cfg.offload == "group":
        block = max(_weight_bytes(m.blocks[0], weight) for m in experts)
        plan.add("teacher", f"transformer(s) {_b(sizes)} params, group offload: one block on the GPU", block)
    else:
        what = f"transformer(s) {_b(sizes)} params x {weight:g} B" + (f" / {shard} (FSDP)" if shard > 1 else "")
        plan.add("teacher", what, sum(held) / shard)
    te_bytes = (
        0
        if teacher_cfg.offload == "model"
        else _weight_bytes(
            text,
            DTYPE_BYTES[teacher_cfg.dtype],
            keep_fp32=teacher_cfg.dtype == "float16",  # transformers keeps T5's
        )
    )  # `wo` in float32 for float16 only
    plan.add(
        "text encoder",
        f"{_b([_numel(text)])} params x {DTYPE_BYTES[teacher_cfg.dtype]} B" + (" (offloaded)" if te_bytes == 0 else ""),
        te_bytes,
    )
    plan.add("VAE", f"{_b([_numel(vae)])} params x 4 B (float32)", _numel(vae) * 4)
    if teacher_only or recipe.student is None or recipe.method is None:
        return plan
    base = experts[0]
    init = None if recipe.student.init is None else _init_config(recipe.student.init)
    if recipe.student.init is not None and init is None:
        plan.source += f"; student.init {recipe.student.init} is not there yet: planned as the teacher's transformer"
    if init is not None:  # the student starts from another transformer (e.g. 14B -> 1.3B)
        with torch.device("meta"):
            base = WanTransformer3DModel.from_config(_clean(init))
        if recipe.student.spec.adapters:  # LoRA on its own frozen base, not the teacher's
            plan.add(
                "student",
                f"frozen base {_b([_numel(base)])} params x {DTYPE_BYTES[teacher_cfg.dtype]} B",
                _weight_bytes(base, DTYPE_BYTES[teacher_cfg.dtype]),
            )
    student_cfg = copy.deepcopy(recipe.student)
    student_cfg.init, student_cfg.init_lora = None, []  # the plan reads no weights
    student = build_student(student_cfg, base)
    _trainable(plan, "student", sum(p.numel() for p in student.trainable_parameters()), tc, shard, tc.ema)
    if METHODS[recipe.method.name].two_player:
        c = recipe.method.critic_config()
        critic = build_critic(  # `full` copies the (meta) base; `lora` adds its adapter to it
            base,
            c.critic,
            lora_rank=c.critic_lora_rank,
            target_modules=recipe.student.lora_target_modules,
            gan_layer=None if not c.gan_weight else len(base.blocks) // 2,
            gradient_checkpointing=False,
            key=f"method.{recipe.method.name}",
        )
        _trainable(plan, "critic", sum(p.numel() for p in critic.trainable_parameters()), tc, shard, False)
    return plan


def _trainable(plan: Plan, role: str, n: int, tc, shard: int, ema: bool) -> None:
    per = f" / {shard} (FSDP)" if shard > 1 else ""
    plan.add(role, f"trainable {_b([n])} params x 4 B (float32 master weights){per}", n * 4 / shard)
    plan.add(role, f"gradients, float32{per}", n * 4 / shard)
    moments = 2 if tc.optimizer == "adamw8bit" else 8
    plan.add(role, f"{tc.optimizer} moments, {moments} B per param{per}", n * moments / shard)
    if ema:
        plan.add(role, f"EMA, float32{per}", n * 4 / shard)


def _b(counts: list[int]) -> str:
    """Parameter counts, e.g. `1.42B` or `2 x 14.3B`."""

    def one(n: int) -> str:
        return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"

    return one(counts[0]) if len(counts) == 1 else f"{len(counts)} x {one(counts[0])}"
