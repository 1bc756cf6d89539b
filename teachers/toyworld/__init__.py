"""The toy world: a procedural video renderer driven by the slot grammar, and its oracle."""

from teachers.toyworld.oracle import grade, read_video
from teachers.toyworld.render import SLOTS, VALUES, render_batch, render_video

__all__ = ["SLOTS", "VALUES", "grade", "read_video", "render_batch", "render_video"]
