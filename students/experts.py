"""Timestep experts: N students, each serving one σ interval (the seed's idea, DESIGN.md §6).

`student.expert_boundaries` are descending σ values b_0 > b_1 > ... > b_{N-2}. Expert 0 serves the
highest noise, σ >= b_0; expert i serves b_{i-1} > σ >= b_i; the last expert serves σ < b_{N-2}.
A σ exactly at a boundary goes to the HIGHER-noise expert, as in Wan2.2's pipeline, which uses
`transformer` (high noise) when `t >= boundary_ratio * 1000` and `transformer_2` otherwise. The
comparison is made in timestep space (t = 1000·σ against 1000·b), exactly as the pipeline does.

LoRA experts are N adapters `expert_0 .. expert_{N-1}` on one shared base transformer (switched with
`set_active_adapter`); pruned / full experts are N separate transformer copies.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from core.flow import NUM_TRAIN_TIMESTEPS
from core.lora import add_lora
from students.config import StudentConfig
from students.pruned import prune_transformer


def expert_name(i: int) -> str:
    """Adapter / subfolder name of expert i."""
    return f"expert_{i}"


def expert_index_of_timestep(t: torch.Tensor | float, boundaries: list[float]) -> torch.Tensor | int:
    """Expert serving timestep t = 1000·σ (scalar or tensor): the number of boundaries with t < 1000·b."""
    if isinstance(t, torch.Tensor):
        idx = torch.zeros(t.shape, dtype=torch.long, device=t.device)
        for b in boundaries:
            idx += (t < b * NUM_TRAIN_TIMESTEPS).long()
        return idx
    return sum(1 for b in boundaries if t < b * NUM_TRAIN_TIMESTEPS)


def expert_index(sigma: torch.Tensor | float, boundaries: list[float]) -> torch.Tensor | int:
    """Expert serving noise level σ (float → int, tensor → long tensor of the same shape).

    σ >= boundaries[0] → 0 (high noise), ..., σ < boundaries[-1] → len(boundaries).
    """
    return expert_index_of_timestep(sigma * NUM_TRAIN_TIMESTEPS, boundaries)


def sigma_interval(i: int, boundaries: list[float]) -> tuple[float, float]:
    """[lo, hi] σ range served by expert i (lo inclusive; hi inclusive only for expert 0)."""
    edges = [1.0, *boundaries, 0.0]
    return edges[i + 1], edges[i]


def lora_experts(transformer: WanTransformer3DModel, cfg: StudentConfig) -> list[str]:
    """Inject `cfg.experts` LoRA adapters into `transformer` (in place); returns their names."""
    names = [expert_name(i) for i in range(cfg.experts)]
    for name in names:
        add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, name)
    return names


def copied_experts(transformer: WanTransformer3DModel, cfg: StudentConfig) -> list[WanTransformer3DModel]:
    """`cfg.experts` independent copies of `transformer`, pruned to `cfg.keep_blocks` (None keeps all)."""
    keep = cfg.keep_blocks if cfg.spec.prunes else None
    return [prune_transformer(transformer, keep) for _ in range(cfg.experts)]
