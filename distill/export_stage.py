"""The `export` stage: load the trained student (EMA weights when kept) and write the export formats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from core.files import load_safetensors
from distill.checkpoints import (
    CHECKPOINT_PREFIX,
    STUDENT_WEIGHTS,
    TRAINING_STATE,
    check_finished,
    final_dir,
    is_finished,
    list_checkpoints,
    weights_dir,
)
from distill.config import Recipe
from distill.export import export_student
from distill.role_state import EMA_WEIGHTS, check_no_pickles, load_ema
from students.student import Student, build_student
from teachers.wan import WanTeacher

logger = logging.getLogger(__name__)


def trained_student_dir(recipe: Recipe) -> Path:
    """`final_ema/` when the run kept an EMA and `export.use_ema`, else `final/`; must be complete."""
    base = recipe.student_dir()
    if not is_finished(base):
        raise FileNotFoundError(
            f"{final_dir(base)}: no finished training run; run `python -m distill train {recipe.source}` first"
        )
    check_finished(recipe)  # the card states this recipe: it must be the one the weights were trained with
    return weights_dir(base, recipe.export.use_ema)


def checkpoint_dir(recipe: Recipe, name: str) -> Path:
    """The training checkpoint `export.checkpoint` names: `latest` or `checkpoint-<step>` under the student's folder."""
    base = recipe.student_dir()
    found = list_checkpoints(base)
    if name == "latest":
        if not found:
            raise FileNotFoundError(f"export.checkpoint: latest: no finished checkpoint-<step>/ in {base}")
        return found[-1]
    path = base / name
    if not name.startswith(CHECKPOINT_PREFIX) or not (path / TRAINING_STATE).is_file():
        raise FileNotFoundError(
            f"export.checkpoint: {path} is not a finished checkpoint; use `latest` or one of "
            f"{[p.name for p in found] or 'none yet'}"
        )
    return path


def student_from_checkpoint(recipe: Recipe, teacher, path: Path) -> Student:
    """The student as training checkpoint `path` holds it: its trainable weights, replaced by the EMA's when the run
    kept one and `export.use_ema` (`distill.role_state`)."""
    from diffusers.training_utils import EMAModel

    student = build_student(recipe.student, teacher.pipe.transformer)
    weights = path / f"0_{STUDENT_WEIGHTS}"
    student.load_trainable_state_dict(load_safetensors(str(weights)), where=str(weights))
    use_ema = recipe.train.ema and recipe.export.use_ema
    if use_ema:
        check_no_pickles(path)
        if not (path / EMA_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"export.checkpoint: {path} has no EMA ({EMA_WEIGHTS}) though train.ema is set; "
                "set export.use_ema=false to export the raw weights"
            )
        params = student.trainable_parameters()
        ema = EMAModel(params, decay=recipe.train.ema_decay)
        load_ema(ema, path)
        ema.copy_to(params)
    logger.info("export: weights of %s%s", path, " (EMA)" if use_ema else "")
    return student


def export_stage(recipe: Recipe) -> dict[str, Path]:
    teacher = WanTeacher.from_config(recipe.teacher)
    if recipe.export.checkpoint is not None:
        student = student_from_checkpoint(recipe, teacher, checkpoint_dir(recipe, recipe.export.checkpoint))
    else:
        student = Student.from_pretrained(trained_student_dir(recipe), teacher.pipe.transformer, cfg=recipe.student)
    report_path = recipe.out / "eval" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    out = export_student(recipe, student, teacher.pipe, recipe.student_dir() / "export", eval_report=report)
    for fmt, path in out.items():
        logger.info("export: %s -> %s", fmt, path)
    return out
