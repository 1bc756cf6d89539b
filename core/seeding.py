"""Seeds and per-sample random draws: every random number of sample i comes from one CPU `torch.Generator` seeded
with `derive_seed(seed, i)`, so results do not depend on the device, the batch size or the process count."""

from __future__ import annotations

import hashlib

import torch

SEED_MASK = (1 << 63) - 1
"""Derived seeds are masked to 63 bits: they fit int64 and `torch.Generator.manual_seed`."""


def derive_seed(global_seed: int, index: int) -> int:
    """Per-sample seed: first 8 bytes (big-endian) of sha256(f"{global_seed}:{index}"), masked to 63 bits.

    Stable across Python versions, platforms and process counts; fits int64 and
    `torch.Generator.manual_seed`.
    """
    for key, v in (("global_seed", global_seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"derive_seed: {key} must be an int, got {v!r}")
    digest = hashlib.sha256(f"{global_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MASK


def sample_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, index))


def randn_per_sample(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32):
    """[B, *shape] standard normal; row j drawn from generators[j] on the CPU (device-independent values)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device=device, dtype=dtype)


def rand_per_sample(generators: list[torch.Generator], device=None) -> torch.Tensor:
    """[B] uniform in [0, 1); entry j drawn from generators[j]."""
    return torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)


def randint_per_sample(generators: list[torch.Generator], high: int) -> list[int]:
    """One integer in [0, high) per sample."""
    return [int(torch.randint(high, (1,), generator=g)) for g in generators]


def sample_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of one sample: float32 randn from a CPU generator seeded with the row's seed."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


__all__ = [
    "SEED_MASK",
    "derive_seed",
    "rand_per_sample",
    "randint_per_sample",
    "randn_per_sample",
    "sample_generator",
    "sample_noise",
]
