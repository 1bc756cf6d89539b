"""A training run's folder, `<output_dir>/students/<name>/`, and how a run resumes:

    checkpoint-<step>/   accelerate state + the student's trainable weights (`0_student_trainable.safetensors`),
                         the EMA and critic (`distill.role_state`), training_state.json written last
    final/               Student.save_pretrained + training_state.json + COMPLETE (written last)
    final_ema/           the EMA weights (train.ema)

A checkpoint resumes only under the recipe that wrote it: its training_state.json keeps a fingerprint of every key
that changes what training computes (`fingerprint`, checked by `check_checkpoint`). The trainer writes this layout;
export, eval and the CLI read it through the functions here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from core.recipe_loader import resolve_path, to_dict
from core.wan_lora import lora_digests
from distill.config import MethodConfig, Recipe, TrainConfig
from distill.data import read_prompts_file
from students.config import StudentConfig
from teachers.config import TeacherConfig

logger = logging.getLogger(__name__)

FINAL = "final"
FINAL_EMA = "final_ema"
TRAINING_STATE = "training_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
STUDENT_WEIGHTS = "student_trainable.safetensors"
COMPLETE = "COMPLETE"
STUDENT_NOT_FINGERPRINTED = ("name", "guidance_scale", "num_inference_steps", "attention")
"""Student keys that change only sampling or the attention kernel: a checkpoint resumes under a recipe that changed
them."""
TRAIN_FINGERPRINTED = (
    "batch_size",
    "gradient_accumulation_steps",
    "optimizer",
    "adam_betas",
    "ema",
    "sharding",
    "seed",
    "data_source",
    "toyworld_pool",
    "toyworld_pool_refresh",
    "prompts_file",
)


def final_dir(student_dir: Path) -> Path:
    """`final/`: the finished run's weights (`Student.save_pretrained`), training_state.json, COMPLETE written last."""
    return Path(student_dir) / FINAL


def is_finished(student_dir: Path) -> bool:
    """Whether the run in `student_dir` finished (`final/COMPLETE` exists)."""
    return (final_dir(student_dir) / COMPLETE).is_file()


def weights_dir(student_dir: Path, use_ema: bool) -> Path:
    """The finished run's weights to use: `final_ema/` when the run kept an EMA and `use_ema`, else `final/`."""
    ema = Path(student_dir) / FINAL_EMA
    return ema if use_ema and ema.is_dir() else final_dir(student_dir)


def is_complete(recipe: Recipe) -> bool:
    return is_finished(recipe.student_dir())


# ---- checkpoints -----------------------------------------------------------------------------------
def fingerprint(recipe: Recipe, num_processes: int) -> dict:
    """Dotted keys a checkpoint must agree on to resume: student layout, method, teacher, training shape."""
    fp = {"teacher.pretrained": recipe.teacher.pretrained}
    if recipe.teacher.lora:  # the teacher a run distils from includes its LoRAs (paths, scales and contents)
        fp["teacher.lora"] = to_dict(recipe.teacher)["lora"]
        fp["teacher.lora.sha256"] = lora_digests(recipe.teacher.lora, "teacher.lora")
    if recipe.student.init_lora:
        fp["student.init_lora.sha256"] = lora_digests(recipe.student.init_lora, "student.init_lora")
    fp.update({f"student.{k}": v for k, v in to_dict(recipe.student).items() if k not in STUDENT_NOT_FINGERPRINTED})
    name = recipe.method.name
    fp["method.name"] = name
    sub = to_dict(recipe.method).get(name)
    if isinstance(sub, dict):
        fp.update({f"method.{name}.{k}": v for k, v in sub.items()})
    fp.update({f"train.{k}": getattr(recipe.train, k) for k in TRAIN_FINGERPRINTED})
    if recipe.train.data_source == "prompts":  # an edited prompt list must not resume into the old run's draws
        source = resolve_path(recipe.train.prompts_file or recipe.data.vocabulary)
        if recipe.train.prompts_file:
            read_prompts_file(source)  # fails fast, naming the file and line, before any model loads
        fp["train.prompts_sha256"] = hashlib.sha256(source.read_bytes()).hexdigest()
    fp["num_processes"] = num_processes
    return json.loads(json.dumps(fp))  # JSON-normalised (int dict keys -> str), as read back from disk


def step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(student_dir: Path) -> list[Path]:
    """Finished `checkpoint-<step>/` folders (with training_state.json, written last), oldest first."""
    found = [
        p
        for p in student_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) and (p / TRAINING_STATE).is_file()
    ]
    return sorted(found, key=step_of)


def resolve_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint `train.resume_from_checkpoint` names (`latest` or a path), or None."""
    want, student_dir = recipe.train.resume_from_checkpoint, recipe.student_dir()
    if want is None:
        found = list_checkpoints(student_dir)
        if found:  # a fresh run would interleave its checkpoints with the old run's (and prune the wrong ones)
            raise ValueError(
                f"train.resume_from_checkpoint: null, but {student_dir} already has {found[-1].name} from an earlier "
                "run; set it to `latest` to continue, or delete that folder (or pick a new student.name) to start over"
            )
        return None
    if want == "latest":
        found = list_checkpoints(student_dir)
        if not found:
            raise FileNotFoundError(
                f"train.resume_from_checkpoint: latest: no finished checkpoint-<step>/ in {student_dir}; "
                "train without it first (set it to null)"
            )
        return found[-1]
    path = Path(want)
    if not (path / TRAINING_STATE).is_file():
        raise FileNotFoundError(
            f"train.resume_from_checkpoint: {path} is not a finished checkpoint (no {TRAINING_STATE}); "
            f"give a checkpoint-<step>/ folder from {student_dir} or `latest`"
        )
    return path


def _default_of(dotted: str):
    """The JSON-normalised default of a fingerprinted recipe key (`student.sink`, `method.kd.shift`, ...)."""
    section, *rest = dotted.split(".")
    sections = {"teacher": TeacherConfig, "student": StudentConfig, "method": MethodConfig, "train": TrainConfig}
    cls = sections.get(section)
    for i, name in enumerate(rest):
        field = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls else None
        if field is None:
            return UNSET
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            return UNSET
        if i < len(rest) - 1:
            cls = type(value) if dataclasses.is_dataclass(value) else None
    return json.loads(json.dumps(to_dict(value)))


def read_state(path: Path) -> dict:
    """A checkpoint's (or final/'s) training_state.json; a damaged one is a one-line error naming it."""
    file = path / TRAINING_STATE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict) or "step" not in state:
            raise ValueError("no step or fingerprint")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{file}: damaged ({str(e).splitlines()[0]}); resume from an earlier checkpoint-<step>/ "
            "(train.resume_from_checkpoint=<path>) or delete this folder"
        ) from None
    return state


UNSET = "<unset>"


def _differences(saved: dict, now: dict, saved_as: str, most: int) -> str:
    """'key: <saved_as> a, recipe has b; ...' for the first `most` keys whose values differ ('' if none)."""
    keys = [k for k in dict.fromkeys([*saved, *now]) if saved.get(k, UNSET) != now.get(k, UNSET)]
    return "; ".join(f"{k}: {saved_as} {saved.get(k, UNSET)!r}, recipe has {now.get(k, UNSET)!r}" for k in keys[:most])


def check_checkpoint(path: Path, expected: dict) -> dict:
    """Read a checkpoint's training_state.json; fail fast, naming the keys, if it came from another recipe."""
    state = read_state(path)
    saved = state["fingerprint"]
    # A key the checkpoint lacks was added to the toolkit after it was written: the run behaved as its default.
    saved = {**{k: default for k in expected if k not in saved if (default := _default_of(k)) is not UNSET}, **saved}
    shown = _differences(saved, expected, "checkpoint has", 4)
    if shown:
        raise ValueError(
            f"train.resume_from_checkpoint: {path} was written by another recipe ({shown}); resume with the "
            "recipe that wrote it, or set train.resume_from_checkpoint: null and a new student.name"
        )
    return state


def write_state(path: Path, step: int, samples_per_step: int, fp: dict, config: dict | None = None) -> None:
    """training_state.json (written last, atomically); `config`: `trained_config` of the recipe (final/ only)."""
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    state = {
        "step": step,
        "data_position": step * samples_per_step,
        "samples_per_step": samples_per_step,
        "fingerprint": fp,
        "fingerprint_sha256": digest,
    }
    if config is not None:
        state["config"] = config
    tmp = path / f".{TRAINING_STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path / TRAINING_STATE)


def prune(student_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for old in list_checkpoints(student_dir)[:-limit]:
        shutil.rmtree(old)
        logger.info("removed %s (train.checkpoints_total_limit=%d)", old, limit)


NOT_IN_TRAINED_CONFIG = frozenset(
    {
        "student.name",
        "train.resume_from_checkpoint",
        "train.log_every",
        "train.log_with",
        "train.tracker_project",
        "train.validation_steps",  # previews draw from their own generators: the weights are the same
        "train.validation_prompts",
        "train.checkpointing_steps",
        "train.checkpoints_total_limit",
        "train.dataloader_num_workers",
        "teacher.offload",
        "teacher.encode_cache_size",
    }
)
"""Keys that change where and how a run logs or saves, never the weights it ends with."""


def trained_config(recipe: Recipe) -> dict:
    """Every recipe key that shaped a finished run's weights, as flat dotted keys (JSON-normalised): the teacher,
    student, train sections and the method's name and own sub-section. Stored in `final/training_state.json`."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif prefix not in NOT_IN_TRAINED_CONFIG:
            flat[prefix] = value

    sections = recipe.to_dict()
    for name in ("teacher", "student", "train"):
        walk(name, sections[name])
    method = recipe.method.name
    flat["method.name"] = method
    walk(f"method.{method}", sections["method"][method])
    return json.loads(json.dumps(flat))


def check_finished(recipe: Recipe) -> None:
    """A finished run (`final/`) was trained by this recipe: every `trained_config` key agrees (runs finished before
    the toolkit stored it: the resume fingerprint agrees). Else a one-line error naming the keys."""
    final = final_dir(recipe.student_dir())
    state = read_state(final)
    if "config" in state:
        saved, now = state["config"], trained_config(recipe)
    else:
        saved = state["fingerprint"]
        now = fingerprint(recipe, saved.get("num_processes", 1))
    # a key the run lacks was added to the toolkit after it finished: the run behaved as its default
    saved = {**{k: default for k in now if k not in saved if (default := _default_of(k)) is not UNSET}, **saved}
    shown = _differences(saved, now, "trained with", 3)
    if shown:
        raise ValueError(
            f"{final}: trained under another recipe ({shown}); restore those keys, or train anew under "
            "another student.name (or delete the student's folder)"
        )
