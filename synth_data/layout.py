"""The dataset folder's markers, importable without PyAV or datasets (a GPU image may have neither): `generate`
writes `COMPLETE` last and keeps unfinished parts in `WORK_DIR`; `push`, `run` and training read them."""

from __future__ import annotations

from pathlib import Path

WORK_DIR = ".work"
"""Per-sample parts of an unfinished dataset, under the dataset folder; never uploaded."""


def is_complete(dataset_dir: str | Path) -> bool:
    """Whether `generate` finished this dataset folder (its COMPLETE marker exists)."""
    return (Path(dataset_dir) / "COMPLETE").is_file()


__all__ = ["WORK_DIR", "is_complete"]
