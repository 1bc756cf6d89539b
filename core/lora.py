"""LoRA students through diffusers' peft integration (`ModelMixin.add_adapter`).

The adapters are injected INTO the teacher's transformer, so the base weights exist once: with the
adapters disabled the module is the teacher (diffusers' LCM-LoRA trick, see `adapters_disabled`).
Several named adapters on one base serve as timestep experts (`students/experts.py`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn


def lora_target_regex(target_modules: list[str]) -> str:
    """A peft `target_modules` regex matching the given suffixes inside Wan blocks only.

    peft full-matches a string `target_modules` against module names, so `attn1.to_q` matches
    `blocks.3.attn1.to_q` but never e.g. `condition_embedder.*`.
    """
    if not target_modules:
        raise ValueError("student.lora_target_modules: must name at least one module, e.g. attn1.to_q")
    alternatives = "|".join(re.escape(t) for t in target_modules)
    return rf"^blocks\.\d+\.({alternatives})$"


def add_lora(
    transformer: WanTransformer3DModel, rank: int, alpha: float, target_modules: list[str], adapter_name: str
) -> WanTransformer3DModel:
    """Inject a LoRA adapter (lora_B = 0, so the output is unchanged) into `transformer`, in place.

    Base weights are frozen; the new adapter's weights are trainable. The adapter becomes the active one
    (switch with `set_active_adapter`). Returns `transformer`.
    """
    pattern = lora_target_regex(target_modules)
    names = [n for n, _ in transformer.named_modules() if re.fullmatch(pattern, n)]
    if not names:
        raise ValueError(
            f"student.lora_target_modules: {target_modules} match no module inside the transformer blocks; "
            "use suffixes such as attn1.to_q, attn2.to_out.0, ffn.net.0.proj"
        )
    if adapter_name in (transformer.peft_config if transformer._hf_peft_config_loaded else {}):
        raise ValueError(
            f"adapter {adapter_name!r} already exists on this transformer; build the student on a fresh teacher "
            "transformer (or delete the adapter with transformer.delete_adapters)"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, init_lora_weights=True)
    grads = _requires_grad(transformer)
    with warnings.catch_warnings():  # peft warns on every adapter after the first; experts add several on purpose
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.add_adapter(config, adapter_name=adapter_name)
    for name, p in transformer.named_parameters():
        is_new = f".{adapter_name}." in name
        p.requires_grad_("lora_" in name and (is_new or grads.get(name, False)))
    return transformer


def _requires_grad(module: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


def _restore_requires_grad(module: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in module.named_parameters():
        p.requires_grad_(flags[n])


def set_active_adapter(transformer: WanTransformer3DModel, adapter_name: str) -> None:
    """Make `adapter_name` the active adapter without touching `requires_grad`.

    peft's `set_adapter` freezes every inactive adapter; timestep experts are all trained, so the
    trainable flags are restored after the switch.
    """
    flags = _requires_grad(transformer)
    transformer.set_adapter(adapter_name)
    _restore_requires_grad(transformer, flags)


def active_adapter(transformer: nn.Module) -> str | None:
    for m in transformer.modules():
        if isinstance(m, BaseTunerLayer):
            return m.active_adapters[0]
    return None


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` with every LoRA adapter disabled: a LoRA student becomes its teacher.

    `requires_grad` flags are restored on exit (peft's enable/disable toggles them). Works on a
    transformer or on any module containing one (e.g. a `Student`); a no-op without adapters.
    """
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = [m.disable_adapters for m in layers]
    flags = _requires_grad(module)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield module
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)
        _restore_requires_grad(module, flags)


def lora_parameters(module: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The LoRA parameters of one adapter (or of all adapters) of `module`."""
    out = []
    for name, p in module.named_parameters():
        if "lora_" in name and (adapter_name is None or f".{adapter_name}." in name):
            out.append(p)
    return out


def lora_state_dict(transformer: WanTransformer3DModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft state dict of one adapter, keys like `blocks.0.attn1.to_q.lora_A.weight` (no adapter name)."""
    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def load_lora_state_dict(
    transformer: WanTransformer3DModel, state: dict[str, torch.Tensor], adapter_name: str, where: str
) -> None:
    """Load `lora_state_dict` output into an existing adapter; any missing/unexpected key is an error."""
    expected = set(lora_state_dict(transformer, adapter_name))
    got = set(state)
    if expected != got:
        missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
        raise ValueError(
            f"{where}: LoRA weights do not fit the transformer (missing {missing}, unexpected {extra}); "
            "was it saved for another block count or other student.lora_target_modules?"
        )
    current = lora_state_dict(transformer, adapter_name)
    for key, value in state.items():
        if value.shape != current[key].shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)}, the adapter expects {tuple(current[key].shape)} "
                "(saved with another student.lora_rank?)"
            )
    flags = _requires_grad(transformer)
    set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    _restore_requires_grad(transformer, flags)


def base_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's own weights, without any injected LoRA layers (`base_layer.` folded away)."""
    return {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if ".lora_" not in k}


@torch.no_grad()
def merged_state_dict(transformer: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Base weights with one adapter fused in (W + scale·B·A), leaving `transformer` untouched.

    Why not peft's merge/`fuse_lora`: those mutate the base in place, and the base is shared with the
    teacher (and with the other experts).
    """
    state = base_state_dict(transformer)
    for name, m in transformer.named_modules():
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = w + m.get_delta_weight(adapter_name).to(w.dtype)
    return state


def fused_transformer(transformer: WanTransformer3DModel, adapter_name: str) -> WanTransformer3DModel:
    """A new plain `WanTransformer3DModel` with the adapter fused into a copy of the base weights."""
    state = {k: v.detach().clone() for k, v in merged_state_dict(transformer, adapter_name).items()}
    with init_empty_weights(include_buffers=False):
        out = WanTransformer3DModel.from_config(dict(transformer.config))
    out.load_state_dict(state, strict=True, assign=True)
    return out.to(next(transformer.parameters()).device).eval()
