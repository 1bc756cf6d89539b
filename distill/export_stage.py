"""The `export` stage: load the trained student (EMA weights when kept) and write the export formats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from distill.config import Recipe
from distill.export import export_student
from students.student import Student
from teachers.wan import WanTeacher

logger = logging.getLogger(__name__)


def trained_student_dir(recipe: Recipe) -> Path:
    """`final_ema/` when the run kept an EMA and `export.use_ema`, else `final/`; must be complete."""
    base = recipe.student_dir()
    final = base / "final"
    if not (final / "COMPLETE").exists():
        raise FileNotFoundError(f"{final}: no finished training run; run `python -m distill train {recipe.source}` first")
    ema = base / "final_ema"
    return ema if recipe.export.use_ema and ema.exists() else final


def export_stage(recipe: Recipe) -> dict[str, Path]:
    teacher = WanTeacher.from_config(recipe.teacher)
    folder = trained_student_dir(recipe)
    student = Student.from_pretrained(folder, teacher.pipe.transformer, cfg=recipe.student)
    report_path = recipe.out / "eval" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    out = export_student(recipe, student, teacher.pipe, recipe.student_dir() / "export", eval_report=report)
    for fmt, path in out.items():
        logger.info("export: %s -> %s", fmt, path)
    return out
