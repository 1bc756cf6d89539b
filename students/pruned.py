"""Pruned students: a `WanTransformer3DModel` with fewer blocks, initialised from chosen teacher blocks.

BK-SDM style (Kim et al. 2023): the student keeps the teacher's embeddings, head and a subset of its
transformer blocks, in order. With every block kept the copy equals the teacher exactly.
"""

from __future__ import annotations

import re

from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel

from core.lora import base_state_dict

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")


def prune_transformer(transformer: WanTransformer3DModel, keep_blocks: list[int] | None) -> WanTransformer3DModel:
    """A new transformer with `len(keep_blocks)` blocks: block i is a copy of teacher block `keep_blocks[i]`.

    All non-block weights (patch embedding, condition embedder, norms, head) are copied too. None keeps
    every block (a plain copy). The copy never shares storage with `transformer`, has the same dtype and
    device, and is in `eval()` mode with `requires_grad` left to the caller. LoRA layers injected into
    `transformer` (e.g. a LoRA student sharing the teacher) are ignored: only the base weights are copied.
    """
    n_teacher = transformer.config.num_layers
    keep = list(range(n_teacher)) if keep_blocks is None else list(keep_blocks)
    bad = [i for i in keep if not 0 <= i < n_teacher]
    if not keep or bad:
        raise ValueError(
            f"student.keep_blocks: indices {bad or keep} out of range; the teacher has {n_teacher} blocks "
            f"(valid indices 0..{n_teacher - 1})"
        )
    source = base_state_dict(transformer)
    state = {}
    for key, value in source.items():
        m = _BLOCK_KEY.match(key)
        if m is None:
            state[key] = value.detach().clone()
    for i, j in enumerate(keep):
        prefix = f"blocks.{j}."
        for key, value in source.items():
            if key.startswith(prefix):
                state[f"blocks.{i}.{key[len(prefix) :]}"] = value.detach().clone()
    config = dict(transformer.config)
    config["num_layers"] = len(keep)
    # Parameters on the meta device (buffers such as RoPE tables stay real), then adopt the copies.
    with init_empty_weights(include_buffers=False):
        student = WanTransformer3DModel.from_config(config)
    student.load_state_dict(state, strict=True, assign=True)
    ref = next(transformer.parameters())
    return student.to(device=ref.device).eval()


def block_count(transformer: WanTransformer3DModel) -> int:
    """Number of transformer blocks (`config.num_layers`)."""
    return int(transformer.config.num_layers)


def assert_same_architecture(a: WanTransformer3DModel, b: WanTransformer3DModel, what: str) -> None:
    """Raise if two transformers differ in anything but `num_layers` (used when loading saved students)."""
    skip = {"num_layers", "_use_default_values", "_name_or_path", "_diffusers_version", "_class_name"}
    ca = {k: v for k, v in dict(a.config).items() if k not in skip}
    cb = {k: v for k, v in dict(b.config).items() if k not in skip}
    diff = sorted(k for k in ca.keys() | cb.keys() if _norm(ca.get(k)) != _norm(cb.get(k)))
    if diff:
        raise ValueError(f"{what}: transformer config differs from the teacher's in {diff}")


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


__all__ = ["prune_transformer", "block_count", "assert_same_architecture"]
