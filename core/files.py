"""Files that are either whole or absent: written to a temp file in the same folder, flushed to disk, then renamed
over the target (`os.replace`); on any error the temp file goes and the old file stays. The result gets the mode a
plain `open(path, "w")` would (0666 less the umask), not mkstemp's private 0600."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in `path`'s folder; on success it replaces `path` (os.replace), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`path.write_text(text)` (UTF-8), whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


__all__ = ["atomic_path", "load_safetensors", "write_text_atomic"]


def load_safetensors(path: str | os.PathLike) -> dict:
    """`safetensors.torch.load_file` on the CPU; a missing, truncated or foreign file is a ValueError naming it
    (safetensors' own error does not say which file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); restore it or resume "
            "from an earlier checkpoint"
        ) from None
