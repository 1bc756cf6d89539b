"""Procedural renderer of the toy world: one coloured shape, a white prop beside it, a motion
that wraps around the frame (a torus), on a plain dark background.

Each clip is one window of an infinite video: the object starts at a seed-chosen position and
moves a fixed number of pixels per frame forever, so a rollout of any length has a ground truth.
Everything is drawn with vectorised numpy masks on the torus, so shapes split across an edge
stay intact. The values here must match `synth_data/vocab/toyworld.yaml` (a test checks it).

Videos are uint8 [F, H, W, 3] (one clip) or [B, F, H, W, 3] (a batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SLOTS = ("subject", "clothing", "props", "action", "background")
SUBJECTS = ("circle", "square", "triangle", "cross")
CLOTHING = ("red", "green", "blue", "yellow")
PROPS = ("dot", "ring", "bar", "pole")
ACTIONS = ("moving left", "moving right", "moving up", "moving down")
BACKGROUNDS = ("black", "navy", "maroon", "teal")
VALUES: dict[str, tuple[str, ...]] = dict(zip(SLOTS, (SUBJECTS, CLOTHING, PROPS, ACTIONS, BACKGROUNDS)))

# Saturated subject colours; dark backgrounds; one white prop colour. Every subject colour is
# >= 110 (RGB L2) away from every background and the prop colour.
CLOTHING_RGB = {"red": (230, 40, 40), "green": (30, 220, 30), "blue": (50, 100, 255), "yellow": (245, 215, 30)}
BACKGROUND_RGB = {"black": (10, 10, 10), "navy": (15, 15, 120), "maroon": (120, 10, 20), "teal": (0, 100, 90)}
PROP_RGB = (255, 255, 255)
# Unit motion per action, (dy, dx) in pixels of a 32-px frame per frame (scaled with the frame).
ACTION_DIRECTION = {"moving left": (0, -1), "moving right": (0, 1), "moving up": (-1, 0), "moving down": (1, 0)}

MIN_SIZE = 20


@dataclass(frozen=True)
class Geometry:
    """Sizes for one frame size; every length scales with min(height, width) (32 px reference)."""

    height: int
    width: int

    @property
    def radius(self) -> float:
        """Subject half-size (about 11 px across at 32 px)."""
        return 0.18 * min(self.height, self.width)

    @property
    def prop_size(self) -> float:
        """Prop half-size unit (props are about 5-7 px across at 32 px)."""
        return 0.09 * min(self.height, self.width)

    @property
    def prop_offset(self) -> int:
        """Columns from the subject's centre to the prop's centre (the prop sits to the right)."""
        return round(self.radius + 1.3 * self.prop_size + 1.5)

    @property
    def speed(self) -> tuple[int, int]:
        """Pixels per frame along (y, x): 2 at 32 px."""
        return max(1, round(self.height / 16)), max(1, round(self.width / 16))


def check_size(height: int, width: int) -> None:
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"toy world frames must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {height}x{width}")


def check_slots(slots: dict[str, str]) -> None:
    """Raise a ValueError naming the slot when `slots` is not a full, valid toy-world assignment."""
    unknown = sorted(set(slots) - set(SLOTS))
    if unknown:
        raise ValueError(f"toy world slots: unknown slot(s) {unknown}; the slots are {list(SLOTS)}")
    for slot in SLOTS:
        if slot not in slots:
            raise ValueError(f"toy world slots: missing slot '{slot}'; allowed values: {list(VALUES[slot])}")
        if slots[slot] not in VALUES[slot]:
            raise ValueError(
                f"toy world slot '{slot}': unknown value {slots[slot]!r}; allowed values: {list(VALUES[slot])}"
            )


def subject_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a subject shape from integer offsets to its centre (broadcast dy, dx)."""
    r = radius
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * r
    if shape == "triangle":  # apex up; base 2r wide, 0.8r below the centre
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    if shape == "cross":  # an upright plus sign
        t = 0.3 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= t)) | ((np.abs(dy) <= r) & (np.abs(dx) <= t))
    raise ValueError(f"toy world slot 'subject': unknown value {shape!r}; allowed values: {list(SUBJECTS)}")


def prop_mask(prop: str, dy: np.ndarray, dx: np.ndarray, size: float) -> np.ndarray:
    """Boolean mask of a prop shape from integer offsets to its centre (broadcast dy, dx)."""
    p = size
    if prop == "dot":  # small filled disk
        return dy**2 + dx**2 <= (0.85 * p) ** 2
    if prop == "ring":  # bigger annulus with a hole
        d2 = dy**2 + dx**2
        return (d2 <= (1.3 * p) ** 2) & (d2 > (0.55 * p) ** 2)
    if prop == "bar":  # horizontal
        return (np.abs(dx) <= 1.3 * p) & (np.abs(dy) <= 0.45 * p)
    if prop == "pole":  # vertical
        return (np.abs(dy) <= 1.3 * p) & (np.abs(dx) <= 0.45 * p)
    raise ValueError(f"toy world slot 'props': unknown value {prop!r}; allowed values: {list(PROPS)}")


def wrapped_offsets(center: np.ndarray, size: int) -> np.ndarray:
    """[N] integer centres -> [N, size] signed offsets pixel - centre on a circle of `size`."""
    half = size // 2
    return (np.arange(size)[None, :] - np.asarray(center)[:, None] + half) % size - half


def start_position(seed: int, height: int, width: int) -> tuple[int, int]:
    """The subject's (y, x) centre at frame 0, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return int(rng.integers(height)), int(rng.integers(width))


def subject_track(slots: dict[str, str], frames: np.ndarray, geo: Geometry, seed: int) -> np.ndarray:
    """[F] frame indices -> [F, 2] integer (y, x) subject centres of the infinite video."""
    y0, x0 = start_position(seed, geo.height, geo.width)
    uy, ux = ACTION_DIRECTION[slots["action"]]
    vy, vx = geo.speed
    ys = (y0 + uy * vy * frames) % geo.height
    xs = (x0 + ux * vx * frames) % geo.width
    return np.stack([ys, xs], axis=1)


def render_video(
    slots: dict[str, str],
    num_frames: int,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    start_frame: int = 0,
) -> np.ndarray:
    """Render frames [start_frame, start_frame + num_frames) of the clip for `slots` and `seed`.

    Deterministic in (slots, seed, height, width); `seed` picks the start position.
    Returns uint8 [F, H, W, 3].
    """
    check_slots(slots)
    check_size(height, width)
    if num_frames < 1:
        raise ValueError(f"num_frames: must be >= 1, got {num_frames}")
    geo = Geometry(height, width)
    track = subject_track(slots, start_frame + np.arange(num_frames), geo, seed)
    dy = wrapped_offsets(track[:, 0], height)[:, :, None]  # [F, H, 1]
    dx = wrapped_offsets(track[:, 1], width)[:, None, :]  # [F, 1, W]
    dx_prop = (dx - geo.prop_offset + width // 2) % width - width // 2
    subject = subject_mask(slots["subject"], dy, dx, geo.radius)
    prop = prop_mask(slots["props"], dy, dx_prop, geo.prop_size)

    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    video[:] = np.asarray(BACKGROUND_RGB[slots["background"]], dtype=np.uint8)
    video[subject] = CLOTHING_RGB[slots["clothing"]]
    video[prop] = PROP_RGB
    return video


def render_batch(
    slots: Sequence[dict[str, str]],
    num_frames: int,
    height: int = 32,
    width: int = 32,
    seeds: Sequence[int] | None = None,
) -> np.ndarray:
    """Render one clip per slot assignment; `seeds` defaults to 0..B-1. Returns uint8 [B, F, H, W, 3]."""
    seeds = list(range(len(slots))) if seeds is None else list(seeds)
    if len(seeds) != len(slots):
        raise ValueError(f"render_batch: got {len(slots)} slot assignments but {len(seeds)} seeds")
    if not slots:
        return np.zeros((0, num_frames, height, width, 3), dtype=np.uint8)
    return np.stack([render_video(s, num_frames, height, width, seed) for s, seed in zip(slots, seeds)])
