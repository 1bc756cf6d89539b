"""What a training checkpoint may hold: the EMA's and the critic's state as safetensors + JSON (resuming never
unpickles), and finite weights only (`check_finite` stops a step before a NaN or inf reaches them).

accelerate's `register_for_checkpointing` would pickle both into `custom_checkpoint_<i>.pkl` and read them back
with `weights_only=False`, so a crafted checkpoint could run code on `resume_from_checkpoint`. Here:

    checkpoint-<step>/ema.safetensors    shadow weights, `shadow_params.<i>` in `EMAModel.shadow_params` order
    checkpoint-<step>/ema.json           the EMA's other state (decay, optimization_step, ...): numbers only
    checkpoint-<step>/critic.safetensors the critic's trainable weights (`Critic.trainable_state_dict`)

A checkpoint holding `custom_checkpoint_<i>.pkl` files (written by earlier versions, or planted) is refused before
anything is read (`check_no_pickles`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.files import load_safetensors

EMA_WEIGHTS, EMA_STATE, CRITIC_WEIGHTS = "ema.safetensors", "ema.json", "critic.safetensors"


def check_no_pickles(folder: Path) -> None:
    """Refuse a checkpoint with pickled custom state: accelerate would unpickle it with weights_only=False."""
    found = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
    if found:
        raise ValueError(
            f"{folder}: holds pickled state ({', '.join(found)}), which this version never reads (a "
            "pickle can run code); resume from a checkpoint this version wrote, or start over with a new "
            "student.name"
        )


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing, so the checkpoint is incomplete; resume from an earlier one")
    return path


def save_ema(ema, folder: Path) -> None:
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file(
        {f"shadow_params.{i}": t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(folder / EMA_WEIGHTS)
    )
    (folder / EMA_STATE).write_text(json.dumps(state) + "\n")


def load_ema(ema, folder: Path) -> None:
    """Into the diffusers `EMAModel` `ema` (its shadow weights land on the CPU: move it after)."""
    tensors = load_safetensors(str(_require(folder / EMA_WEIGHTS)))
    state = json.loads(_require(folder / EMA_STATE).read_text())
    n = len(ema.shadow_params)
    if sorted(tensors) != sorted(f"shadow_params.{i}" for i in range(n)):
        raise ValueError(
            f"{folder / EMA_WEIGHTS}: holds {len(tensors)} EMA tensors, this student has {n} trainable "
            "tensors; resume with the recipe that wrote it"
        )
    ema.load_state_dict({**state, "shadow_params": [tensors[f"shadow_params.{i}"] for i in range(n)]})


def save_critic(critic, folder: Path) -> None:
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in critic.trainable_state_dict().items()},
        str(folder / CRITIC_WEIGHTS),
    )


def load_critic(critic, folder: Path) -> None:
    path = _require(folder / CRITIC_WEIGHTS)
    critic.load_trainable_state_dict(load_safetensors(str(path)), str(path))


class NonFiniteError(ValueError):
    """A loss or gradient norm of a training step is NaN or infinite: training stops before the update."""


def check_finite(value: torch.Tensor, what: str, step: int, checkpoints: Callable[[], list[Path]]) -> None:
    """Stop at the first non-finite loss or gradient norm, before any weight, EMA or checkpoint takes it in: the
    checkpoints on disk all hold finite weights. (One host sync per call.)"""
    if torch.isfinite(value.detach()).all():
        return
    last = checkpoints()  # the finished ones, oldest first
    kept = f"{last[-1]} is the last checkpoint" if last else "no checkpoint was written"
    raise NonFiniteError(
        f"train: step {step + 1}: the {what} is {float(value.detach().float().flatten()[0])}; stopped before the "
        f"update ({kept}). Lower train.learning_rate or set train.max_grad_norm, then resume with "
        "train.resume_from_checkpoint=latest (or start over with a new student.name)"
    )


__all__ = [
    "CRITIC_WEIGHTS",
    "EMA_STATE",
    "EMA_WEIGHTS",
    "NonFiniteError",
    "check_finite",
    "check_no_pickles",
    "load_critic",
    "load_ema",
    "save_critic",
    "save_ema",
]
