"""One writer per output: a stage that writes a folder holds a lock file beside it for as long as it runs, so a
second run of the same stage on the same folder stops at once instead of racing the first (filelock: released by
the OS when the holder dies, so a killed run leaves no stale lock)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


@contextmanager
def exclusive(path: Path, what: str, enabled: bool = True) -> Iterator[None]:
    """Hold lock file `path` for the block; another holder makes it raise ValueError naming `what` and the file.
    `enabled` False (the non-main processes of one launch) holds nothing."""
    if not enabled:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(
            f"{path}: another {what} is running on this output (it holds this lock); wait for it to finish or stop it"
        ) from None
    try:
        yield
    finally:
        lock.release()


__all__ = ["exclusive"]
