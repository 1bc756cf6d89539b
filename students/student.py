"""The student object: one interface over LoRA / pruned / full students and their timestep experts.

    student = build_student(cfg, teacher.transformer_for(1000.0))   # the high-noise transformer
    v = student(x, t, encoder_hidden_states)    # x [B, C, F, H, W], t [B] = 1000·σ, v = ε - x0
    with student.teacher_mode(): ...            # LoRA: adapters off, the shared base IS the teacher
    student.causal                              # kind=causal: the block-causal view (students/causal.py)

Saved layout (`save_pretrained`): `student.json` (the StudentConfig + block counts) and one
`expert_<i>/` folder per expert: LoRA → `adapter_model.safetensors` + `adapter_config.json` (peft
layout, keys `blocks.0.attn1.to_q.lora_A.weight`); pruned / full / causal → a `WanTransformer3DModel` folder
(a causal student's weights are a plain Wan transformer; causality lives in `students/causal.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file
from torch import nn

from core.files import load_safetensors
from core.lora import (
    active_adapter,
    adapters_disabled,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    set_active_adapter,
)
from core.recipe_loader import build, to_dict
from core.wan_lora import LoraImportError, fuse_loras, load_into_adapter
from students.causal import CausalWan, per_token_timesteps
from students.config import StudentConfig
from students.experts import copied_experts, expert_index_of_timestep, expert_name, lora_experts
from students.pruned import assert_same_architecture, block_count

logger = logging.getLogger(__name__)

STUDENT_JSON = "student.json"
LORA_WEIGHTS = "adapter_model.safetensors"
# Keys of StudentConfig that change the weights' layout: a saved folder must agree on all of them.
WEIGHT_KEYS = ("kind", "keep_blocks", "lora_rank", "lora_alpha", "lora_target_modules", "experts", "expert_boundaries")


class Student(nn.Module):
    """A trainable student: `forward(x, t, encoder_hidden_states) -> v`, routed to its timestep experts.

    LoRA: `transformer` is the (shared) base with adapters `expert_0..`; pruned / full / causal: `experts`
    holds one transformer per expert (causal: exactly one, run through `self.causal`). Build with
    `build_student` or `Student.from_pretrained`.
    """

    def __init__(
        self,
        cfg: StudentConfig,
        *,
        transformer: WanTransformer3DModel | None = None,
        experts: list[WanTransformer3DModel] | None = None,
        teacher_num_layers: int,
        shares_teacher: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.teacher_num_layers = teacher_num_layers
        """Blocks of the transformer the student was built from (checked when loading saved weights)."""
        self.shares_teacher = shares_teacher
        """LoRA only: the base is the teacher's own module, so `teacher_mode()` gives the teacher."""
        if cfg.spec.adapters:
            assert transformer is not None and experts is None
            self.transformer = transformer
            self.adapter_names = [expert_name(i) for i in range(cfg.experts)]
        else:
            assert experts is not None and len(experts) == cfg.experts
            self.experts = nn.ModuleList(experts)
            if cfg.spec.causal:
                CausalWan(experts[0], cfg)  # fail fast: checks cfg against the transformer, installs processors

    @property
    def is_lora(self) -> bool:
        return self.cfg.spec.adapters

    @property
    def num_experts(self) -> int:
        return self.cfg.experts

    @property
    def boundaries(self) -> list[float]:
        return list(self.cfg.expert_boundaries)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformers()[0].dtype

    @property
    def device(self) -> torch.device:
        return self.transformers()[0].device

    @property
    def causal(self) -> CausalWan:
        """kind=causal: the block-causal view of `experts[0]` (holds no weights, so it is built on access
        rather than registered, which would list the transformer's weights twice in `state_dict`)."""
        if not self.cfg.spec.causal:
            raise ValueError(f"student.kind={self.cfg.kind}: only causal students have a causal view")
        return CausalWan(self.experts[0], self.cfg)

    def expert_module(self, i: int) -> WanTransformer3DModel:
        """The transformer serving expert i (LoRA: the shared base with adapter `expert_i` activated)."""
        if self.is_lora:
            if active_adapter(self.transformer) != self.adapter_names[i]:
                set_active_adapter(self.transformer, self.adapter_names[i])
            return self.transformer
        return self.experts[i]

    def transformers(self) -> list[WanTransformer3DModel]:
        """The distinct transformer modules (LoRA: one shared; otherwise one per expert)."""
        return [self.transformer] if self.is_lora else list(self.experts)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor | None, chunk: dict | None = None
    ) -> torch.Tensor:
        """v = ε - x0 for latents x [B, C, F, H, W] at timesteps t [B] (= 1000·σ), text embeds [B, L, D].

        t may also be per frame [B, F] (one expert): kind=causal runs the block-causal parallel forward; other kinds
        expand it to Wan's per-token timesteps (a given clean first frame at t = 0: TI2V's image-to-video). With `chunk`
        ({"cache", "frame_offset", "update_cache"}): one chunk of the cached rollout,
        `CausalWan.forward_chunk(x, t, **chunk)` (the text is in the cache; pass None). Going through
        `student(...)` lets a DDP wrapper see the call (`distill.self_forcing.PreparedCausal`).

        Each sample goes to the expert of its σ (see `students/experts.py`); a batch spanning several
        experts is split and re-assembled in order. Inputs are cast to the transformer's dtype and v is
        returned in x's dtype.
        """
        if chunk is not None:
            return self.causal.forward_chunk(x, t, **chunk)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.num_experts == 1:
            return self._call(0, x, t, encoder_hidden_states)
        if t.ndim != 1:
            raise ValueError(f"timestep experts route one t per sample; got t of shape {tuple(t.shape)}")
        idx = expert_index_of_timestep(t, self.boundaries)
        parts, order = [], []
        for e in torch.unique(idx).tolist():
            rows = (idx == e).nonzero(as_tuple=True)[0]
            parts.append(self._call(e, x[rows], t[rows], encoder_hidden_states[rows]))
            order.append(rows)
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    def _call(self, i: int, x: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        if self.cfg.spec.causal:
            return self.causal(x, t, ehs)
        module = self.expert_module(i)
        if t.ndim == 2:  # per frame: Wan's per-token (2-D) timesteps, as TI2V's image-to-video feeds them
            t = per_token_timesteps(t, x, module.config.patch_size)
        dtype = module.dtype
        v = module(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=ehs.to(dtype), return_dict=False)[0]
        return v.to(x.dtype)

    @contextlib.contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """LoRA students sharing the teacher's module: disable the adapters (the base is the teacher)."""
        if not (self.is_lora and self.shares_teacher):
            raise ValueError(f"student.kind={self.cfg.kind}: teacher_mode needs a LoRA student on the teacher's module")
        with adapters_disabled(self.transformer):
            yield

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA: every expert's adapter weights; pruned / full: all weights of every expert."""
        if self.is_lora:
            return [p for name in self.adapter_names for p in lora_parameters(self.transformer, name)]
        return [p for m in self.experts for p in m.parameters()]

    def modules_to_save(self) -> dict[str, nn.Module]:
        """Sub-modules owning the trainable weights, by name (`expert_<i>` or, for LoRA, `transformer`).

        For LoRA the module is the shared base: save only `trainable_state_dict()` from it.
        """
        if self.is_lora:
            return {"transformer": self.transformer}
        return {expert_name(i): m for i, m in enumerate(self.experts)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's own weights, keys `expert_<i>.<key>` (LoRA keys as in peft, no adapter name)."""
        out = {}
        for i in range(self.num_experts):
            if self.is_lora:
                sd = lora_state_dict(self.transformer, self.adapter_names[i])
            else:
                sd = self.experts[i].state_dict()
            out.update({f"{expert_name(i)}.{k}": v for k, v in sd.items()})
        return out

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], where: str = "state dict") -> None:
        """Inverse of `trainable_state_dict` (strict)."""
        for i in range(self.num_experts):
            prefix = f"{expert_name(i)}."
            sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if self.is_lora:
                load_lora_state_dict(self.transformer, sd, self.adapter_names[i], f"{where} [{expert_name(i)}]")
            else:
                self.experts[i].load_state_dict(sd, strict=True)

    def enable_gradient_checkpointing(self) -> None:
        for m in self.transformers():
            m.enable_gradient_checkpointing()

    # ---- saving / loading ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `student.json` and one `expert_<i>/` folder per expert (see the module docstring). `state`: weights
        in `trainable_state_dict` layout to write instead of the module's (a sharded student's, assembled)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(self.num_experts):
            sub = directory / expert_name(i)
            prefix = f"{expert_name(i)}."
            given = None if state is None else {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if self.is_lora:
                sub.mkdir(parents=True, exist_ok=True)
                weights = lora_state_dict(self.transformer, self.adapter_names[i]) if given is None else given
                save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(sub / LORA_WEIGHTS))
                self.transformer.peft_config[self.adapter_names[i]].save_pretrained(str(sub))
            elif given is None:
                self.experts[i].save_pretrained(sub)
            else:  # the files diffusers' save_pretrained writes (config.json, weights sharded at 10 GB)
                sub.mkdir(parents=True, exist_ok=True)
                self.experts[i].save_config(sub)
                save_torch_state_dict(
                    {k: v.contiguous() for k, v in given.items()},
                    sub,
                    filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                    max_shard_size="10GB",
                )
        meta = {
            "config": to_dict(self.cfg),
            "teacher_num_layers": self.teacher_num_layers,
            "student_num_layers": block_count(self.transformers()[0]),
        }
        (directory / STUDENT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    def load_weights(self, directory: str | Path) -> None:
        """Load a saved student's weights into this one, in place (keeps optimizer references valid)."""
        directory = Path(directory)
        saved_cfg, meta = read_student_json(directory)
        check_compatible(directory, saved_cfg, self.cfg)
        if meta["teacher_num_layers"] != self.teacher_num_layers:
            raise ValueError(
                f"{directory}: saved for a teacher with {meta['teacher_num_layers']} blocks, this teacher has "
                f"{self.teacher_num_layers} blocks; use the same teacher.pretrained as when it was trained"
            )
        for i in range(self.num_experts):
            sub = directory / expert_name(i)
            if self.is_lora:
                state = load_safetensors(str(sub / LORA_WEIGHTS))
                load_lora_state_dict(self.transformer, state, self.adapter_names[i], str(sub))
            else:
                loaded = WanTransformer3DModel.from_pretrained(sub)
                if block_count(loaded) != block_count(self.experts[i]):
                    raise ValueError(
                        f"{sub}: has {block_count(loaded)} blocks, "
                        f"student.keep_blocks gives {block_count(self.experts[i])}"
                    )
                assert_same_architecture(loaded, self.experts[i], str(sub))
                self.experts[i].load_state_dict(loaded.state_dict(), strict=True)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, base_transformer: WanTransformer3DModel, cfg: StudentConfig | None = None
    ) -> Student:
        """Rebuild a saved student. LoRA: adapters are injected into `base_transformer` (as `build_student`
        does); pruned / full: the saved expert folders are loaded (onto `base_transformer`'s device).

        `cfg` (the recipe's `student` section) must agree with the folder on every weight-layout key
        (kind, keep_blocks, lora_rank, ...); the returned student uses `cfg` (else the saved one).
        """
        directory = Path(directory)
        saved_cfg, meta = read_student_json(directory)
        if cfg is not None:
            check_compatible(directory, saved_cfg, cfg)
        cfg = cfg or saved_cfg
        if cfg.spec.adapters:
            student = build_student(cfg, base_transformer)
            student.load_weights(directory)
            return student
        device = next(base_transformer.parameters()).device
        experts = []
        for i in range(cfg.experts):
            sub = directory / expert_name(i)
            m = WanTransformer3DModel.from_pretrained(sub).to(device)
            want = len(cfg.keep_blocks) if cfg.spec.prunes and cfg.keep_blocks else meta["teacher_num_layers"]
            if block_count(m) != want:
                raise ValueError(f"{sub}: has {block_count(m)} blocks, student.keep_blocks / the teacher give {want}")
            experts.append(m.requires_grad_(True))
        return cls(cfg, experts=experts, teacher_num_layers=meta["teacher_num_layers"])


def read_student_json(directory: Path) -> tuple[StudentConfig, dict]:
    path = directory / STUDENT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a folder written by Student.save_pretrained")
    meta = json.loads(path.read_text())
    return build(StudentConfig, meta["config"], "student"), meta


def check_compatible(directory: Path, saved: StudentConfig, wanted: StudentConfig) -> None:
    """Fail fast, naming the key, when a saved student's weight layout differs from the recipe's."""
    for key in WEIGHT_KEYS:
        a, b = getattr(saved, key), getattr(wanted, key)
        if key in ("lora_rank", "lora_alpha", "lora_target_modules") and not saved.spec.adapters:
            continue
        if key == "keep_blocks" and not saved.spec.prunes:
            continue
        if a != b:
            raise ValueError(f"{directory}: student.{key}: the folder was saved with {a!r}, the recipe has {b!r}")


def load_init_transformer(init: str, dtype: torch.dtype) -> WanTransformer3DModel:
    """`student.init`: a local `WanTransformer3DModel` folder, a local `WanPipeline` folder (its `transformer/`),
    or the Hub id of a WanPipeline repo (its `transformer` subfolder, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)."""
    path = Path(init).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return WanTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        if (path / "config.json").is_file():
            return WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype)
        raise FileNotFoundError(
            f"student.init: {path} holds neither config.json (a WanTransformer3DModel folder) nor model_index.json "
            "(a WanPipeline folder); give one of those or a Hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        )
    if init.startswith(("/", ".", "~")) or init.count("/") != 1:
        raise FileNotFoundError(f"student.init: {init} is neither an existing folder nor a Hub id (owner/name)")
    return WanTransformer3DModel.from_pretrained(init, subfolder="transformer", torch_dtype=dtype)


def build_student(cfg: StudentConfig, base_transformer: WanTransformer3DModel) -> Student:
    """Build the student of `cfg` from the teacher's (high-noise) transformer.

    LoRA: adapters are injected INTO `base_transformer` (shared with the teacher). pruned / full / causal:
    copies (one per expert; causal: one, with the causal processors installed). `cfg.init` loads that
    transformer (`load_init_transformer`) as the source instead (for LoRA it becomes the base, no longer
    shared with the teacher); `keep_blocks` then indexes its blocks.
    """
    source = base_transformer
    if cfg.init is not None:
        ref = next(base_transformer.parameters())
        source = load_init_transformer(cfg.init, ref.dtype).to(ref.device)
        logger.info("student %s: initialised from %s", cfg.name, cfg.init)
    if cfg.spec.adapters:
        names = lora_experts(source, cfg)
        for i, lora in enumerate(cfg.init_lora):
            for e in range(len(names)) if lora.experts is None else lora.experts:
                if e >= len(names):
                    raise LoraImportError(f"student.init_lora[{i}].experts: {e} out of range: {len(names)} expert(s)")
                load_into_adapter(source, names[e], lora)
        return Student(
            cfg, transformer=source, teacher_num_layers=block_count(source), shares_teacher=source is base_transformer
        )
    experts = copied_experts(source, cfg)
    if cfg.init_lora:
        keep = cfg.keep_blocks if cfg.spec.prunes else None
        block_map = None if keep is None else {b: j for j, b in enumerate(keep)}
        fuse_loras(list(experts), cfg.init_lora, "student.init_lora", block_map)
    for m in experts:
        m.requires_grad_(True)
    return Student(cfg, experts=experts, teacher_num_layers=block_count(source))
