"""`accelerate launch ... -m synth_data._generate_cli RECIPE.yaml [dotted.key=value ...]`: the generate stage
alone, for tests of multi-process generation (the user-facing entry is `python -m distill generate`)."""

from __future__ import annotations

import logging
import sys

from distill.accel import make_accelerator
from distill.config import load_recipe
from synth_data.generate import generate


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(argv[0], argv[1:])
    generate(recipe, make_accelerator())


if __name__ == "__main__":
    main(sys.argv[1:])
