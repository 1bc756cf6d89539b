"""Build the *untrained* toy-world teacher folder that `recipes/toyworld_teacher.yaml` trains.

    python -m teachers.toyworld.build outputs/toyworld_teacher/init

The tokenizer covers every word of the toy vocabulary (slot values, templates, negative prompt). The
transformer's shape is fixed here (TRANSFORMER) so that the shipped weights and this script agree.

A token carries 3x4x4 px x 3 channels = 144 numbers, so the width (heads x head size) must be at least 144: at 4 x 32
= 128 (the earlier teacher) `proj_out` could not reach 16 directions per token and `patch_embedding` could
not see 16; the noise a sample starts with stayed there to the end and 44% of the flow-matching loss lay out of
reach
(docs/results/toyworld_teacher.md). `unreachable_dims` checks it.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from core.vocabulary import load_vocabulary
from teachers.tiny import words_of
from teachers.toyworld.pipeline import build_toy_pipeline, save_toy_pipeline

logger = logging.getLogger(__name__)

VOCABULARY = Path(__file__).resolve().parents[2] / "synth_data" / "vocab" / "toyworld.yaml"

TEXT_DIM = 48  # >= the vocabulary + special tokens, so word embeddings are exactly orthogonal
TRANSFORMER = dict(
    patch_size=(3, 4, 4),  # 3 frames x 4x4 px per token: 192 tokens for a 9-frame 32x32 clip
    num_attention_heads=5,  # width 160 >= 144 numbers per token (see the module docstring)
    attention_head_dim=32,
    in_channels=3,
    out_channels=3,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=384,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=256,
)


def unreachable_dims(config: dict) -> int:
    """Per-token output directions a WanTransformer3DModel of this config cannot produce (0 when wide enough)."""
    pt, ph, pw = config["patch_size"]
    return max(0, pt * ph * pw * config["out_channels"] - config["num_attention_heads"] * config["attention_head_dim"])


def toy_words(vocab_path: Path = VOCABULARY) -> list[str]:
    vocab = load_vocabulary(vocab_path)
    templates = [re.sub(r"\{[a-z_]+\}", " ", t) for t in vocab.templates]  # placeholders are not words
    texts = [v for values in vocab.slots.values() for v in values] + templates
    return words_of(texts + [vocab.negative_prompt or ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the WanPipeline")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    pipe = build_toy_pipeline(toy_words(), transformer_kwargs=TRANSFORMER, text_dim=TEXT_DIM, seed=args.seed)
    save_toy_pipeline(pipe, args.out)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    logger.info("toy teacher (untrained, %.2fM transformer params) written to %s", n / 1e6, args.out)


if __name__ == "__main__":
    main()
