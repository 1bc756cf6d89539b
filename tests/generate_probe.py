"""`accelerate launch tests/generate_probe.py RECIPE.yaml [dotted.key=value ...]`: the generate stage alone, logging
on every rank (the CLI logs on rank 0 only), so tests/test_generate.py can see which process rendered which shard."""

from __future__ import annotations

import logging
import sys

from distill.accel import make_accelerator
from distill.config import load_recipe
from synth_data.generate import generate

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    generate(recipe.data, recipe.teacher, recipe.out, make_accelerator())
