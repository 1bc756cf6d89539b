"""One way to build the `Accelerator`, shared by every stage.

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
