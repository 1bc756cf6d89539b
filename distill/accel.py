"""One way to build the `Accelerator`, shared by every stage; and the gradient all-reduce of roles DDP does not wrap.

Why not plain `Accelerator()`: on a machine without CUDA, `accelerate launch --multi_gpu
--num_processes N` starts N processes, but each one sees no GPU and falls back to a
single-process state (world size 1), so all N would do the whole job. `Accelerator(cpu=True)`
makes them join one gloo process group instead. (`accelerate launch --cpu --num_processes N`
silently runs ONE process; launch CPU runs with `--multi_gpu` instead.)
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


def make_accelerator(**kwargs) -> Accelerator:
    """`Accelerator(**kwargs)`, with `cpu=True` when no CUDA GPU is present (multi-process CPU runs use gloo)."""
    if not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


GRAD_BUCKET_ELEMENTS = 2**25
"""Critic gradients are all-reduced in flat buckets of at most this many elements (128 MiB in fp32)."""


def all_reduce_grads(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average gradients over processes, as DDP would, for a role DDP does not wrap (the critic: `distill.trainer`)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    start = 0
    while start < len(grads):
        end, size = start + 1, grads[start].numel()
        while end < len(grads) and size + grads[end].numel() <= GRAD_BUCKET_ELEMENTS:
            size, end = size + grads[end].numel(), end + 1
        bucket = grads[start:end]
        flat = accelerator.reduce(torch.cat([g.flatten().float() for g in bucket]), reduction="mean")
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))
        start = end
