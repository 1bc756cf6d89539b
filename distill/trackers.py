"""Experiment trackers through accelerate (`train.log_with`): which package each needs, and starting them with the
run's flattened recipe as their config; wandb without a key or login logs offline into the student's folder."""

from __future__ import annotations

import logging
import os

from accelerate import Accelerator

from distill.config import Recipe

logger = logging.getLogger(__name__)


TRACKER_MODULES = {
    "tensorboard": "tensorboard",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "mlflow": "mlflow",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
    "wandb": "wandb",
}
"""accelerate tracker -> the package it needs (checked before training, so a missing one fails in a line)."""


def start_trackers(accelerator: Accelerator, recipe: Recipe) -> None:
    tc, logs = recipe.train, recipe.student_dir() / "logs"
    if not tc.log_with:
        return
    if not accelerator.log_with:  # built without trackers: add ours, writing into the student's folder
        from accelerate.tracking import TensorBoardTracker
        from accelerate.utils import LoggerType

        for name in tc.log_with:
            # tensorboard keeps its `logs/train/` layout; the others take accelerate's (project, logging_dir)
            accelerator.log_with.append(
                TensorBoardTracker("train", logs) if name == "tensorboard" else LoggerType(name)
            )
        accelerator.project_configuration.logging_dir = str(logs)
    if "wandb" in tc.log_with and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        if not _wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"
            logger.info("train: wandb has no API key or login: logging offline under %s (`wandb sync` later)", logs)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", recipe.to_dict())
    if accelerator.is_main_process:
        logs.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(
        tc.tracker_project, config=flat, init_kwargs={"wandb": {"name": recipe.student.name, "dir": str(logs)}}
    )


def _wandb_logged_in() -> bool:
    """A saved `wandb login` (its key in ~/.netrc for the wandb host)."""
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)
