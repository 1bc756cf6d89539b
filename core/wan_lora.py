"""Third-party Wan LoRA files: read them in every layout Wan users hold and fuse them into a diffusers transformer.

Layouts (any mix of them in one file; `<m>` is a module of the transformer):
    Wan-native (ComfyUI, Kijai, LightX2V, musubi): `diffusion_model.<native m>`, also with `model.diffusion_model.`,
        `transformer.` or no prefix, or kohya's `lora_unet_<native m with _ for .>`; native names are those of the
        original Wan checkpoint (`blocks.0.self_attn.q`, `head.head`, `blocks.0.modulation`, ...).
    diffusers / peft: `transformer.<diffusers m>` or `<diffusers m>` (`blocks.0.attn1.to_q`, `proj_out`, ...).
Tensors per module:
    `.lora_down.weight` + `.lora_up.weight` (or peft's `.lora_A.weight` + `.lora_B.weight`), optional scalar
    `.alpha`: ΔW = up @ down · (alpha / rank), or · 1 without alpha (ComfyUI); a diffusers file's
    `lora_adapter_metadata` (lora_alpha, r, alpha_pattern, rank_pattern) gives peft's lora_alpha / r instead;
    `.diff`: ΔW itself (norms, modulation tables, anything with a weight); `.diff_b`: Δbias.
Every key must find its parameter (`LoraImportError` names the first that does not): nothing is dropped quietly,
which is where diffusers' converter falls short (it skips norm `.diff` keys at INFO level and raises on `.alpha` of
head, text and time layers) and where ComfyUI, which applies them all, is the reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

logger = logging.getLogger(__name__)

# diffusers module path (inside a WanTransformerBlock) -> Wan-native path, as in the original checkpoint
BLOCK_NATIVE = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "norm2": "norm3",  # the cross-attention norm: diffusers' norm2 is Wan's norm3 (norm1/norm3 have no weights)
    "scale_shift_table": "modulation",
}
# diffusers module path outside the blocks -> Wan-native path
TOP_NATIVE = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# suffix -> role, longest first so `.lora_down.weight` is never read as a module ending in `.lora_down`
_ROLES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
    ".diff_b": "diff_b",
    ".diff": "diff",
}
_NATIVE_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "transformer.", "")
_DIFFUSERS_PREFIXES = ("transformer.", "")


class LoraImportError(ValueError):
    """A LoRA file this importer cannot place in full; the message names the file and the key."""


@dataclass(kw_only=True)
class LoraFile:
    """One LoRA file to fuse (a recipe's `teacher.lora` / `student.init_lora` entry)."""

    path: str
    """A `.safetensors` LoRA in a Wan-native (ComfyUI, LightX2V, Kijai, musubi) or diffusers / peft layout."""
    scale: float = 1.0
    """Strength: the file's ΔW is multiplied by this (ComfyUI's `strength_model`)."""
    experts: list[int] | None = None
    """Transformer experts it applies to (Wan2.2 A14B: 0 = high-noise `transformer`, 1 = low-noise
    `transformer_2`; a student's timestep experts likewise); None: every one."""

    def __post_init__(self):
        if not self.path:
            raise ValueError("path: give a .safetensors LoRA file")
        if self.experts is not None and (not self.experts or min(self.experts) < 0):
            raise ValueError(f"experts: expert indices >= 0, or null for all, got {self.experts}")


def native_name(module: str) -> str | None:
    """A diffusers Wan module (or parameter-table) path -> its Wan-native path; None when Wan has no such name."""
    m = _BLOCK.match(module)
    if m:
        inner = BLOCK_NATIVE.get(m.group(2))
        return None if inner is None else f"blocks.{m.group(1)}.{inner}"
    return TOP_NATIVE.get(module)


def _split_param(name: str) -> tuple[str, str]:
    """`blocks.0.attn1.to_q.weight` -> (`blocks.0.attn1.to_q`, `weight`); a bare table -> (name, '')."""
    module, _, leaf = name.rpartition(".")
    return (module, leaf) if leaf in ("weight", "bias") else (name, "")


def native_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's weights under the original Wan checkpoint's names (what ComfyUI's loader detects)."""
    out = {}
    for name, tensor in transformer.state_dict().items():
        module, leaf = _split_param(name)
        native = native_name(module)
        if native is None:
            raise LoraImportError(f"{name}: this parameter has no Wan-native name; the file would not load in ComfyUI")
        out[f"{native}.{leaf}" if leaf else native] = tensor
    return out


def base_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """The transformer's own parameters by their plain names: a peft-wrapped layer's `base_layer` is named as the
    layer itself, and adapter weights (`lora_A`, `lora_B`, ...) are left out."""
    return {
        name.replace(".base_layer", ""): p
        for name, p in transformer.named_parameters()
        if not re.search(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.", name)
    }


def module_aliases(params: dict[str, nn.Parameter]) -> dict[str, str]:
    """Every spelling a LoRA file may use for a module of these parameters -> its diffusers module path."""
    aliases: dict[str, str] = {}

    def add(alias: str, module: str) -> None:
        if aliases.setdefault(alias, module) != module:  # two modules under one name: keys would be ambiguous
            raise LoraImportError(f"{alias}: names both {aliases[alias]} and {module}")

    for name in params:
        module, _leaf = _split_param(name)
        for prefix in _DIFFUSERS_PREFIXES:
            add(prefix + module, module)
        native = native_name(module)
        if native is not None:
            for prefix in _NATIVE_PREFIXES:
                add(prefix + native, module)
            add("lora_unet_" + native.replace(".", "_"), module)
    return aliases


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a `.safetensors` LoRA and its diffusers adapter metadata ({} when it has none)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise LoraImportError(f"{path}: LoRA files are read from .safetensors only (nothing is unpickled)")
    if not path.is_file():
        raise LoraImportError(f"{path}: no such LoRA file")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    meta = json.loads(raw) if raw else {}
    # WanPipeline.save_lora_weights prefixes the adapter config's keys with `transformer.`
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    return tensors, meta


def _peft_scale(module: str, rank: int, meta: dict) -> float:
    """peft's lora_alpha / r for `module` from diffusers metadata, its alpha_pattern / rank_pattern matched as peft
    matches them (`get_pattern_key`)."""
    from peft.utils.other import get_pattern_key

    alphas, ranks = meta.get("alpha_pattern") or {}, meta.get("rank_pattern") or {}
    alpha = alphas.get(get_pattern_key(list(alphas), module), meta.get("lora_alpha", rank))
    r = ranks.get(get_pattern_key(list(ranks), module), meta.get("r", rank))
    return float(alpha) / float(r)


def group_lora(
    tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter], source: str
) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """{diffusers module path: {role: (file key, tensor)}}, roles `down`, `up`, `alpha`, `diff`, `diff_b`.

    Raises `LoraImportError` naming `source` and the key for a tensor of another kind (LoHa, LoKr, `lora_mid`) or
    a module these parameters lack."""
    aliases = module_aliases(params)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _ROLES if key.endswith(s)), None)
        if suffix is None:
            raise LoraImportError(
                f"{source}: {key}: not a tensor this importer reads (lora_down/lora_up, lora_A/lora_B, alpha, "
                "diff, diff_b); LoHa, LoKr and lora_mid files are not supported: merge them in ComfyUI first"
            )
        alias = key[: -len(suffix)]
        module = aliases.get(alias)
        if module is None:
            raise LoraImportError(f"{source}: {key}: {_unplaced(alias, params)}")
        parts.setdefault(module, {})[_ROLES[suffix]] = (key, value)
    for got in parts.values():
        if ("up" in got) != ("down" in got):
            key = (got.get("up") or got["down"])[0]
            raise LoraImportError(f"{source}: {key}: its {'down' if 'up' in got else 'up'} half is missing")
        if "alpha" in got and "up" not in got:
            raise LoraImportError(f"{source}: {got['alpha'][0]}: an alpha with no lora_down/lora_up beside it")
    return parts


def _unplaced(alias: str, params: dict[str, nn.Parameter]) -> str:
    """Why a LoRA module name finds no layer, in words a user can act on."""
    blocks = {int(m.group(1)) for name in params if (m := _BLOCK.match(name))}
    m = _ANY_BLOCK.match(alias)
    if m is not None and blocks and int(m.group(2)) > max(blocks):
        return (
            f"block {m.group(2)} does not exist: this transformer has {max(blocks) + 1} blocks; the file is for "
            "another model size (Wan2.1 14B has 40 blocks, 1.3B 30)"
        )
    return (
        f"{alias} is no layer of this transformer (layers are named like diffusion_model.blocks.0.self_attn.q or "
        "transformer.blocks.0.attn1.to_q); is the file for another model?"
    )


def pair_scale(module: str, got: dict[str, tuple[str, torch.Tensor]], meta: dict) -> float:
    """The factor on up @ down: alpha / rank from the file, else peft's lora_alpha / r from diffusers metadata,
    else 1 (ComfyUI's reading of a file with neither)."""
    rank = got["down"][1].shape[0]
    if "alpha" in got:
        return float(got["alpha"][1]) / rank
    if meta:
        return _peft_scale(module, rank, meta)
    return 1.0


def lora_deltas(
    tensors: dict[str, torch.Tensor], meta: dict, params: dict[str, nn.Parameter], source: str = "lora"
) -> dict[str, torch.Tensor]:
    """{parameter name: float32 ΔW} for every key of a LoRA file (strength 1), over `base_parameters(...)`.

    Raises `LoraImportError` naming `source` and the key for anything `group_lora` refuses or a shape that does
    not fit."""
    deltas: dict[str, torch.Tensor] = {}

    def put(param: str, delta: torch.Tensor, key: str) -> None:
        if param not in params:
            raise LoraImportError(f"{source}: {key}: the layer has no {param.rpartition('.')[2] or param}")
        if tuple(delta.shape) != tuple(params[param].shape):
            raise LoraImportError(
                f"{source}: {key}: gives shape {tuple(delta.shape)}, {param} is {tuple(params[param].shape)}"
            )
        deltas[param] = delta

    for module, got in group_lora(tensors, params, source).items():
        weight = module if module in params else f"{module}.weight"
        if "up" in got:
            up, down = got["up"][1].float(), got["down"][1].float()
            fits = weight in params and up.flatten(1).shape[1] == down.shape[0]
            if not fits or up.shape[0] * down[0].numel() != params[weight].numel():
                raise LoraImportError(
                    f"{source}: {got['up'][0]}: up {tuple(up.shape)} and down {tuple(down.shape)} do not make "
                    f"{weight} {tuple(params[weight].shape) if weight in params else ''}"
                )
            delta = (up.flatten(1) @ down.flatten(1)).reshape(params[weight].shape)
            put(weight, delta * pair_scale(module, got, meta), got["up"][0])
        if "diff" in got:
            put(weight, got["diff"][1].float() + deltas.get(weight, 0), got["diff"][0])
        if "diff_b" in got:
            put(f"{module}.bias", got["diff_b"][1].float(), got["diff_b"][0])
    return deltas


@torch.no_grad()
def fuse_lora(transformer: nn.Module, lora: LoraFile, block_map: dict[int, int] | None = None) -> int:
    """Add `lora.scale` · ΔW of every key of `lora.path` to `transformer`'s weights, in place; returns the number
    of parameters changed. `block_map` (pruned students): the file's block index -> this transformer's; blocks
    it leaves out are skipped (they were pruned away)."""
    tensors, meta = read_lora(lora.path)
    if block_map is not None:
        tensors = _remap_blocks(tensors, block_map)
    params = base_parameters(transformer)
    deltas = lora_deltas(tensors, meta, params, source=str(lora.path))
    for name, delta in deltas.items():
        p = params[name]
        if not torch.isfinite(delta).all():
            raise LoraImportError(f"{lora.path}: the change to {name} is not finite")
        p.copy_((p.float() + lora.scale * delta.to(p.device)).to(p.dtype))
    return len(deltas)


_ANY_BLOCK = re.compile(r"^(.*?blocks[._])(\d+)([._].*)$")


def _remap_blocks(tensors: dict[str, torch.Tensor], block_map: dict[int, int]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        m = _ANY_BLOCK.match(key)
        if m is None:
            out[key] = value
        elif int(m.group(2)) in block_map:
            out[f"{m.group(1)}{block_map[int(m.group(2))]}{m.group(3)}"] = value
    return out


def fuse_loras(
    transformers: list[nn.Module], loras: list[LoraFile], key: str, block_map: dict[int, int] | None = None
) -> None:
    """Fuse each file of `loras` (the recipe list at `key`) into the transformers its `experts` name."""
    for i, lora in enumerate(loras):
        targets = range(len(transformers)) if lora.experts is None else lora.experts
        bad = [e for e in targets if e >= len(transformers)]
        if bad:
            raise LoraImportError(f"{key}[{i}].experts: {bad} out of range: there are {len(transformers)} expert(s)")
        for e in targets:
            n = fuse_lora(transformers[e], lora, block_map)
            logger.info("%s[%d]: %s (scale %g) fused into expert %d: %d tensors", key, i, lora.path, lora.scale, e, n)


@torch.no_grad()
def load_into_adapter(transformer: nn.Module, adapter_name: str, lora: LoraFile) -> int:
    """Start peft adapter `adapter_name` from the down/up pairs of `lora.path` (a LoRA student's `init_lora`), so that
    the adapter's ΔW equals the file's (times `lora.scale`); returns the number of layers set. The file's rank must
    equal the adapter's; full-weight changes (`.diff`, `.diff_b`) have no place in an adapter and are refused."""
    from peft.tuners.lora import LoraLayer

    tensors, meta = read_lora(lora.path)
    params = base_parameters(transformer)
    modules = dict(transformer.named_modules())
    n = 0
    for module, got in group_lora(tensors, params, str(lora.path)).items():
        for role in ("diff", "diff_b"):
            if role in got:
                raise LoraImportError(
                    f"{lora.path}: {got[role][0]}: a full-weight change has no place in a LoRA adapter; start a "
                    "full or causal student from this file, or fuse it into the teacher with teacher.lora"
                )
        layer = modules.get(module)
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            raise LoraImportError(
                f"{lora.path}: {got['up'][0]}: {module} carries no adapter; add its suffix to "
                "student.lora_target_modules"
            )
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        down, up = got["down"][1], got["up"][1]
        if tuple(down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
            raise LoraImportError(
                f"{lora.path}: {got['up'][0]}: rank {down.shape[0]} in the file, the adapter has rank {a.shape[0]}; "
                f"set student.lora_rank: {down.shape[0]}"
            )
        ratio = lora.scale * pair_scale(module, got, meta) / layer.scaling[adapter_name]
        a.copy_(down.to(a))
        b.copy_((up.float() * ratio).to(b))
        n += 1
    return n


def lora_digests(loras: list[LoraFile], key: str) -> list[str]:
    """sha256 of each file of `loras` (a run's fingerprint: the same path with other weights must not mix)."""
    out = []
    for i, lora in enumerate(loras):
        path = Path(lora.path).expanduser()
        if not path.is_file():
            raise LoraImportError(f"{key}[{i}].path: {path}: no such LoRA file")
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        out.append(h.hexdigest())
    return out
