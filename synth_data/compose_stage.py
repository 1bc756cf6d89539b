"""The `compose` stage: vocabulary → `<output_dir>/prompts.jsonl` + `coverage.json`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from core.files import write_text_atomic
from core.recipe_loader import resolve_path
from core.vocabulary import load_vocabulary
from synth_data.composer import compose, coverage, format_coverage, read_prompts, write_prompts
from synth_data.config import DataConfig

logger = logging.getLogger(__name__)


def _write_json_atomic(obj: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def compose_stage(data: DataConfig, out: Path) -> Path:
    """Compose the prompts (deterministic from vocabulary, n, seed); rank 0 writes, others wait.

    An existing prompts.jsonl with different content is only replaced while no dataset was generated
    from it; otherwise the stage fails instead of silently mixing two prompt sets.
    """
    out = Path(out)
    path = out / "prompts.jsonl"
    vocab = load_vocabulary(resolve_path(data.vocabulary))
    rows = compose(vocab, data.num_prompts, data.seed, data.mode)
    if os.environ.get("RANK", "0") != "0":
        return path  # rank 0 writes; the generate stage waits for it via accelerate
    out.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if read_prompts(path) == rows:
            logger.info("compose: %s is up to date (%d prompts), skipping", path, len(rows))
            return path
        if (out / "dataset").exists():
            raise ValueError(
                f"{path}: differs from what data.* now composes, and {out / 'dataset'} was generated from it; "
                "use another output_dir or delete that folder"
            )
    write_prompts(rows, path)
    cov = coverage(rows, vocab)
    _write_json_atomic(cov, out / "coverage.json")
    logger.info("compose: wrote %d prompts to %s\n%s", len(rows), path, format_coverage(cov))
    return path
