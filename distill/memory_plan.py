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
- activations (`_activations`): the step's forwards run on the meta device at the recipe's shapes and dtype, their
  tensor storage alive at once counted by `LiveBytes` (weights excluded): the student's forward with its graph
  (checkpointed as the trainer does it), the teacher's guided no-grad forward while that graph lives, the backward
  with the gradients counted from the moment they accumulate. Attention counts as a fused kernel keeps it (q, k, v,
  output, log-sum-exp: flash / memory-efficient attention, as GPUs run it), not the [S, S] weights of SDPA's math
  path. Self-Forcing's rollout is composed from one chunk: a graph per chunk of the DMD window, the KV cache. Under
  mixed precision, autocast's low-precision copies of the trainable float32 weights. The critic's step is its own
  phase; the student's gradients live through it unless the critic runs after the generator's update.
Not planned: the CUDA context, the allocator's slack, the text encoder's and the VAE's transients.

Configs come from `teacher.pretrained` (a local folder, or the Hub: config.json files only). When the Hub is not
reachable, the released configs of the Wan ids in `RELEASED` are used, and the plan says so.
"""

from __future__ import annotations

import copy
import functools
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
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
    phases: tuple[str, ...] = ()
    """(): held all step; else the phases of the step ("student": the generator's loss, backward and update;
    "critic": the critic's) during which it is alive: activations, and gradients, set to None after each update."""


@dataclass
class Plan:
    lines: list[Line] = field(default_factory=list)
    source: str = ""
    processes: int = 1
    activations: bool = False
    """Whether the lines include the training step's activations (a `train` plan)."""

    def phase_bytes(self, phase: str) -> float:
        return sum(line.bytes for line in self.lines if phase in line.phases)

    @property
    def peak_phase(self) -> str | None:
        phases = {p for line in self.lines for p in line.phases}
        return max(sorted(phases), key=self.phase_bytes) if phases else None

    @property
    def total(self) -> float:
        """The lines held all step plus those alive in the step's largest phase."""
        held = sum(line.bytes for line in self.lines if not line.phases)
        return held + (self.phase_bytes(self.peak_phase) if self.peak_phase else 0.0)

    def add(self, role: str, what: str, nbytes: float, phases: tuple[str, ...] = ()) -> None:
        self.lines.append(Line(role, what, nbytes, phases))

    def table(self, gpu_memory_gib: float | None = None) -> str:
        rows = [f"memory plan per GPU ({self.processes} process{'es' if self.processes > 1 else ''}; {self.source})"]
        for line in self.lines:
            steps = " and ".join(line.phases) + (" steps" if len(line.phases) > 1 else " step")
            what = f"[{steps}] {line.what}" if line.phases else line.what
            rows.append(f"  {line.role:<13} {what:<62} {line.bytes / GIB:8.2f} GiB")
        planned = "weights, optimizer states and activations" if self.activations else "weights and optimizer states"
        if len({p for line in self.lines for p in line.phases}) > 1:
            planned += f" (the {self.peak_phase} step's)"
        rows.append(f"  {'total':<13} {planned:<62} {self.total / GIB:8.2f} GiB")
        if gpu_memory_gib is not None:
            left = gpu_memory_gib - self.total / GIB
            verdict = f"{left:.1f} GiB left" if left > 0 else f"does NOT fit: {-left:.1f} GiB over"
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
    # the student's gradients live until its update, which comes after the critic's pass unless the method runs the
    # critic after the generator's update (Self-Forcing's order)
    two_player = METHODS[recipe.method.name].two_player
    overlap = two_player and not recipe.method.critic_config().critic_after_generator
    phases = ("student", "critic") if overlap else ("student",)
    n = sum(p.numel() for p in student.trainable_parameters())
    gradients = {"student": _trainable(plan, "student", n, tc, shard, tc.ema, phases)}
    if two_player:
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
        n = sum(p.numel() for p in critic.trainable_parameters())
        gradients["critic"] = _trainable(plan, "critic", n, tc, shard, False, ("critic",))
    else:
        critic = None
    _activations(plan, recipe, configs, student, critic, base, experts[0], shard, gradients)
    return plan


def _trainable(plan: Plan, role: str, n: int, tc, shard: int, ema: bool, phases: tuple[str, ...]) -> float:
    """`phases`: while its gradients are alive (they are set to None after each update), unless micro-batches
    accumulate them all step. Returns the gradients' bytes."""
    per = f" / {shard} (FSDP)" if shard > 1 else ""
    plan.add(role, f"trainable {_b([n])} params x 4 B (float32 master weights){per}", n * 4 / shard)
    plan.add(role, f"gradients, float32{per}", n * 4 / shard, phases if tc.gradient_accumulation_steps == 1 else ())
    moments = 2 if tc.optimizer == "adamw8bit" else 8
    plan.add(role, f"{tc.optimizer} moments, {moments} B per param{per}", n * moments / shard)
    if ema:
        plan.add(role, f"EMA, float32{per}", n * 4 / shard)
    return n * 4 / shard


# ---- activations -----------------------------------------------------------------------------------------------
_SDPA = torch.nn.functional.scaled_dot_product_attention


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage on `device` alive, and their peak, over the ops run inside it (on the meta device
    too, where storages have sizes but no memory): every storage an op reads or writes counts from then until it is
    freed, except those of `ignore` (tensors whose storages are accounted elsewhere, e.g. weights). torch's MemTracker
    does this per module but registers gradient hooks on every parameter, which frozen weights refuse."""

    def __init__(self, device: str = "cpu", ignore: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.device, self.live, self.refs = device, {}, {}
        self.ignore = {t.untyped_storage()._cdata for t in ignore}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def add(self, nbytes: float) -> None:
        """Count `nbytes` more from now on (memory the ops run here do not allocate themselves)."""
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((out, args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.ignore:
                    self.live[key] = storage.nbytes()
                    self.now += self.live[key]
                    self.peak = max(self.peak, self.now)
                    self.refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
        return out


class _FusedAttention(torch.autograd.Function):
    """Attention with a fused kernel's memory: its graph keeps q, k, v, the output and the log-sum-exp per query and
    head (flash / memory-efficient attention, as GPUs run it), not the [S, S] weights of SDPA's math path, which is
    what the meta device would dispatch to."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (meta only: the values are not needed, the sizes are)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(query, key, value)


@dataclass
class _Measured:
    held: float
    """Bytes alive after the forward (its graph and output)."""
    peak: float
    """The most alive at once over the forward and, with a graph, its backward (weight gradients excluded: they are
    planned per role)."""


def _run_on_meta(
    model: WanTransformer3DModel,
    dtype: torch.dtype,
    batch: int,
    latent: tuple[int, ...],
    text: tuple[int, int],
    checkpointing: bool,
    grad: bool,
    grad_bytes: float = 0.0,
) -> _Measured:
    """One forward (and with `grad` its backward) of a copy of the meta module `model` in `dtype` on [batch, *latent]
    latents and [batch, *text] text embeddings, counted with `LiveBytes` on the meta device. Each trainable weight's
    gradient counts `grad_bytes` per element from the moment the backward accumulates it (float32 master gradients,
    whatever `dtype` the forward runs in), as the step holds them until its update."""
    model = copy.deepcopy(model)
    torch.nn.Module.to(model, dtype)  # (diffusers' own `to` warns about its float32 modules; autocast keeps them too)
    if checkpointing and grad:
        model.enable_gradient_checkpointing()
        model._gradient_checkpointing_func = functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False, preserve_rng_state=False
        )
    with torch.device("meta"):
        x, t = torch.empty(batch, *latent, dtype=dtype), torch.empty(batch)
        e = torch.empty(batch, *text, dtype=dtype)
    live = LiveBytes("meta", ignore=(*model.parameters(), *model.buffers()))  # weights: planned per role

    def accumulated(p: torch.Tensor) -> None:
        live.add(p.numel() * grad_bytes)
        p.grad = None

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(accumulated)
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        with live, torch.set_grad_enabled(grad):
            out = model(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]
            held = live.now
            if grad:
                out.float().square().mean().backward()
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA
    return _Measured(held, live.peak)


def _autocast_copies(model: torch.nn.Module, nbytes: int, checkpointing: bool) -> float:
    """Autocast keeps a low-precision copy of each float32 trainable matrix a forward uses until its backward: all
    of them, or with checkpointing those outside the blocks plus one block's (re-made in the backward)."""
    blocks, rest = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim >= 2:
            parts = name.split(".")
            if parts[0] == "blocks":
                blocks[parts[1]] = blocks.get(parts[1], 0) + p.numel() * nbytes
            else:
                rest += p.numel() * nbytes
    return rest + (max(blocks.values(), default=0) if checkpointing else sum(blocks.values()))


def _activations(
    plan: Plan,
    recipe: Recipe,
    configs: dict,
    student,
    critic,
    base: WanTransformer3DModel,
    teacher: WanTransformer3DModel,
    shard: int,
    gradients: dict[str, float],
) -> None:
    """The activation lines of the step's phases: the generator's (the student's forward with graph, the no-grad
    forwards of the teacher and the critic while that graph lives, its backward) and the critic's. The backward
    frees activations while it fills the gradients: each line is the phase's peak less its role's `gradients`.
    `base`: the student's transformer before adapters (the teacher's, or `student.init`'s); `teacher`: the teacher's
    (high-noise) transformer."""
    tc, tcfg, scfg = recipe.train, recipe.teacher, recipe.student
    vae = configs["vae"]
    spatial = vae.get("scale_factor_spatial", 2 ** len(vae["temperal_downsample"]))
    temporal = vae.get("scale_factor_temporal", 2 ** sum(vae["temperal_downsample"]))
    channels, patch = base.config.in_channels, base.config.patch_size
    frames, h, w = (tcfg.num_frames - 1) // temporal + 1, tcfg.height // spatial, tcfg.width // spatial
    mixed = tc.mixed_precision in ("bf16", "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision, getattr(torch, tcfg.dtype))
    nbytes = DTYPE_BYTES[str(dtype).removeprefix("torch.")]
    text = (tcfg.max_sequence_length, base.config.text_dim)
    b, ckpt = tc.batch_size, tc.gradient_checkpointing
    mode = ("checkpointed" if ckpt else "no checkpointing") + f", {str(dtype).removeprefix('torch.')}"
    name, causal = recipe.method.name, scfg.spec.causal
    teacher_runs = METHODS[name].queries_teacher
    cfg_batch = 2 if tcfg.cfg_batch else 1  # the teacher's guided forward: conditional and unconditional in one batch
    accumulate = tc.gradient_accumulation_steps > 1  # gradients held all step: their own line, not in the peak
    grad_bytes = 0.0 if accumulate else 4.0 / shard

    module = (
        copy.deepcopy(base).requires_grad_(True)
        if causal
        else (student.transformer if student.is_lora else student.experts[0])
    )
    copies = _autocast_copies(module, nbytes, ckpt) if mixed else 0.0
    if name == "self_forcing":
        c = recipe.method.self_forcing
        n = scfg.frames_per_block // patch[0]
        first = 1 if scfg.independent_first_frame else n
        chunks = c.num_chunks or 1 + max(0, -(-(frames // patch[0] - first) // n))
        window = c.dmd_window or chunks
        one = _run_on_meta(module, dtype, b, (channels, n * patch[0], h, w), text, ckpt, True, grad_bytes)
        cap = None if scfg.local_window is None else scfg.local_window // patch[0]
        ends = [first + k * n for k in range(chunks)]
        keys = [e if cap is None else min(e, cap) for e in ends]
        hw, blocks = (h // patch[1]) * (w // patch[2]), len(base.blocks)
        inner = base.config.num_attention_heads * base.config.attention_head_dim
        kv = 2 * inner * hw * b * nbytes  # K and V of one temporal position in one block
        graphs = len(scfg.denoising_steps or [0]) if c.grad_through_steps else 1
        # each chunk's graph; its attention keeps the cache's K/V concatenated before its own (checkpointing
        # re-makes that block by block in the backward)
        held = sum(graphs * (one.held + copies + (0 if ckpt else kv * blocks * (k - n))) for k in keys[-window:])
        cache = kv * blocks * max(keys) + 2 * inner * text[0] * b * nbytes * blocks  # self and cross K/V
        clip = (channels, min(window * n, frames // patch[0]) * patch[0], h, w)
        scores = _run_on_meta(teacher, dtype, b * cfg_batch, clip, text, False, grad=False).peak
        backward = one.peak - one.held + (kv * (max(keys) - n) if ckpt else 0)
        gen = held + cache + max(backward, scores)
        what = f"generator: {window} chunk graph(s){' x every step' if c.grad_through_steps else ''} + KV cache"
    else:
        clip = (channels, frames, h, w)
        one = _run_on_meta(module, dtype, b, clip, text, ckpt, True, grad_bytes)
        scores = _run_on_meta(teacher, dtype, b * cfg_batch, clip, text, False, False).peak if teacher_runs else 0.0
        gen = max(one.peak, one.held + scores) + copies
        what = f"{'generator' if critic is not None else 'student'}: forward with graph, batch {b} x {clip[1]} frames"
    held_grads = dict.fromkeys(gradients, 0.0) if accumulate else gradients  # (accumulated: their own held lines)
    plan.add("activations", f"{what}, {mode}", max(gen - held_grads["student"], 0.0), ("student",))
    if critic is not None:
        ckpt_critic = ckpt and critic.gan_head is None
        crit = _run_on_meta(critic.transformer, dtype, b, clip, text, ckpt_critic, True, grad_bytes)
        copies = _autocast_copies(critic.transformer, nbytes, ckpt_critic) if mixed else 0.0
        plan.add(
            "activations",
            f"critic: forward with graph, batch {b} x {clip[1]} frames, {mode}",
            max(crit.peak + copies - held_grads["critic"], 0.0),
            ("critic",),
        )
    plan.activations = True


def _b(counts: list[int]) -> str:
    """Parameter counts, e.g. `1.42B` or `2 x 14.3B`."""

    def one(n: int) -> str:
        return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"

    return one(counts[0]) if len(counts) == 1 else f"{len(counts)} x {one(counts[0])}"
