"""`python -m distill STAGE RECIPE.yaml [dotted.key=value ...] [--dry-run]` (frozen; also under
`accelerate launch -m distill ...`). A new option is a recipe key, never a flag."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from tqdm.auto import tqdm

from core.recipe_loader import RecipeError, describe_keys
from distill.accel import make_accelerator
from distill.checkpoints import check_finished, final_dir, is_finished
from distill.config import Recipe, load_recipe
from distill.export_stage import export_stage
from distill.hub import push_student
from distill.memory_plan import plan_memory
from distill.trainer import check_train_recipe, train
from synth_data.compose_stage import compose_stage
from synth_data.push import PushError, push

logger = logging.getLogger("distill")

STAGES = ("compose", "generate", "push", "train", "export", "eval", "run", "stream", "serve")


STAGE_HELP = {
    "compose": ("compose the prompts into <output_dir>/prompts.jsonl", ("data",)),
    "generate": ("render every prompt with the teacher into <output_dir>/dataset/", ("data", "teacher")),
    "push": (
        "upload to the Hub (token from HF_TOKEN or the saved login): a student recipe's export to "
        "export.hub_repo_id, else the dataset to data.hub_repo_id",
        ("data", "export"),
    ),
    "train": ("train the student with the method", ("teacher", "student", "method", "train")),
    "export": ("write the trained student's export formats", ("student", "export")),
    "eval": ("grade the teacher and every finished student", ("teacher", "eval")),
    "stream": (
        "stream one long video from the causal student into an mp4, chunk by chunk (prompt switches, continuation)",
        ("teacher", "stream"),
    ),
    "serve": (
        "serve a local page (127.0.0.1) that plays the causal student's stream live, with a box to switch the prompt",
        ("teacher", "stream", "serve"),
    ),
    "run": (
        "compose, generate, train and export, skipping what is complete",
        ("data", "teacher", "student", "method", "train", "export"),
    ),
}
"""Stage -> (what it does, the recipe sections it reads)."""


def stage_help(stage: str) -> str:
    """`python -m distill STAGE --help`: what the stage does and every recipe key it reads, with its default and
    docstring (from the section dataclasses)."""
    what, sections = STAGE_HELP[stage]
    lines = [
        f"usage: python -m distill {stage} RECIPE.yaml [dotted.key=value ...] [--dry-run]",
        "",
        f"{stage}: {what}.",
        "",
        "Recipe keys it reads (key = default, then what it means):",
    ]
    for section in sections:
        hint = typing.get_type_hints(Recipe)[section]
        cls = next(a for a in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(a))
        lines += ["", f"{section}:", *describe_keys(cls, section)]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] in STAGES and any(a in ("-h", "--help") for a in argv[1:]):
        print(stage_help(argv[0]))
        raise SystemExit(0)
    epilog = "stages:\n" + "\n".join(f"  {s:<9} {w}" for s, (w, _) in STAGE_HELP.items())
    epilog += "\n\n`python -m distill STAGE --help` lists the recipe keys a stage reads."
    p = argparse.ArgumentParser(
        prog="python -m distill",
        description=__doc__,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("stage", choices=STAGES)
    p.add_argument("recipe", help="a recipe YAML, e.g. recipes/toyworld.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. data.num_prompts=8")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print it resolved, and exit")
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="with --dry-run of train / run: compare the memory plan with this much memory per GPU",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="with --dry-run: plan for N processes (default: accelerate's WORLD_SIZE, else 1)",
    )
    return p.parse_intermixed_args(argv)  # overrides may stand before or after --dry-run


def stage_compose(recipe: Recipe) -> None:
    compose_stage(recipe.data, recipe.out)


def stage_generate(recipe: Recipe) -> None:
    from synth_data.generate import generate  # PyAV + datasets: absent on GPU-only training images

    generate(recipe.data, recipe.teacher, recipe.out, make_accelerator())


def stage_push(recipe: Recipe) -> None:
    """A student recipe pushes the student's export (`export.hub_repo_id`), a data recipe the dataset
    (`data.hub_repo_id`)."""
    if recipe.student is not None:
        logger.info("pushed to %s", push_student(recipe))
    else:
        logger.info("pushed to %s", push(recipe.data, recipe.teacher.pretrained, recipe.out))


def stage_train(recipe: Recipe) -> None:
    _need_student(recipe, "train")
    train(
        recipe,
        make_accelerator(
            mixed_precision=recipe.train.mixed_precision,
            gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        ),
    )


def stage_export(recipe: Recipe) -> None:
    _need_student(recipe, "export")
    export_stage(recipe)


def stage_stream(recipe: Recipe) -> None:
    from distill.stream_stage import stream_stage  # PyAV: the mp4 writer

    stream_stage(recipe)


def stage_serve(recipe: Recipe) -> None:
    from distill.serve import serve_stage

    serve_stage(recipe)


def stage_eval(recipe: Recipe) -> None:
    from distill.eval import evaluate  # PyAV + datasets (videos, previews): absent on GPU-only training images

    evaluate(recipe)


def _need_student(recipe: Recipe, stage: str) -> None:
    if recipe.student is None:
        raise RecipeError(f"{recipe.source}: `{stage}` needs a student recipe (with `student` and `method` sections)")


def stage_run(recipe: Recipe) -> None:
    """Chain the stages; each one skips itself when its outputs are already complete."""
    if recipe.student is not None and recipe.train.data_source != "dataset":
        logger.info("compose, generate: skipped, train.data_source: %s reads no dataset", recipe.train.data_source)
    else:
        stage_compose(recipe)
        stage_generate(recipe)  # a complete dataset returns at once, once its fingerprint matches the recipe
    if recipe.student is not None:
        if is_finished(recipe.student_dir()):
            check_finished(recipe)  # the finished weights must be this recipe's, or export would mislabel them
            logger.info("train: %s is complete, skipping", final_dir(recipe.student_dir()))
        else:
            stage_train(recipe)
        stage_export(recipe)


def check_stage(recipe: Recipe, stage: str) -> None:
    """The checks `stage` runs on the recipe before it loads a model (`--dry-run` runs them and stops)."""
    if stage in ("train", "export"):
        _need_student(recipe, stage)
    if stage == "train" or (stage == "run" and recipe.student is not None):
        check_train_recipe(recipe)
    if stage in ("generate", "run") and recipe.data.images:
        from synth_data.generate import image_items  # PyAV and datasets: not on GPU images that train only

        image_items(recipe.data.images)
    if stage == "stream" and not recipe.stream.prompt:
        raise ValueError('stream.prompt: not set; e.g. stream.prompt="a red cat"')
    if stage in ("stream", "serve") and recipe.stream.student is None and recipe.student is None:
        raise ValueError(f"{recipe.source}: `{stage}` needs a student recipe or stream.student (a saved student)")
    if stage == "push":
        key = "export.hub_repo_id" if recipe.student is not None else "data.hub_repo_id"
        if not (recipe.export.hub_repo_id if recipe.student is not None else recipe.data.hub_repo_id):
            raise ValueError(f"{key}: not set; set it to a repo you can write to")


def _close_progress_bars() -> None:
    """End the bars a failed stage left open, so the error starts on a line of its own."""
    for bar in list(tqdm._instances):  # tqdm's registry of open bars
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Log on rank 0 only (accelerate sets RANK for every process it launches).
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(recipe.to_yaml(), end="")
        try:
            check_stage(recipe, args.stage)
        except (RecipeError, ValueError, OSError) as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"dry run: the recipe passes `{args.stage}`'s checks (no model was loaded)", file=sys.stderr)
        if args.stage in ("train", "run", "generate"):
            processes = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
            try:
                plan = plan_memory(recipe, processes, teacher_only=args.stage == "generate")
                print(plan.table(args.gpu_memory), file=sys.stderr)
            except ValueError as e:  # the plan informs; the recipe itself passed its checks
                print(f"memory plan: not available: {str(e).splitlines()[0]}", file=sys.stderr)
        return 0
    stage = globals()[f"stage_{args.stage}"]
    try:
        stage(recipe)
    except KeyboardInterrupt:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        _close_progress_bars()
        how = " with train.resume_from_checkpoint=latest" if args.stage in ("train", "run") else ""
        print(
            f"interrupted: `{args.stage}` stopped; what it finished is kept. Rerun the same command{how} to go on",
            file=sys.stderr,
        )
        return 130
    except (RecipeError, ValueError, OSError, PushError) as e:  # OSError: a missing or unwritable file, a full disk
        if os.environ.get("DISTILL_DEBUG"):  # the full traceback, for bug reports
            raise
        _close_progress_bars()
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
