"""Toy world: the procedural renderer, its oracle, and the vocabulary YAML they share."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from teachers.toyworld import grade, read_video, render_batch, render_video
from teachers.toyworld.render import (
    BACKGROUND_RGB,
    CLOTHING_RGB,
    PROP_RGB,
    SLOTS,
    VALUES,
    Geometry,
    prop_mask,
    subject_mask,
)

VOCAB = Path(__file__).resolve().parents[1] / "synth_data" / "vocab" / "toyworld.yaml"
SLOTS_0 = {"subject": "triangle", "clothing": "blue", "props": "ring", "action": "moving right", "background": "teal"}


def balanced_slots(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """n slot assignments where every value of every slot occurs n/4 times, independently shuffled."""
    columns = {s: rng.permutation(np.arange(n) % len(VALUES[s])) for s in SLOTS}
    return [{s: VALUES[s][columns[s][i]] for s in SLOTS} for i in range(n)]


def blur(videos: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over H and W (wrapping), as float."""
    x = videos.astype(np.float32)
    for axis in (-3, -2):
        x = 0.25 * np.roll(x, 1, axis) + 0.5 * x + 0.25 * np.roll(x, -1, axis)
    return x


# --- oracle ---------------------------------------------------------------------------------


def test_oracle_reads_rendered_ground_truth():
    rng = np.random.default_rng(0)
    slots = balanced_slots(500, rng)
    start = time.perf_counter()
    videos = render_batch(slots, 9, 32, 32, seeds=rng.integers(0, 2**31, 500))
    assert time.perf_counter() - start < 5.0, "rendering 500 clips of 9 frames must be vectorised"
    assert videos.shape == (500, 9, 32, 32, 3) and videos.dtype == np.uint8
    result = grade(videos, slots)
    assert result["accuracy"]["all"] >= 0.99, result
    assert len(result["segment_accuracy"]) == 1

    # grade compares with the labels: shifting one slot's labels by one value makes it always wrong.
    shifted = [{**s, "props": VALUES["props"][(VALUES["props"].index(s["props"]) + 1) % 4]} for s in slots[:100]]
    wrong = grade(videos[:100], shifted)["accuracy"]
    assert wrong["props"] == 0.0 and wrong["all"] == 0.0 and wrong["subject"] >= 0.99


def test_oracle_reads_every_segment_of_long_rollouts():
    rng = np.random.default_rng(1)
    slots = balanced_slots(200, rng)
    videos = render_batch(slots, 90, 32, 32, seeds=rng.integers(0, 2**31, 200))
    result = grade(videos, slots, num_segments=10)
    assert len(result["segment_accuracy"]) == 10
    assert min(result["segment_accuracy"]) >= 0.99, result

    # A clip whose motion flips half-way is read per segment.
    left = render_video({**SLOTS_0, "action": "moving left"}, 10, seed=3)
    right = render_video({**SLOTS_0, "action": "moving right"}, 10, seed=3)
    reads = read_video(np.concatenate([left, right]), num_segments=2)
    assert [r["action"] for r in reads] == ["moving left", "moving right"]
    flipped = grade(np.concatenate([left, right])[None], [{**SLOTS_0, "action": "moving left"}], num_segments=2)
    assert flipped["segment_slot_accuracy"]["action"] == [1.0, 0.0]
    assert flipped["segment_slot_accuracy"]["subject"] == [1.0, 1.0] and flipped["segment_accuracy"] == [1.0, 0.0]

    # 2-frame segments read motion from one step, including the steps that cross the edge.
    for action in VALUES["action"]:
        reads = read_video(render_video({**SLOTS_0, "action": action}, 32, seed=9), num_segments=16)
        assert [r["action"] for r in reads] == [action] * 16


def test_oracle_is_at_chance_on_noise():
    rng = np.random.default_rng(2)
    slots = balanced_slots(500, rng)
    noise = rng.integers(0, 256, size=(500, 9, 32, 32, 3), dtype=np.uint8)
    accuracy = grade(noise, slots)["accuracy"]
    for slot in SLOTS:
        assert abs(accuracy[slot] - 0.25) <= 0.1, (slot, accuracy)
    assert accuracy["all"] <= 0.05, accuracy


def test_oracle_is_robust_to_pixel_noise_and_blur():
    rng = np.random.default_rng(3)
    slots = balanced_slots(300, rng)
    videos = render_batch(slots, 9, 32, 32, seeds=rng.integers(0, 2**31, 300))
    noisy = blur(videos) + rng.normal(0.0, 12.0, size=videos.shape)
    noisy = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    assert np.abs(noisy.astype(int) - videos).mean() > 8  # the corruption is real
    result = grade(noisy, slots)
    assert result["accuracy"]["all"] >= 0.95, result


@pytest.mark.parametrize("height,width", [(24, 24), (48, 48), (32, 48)])
def test_oracle_reads_other_frame_sizes(height, width):
    rng = np.random.default_rng(height * width)
    slots = balanced_slots(100, rng)
    videos = render_batch(slots, 9, height, width, seeds=rng.integers(0, 2**31, 100))
    assert videos.shape == (100, 9, height, width, 3)
    assert grade(videos, slots)["accuracy"]["all"] >= 0.99


def test_oracle_rejects_bad_input():
    video = render_video(SLOTS_0, 9)
    with pytest.raises(ValueError, match="num_segments=5 over 9 frames"):
        read_video(video, num_segments=5)
    with pytest.raises(ValueError, match="uint8"):
        read_video(video.astype(np.float32))
    with pytest.raises(ValueError, match="2 videos but 1"):
        grade(np.stack([video, video]), [SLOTS_0])


# --- renderer -------------------------------------------------------------------------------


def test_render_is_deterministic_and_seed_moves_the_start():
    a = render_video(SLOTS_0, 5, seed=7)
    assert np.array_equal(a, render_video(SLOTS_0, 5, seed=7))
    assert np.array_equal(render_batch([SLOTS_0], 5, seeds=[7])[0], a)
    assert not np.array_equal(a, render_video(SLOTS_0, 5, seed=8))
    # Every slot changes the picture.
    for slot in SLOTS:
        for value in VALUES[slot]:
            if value != SLOTS_0[slot]:
                assert not np.array_equal(a, render_video({**SLOTS_0, slot: value}, 5, seed=7)), (slot, value)


def test_start_frame_continues_the_same_video():
    for action in VALUES["action"]:
        slots = {**SLOTS_0, "action": action}
        full = render_video(slots, 20, seed=11)
        assert np.array_equal(full[10:], render_video(slots, 10, seed=11, start_frame=10))


@pytest.mark.parametrize(
    "action,axis,sign", [("moving left", 1, -1), ("moving right", 1, 1), ("moving up", 0, -1), ("moving down", 0, 1)]
)
def test_motion_wraps_around_and_keeps_the_object_intact(action, axis, sign):
    slots = {**SLOTS_0, "action": action}
    video = render_video(slots, 60, seed=5)
    geo = Geometry(32, 32)
    d = np.arange(-16, 16)
    subject_area = subject_mask(slots["subject"], d[:, None], d[None, :], geo.radius).sum()
    prop_area = prop_mask(slots["props"], d[:, None], d[None, :], geo.prop_size).sum()
    # Each frame is the previous one rolled by 2 px along the motion, so nothing is ever cut.
    for t in range(1, 60):
        assert np.array_equal(video[t], np.roll(video[t - 1], 2 * sign, axis=axis)), t
    # The object crosses the edge (split frames exist) and stays whole in every frame.
    is_subject = (video == CLOTHING_RGB[slots["clothing"]]).all(-1)
    is_prop = (video == PROP_RGB).all(-1)
    assert (is_subject.sum(axis=(1, 2)) == subject_area).all()
    assert (is_prop.sum(axis=(1, 2)) == prop_area).all()
    background = (video == BACKGROUND_RGB[slots["background"]]).all(-1)
    assert (background | is_subject | is_prop).all()
    along = is_subject.any(axis=2 - axis)  # [F, size] occupancy along the motion axis
    assert (along[:, 0] & along[:, -1]).any(), "the subject never wrapped across the edge"
    assert np.array_equal(video[0], video[16])  # period = 32 px / 2 px per frame


def test_unknown_values_and_bad_sizes_raise():
    with pytest.raises(ValueError, match=r"slot 'props': unknown value 'hat'.*'dot', 'ring', 'bar', 'pole'"):
        render_video({**SLOTS_0, "props": "hat"}, 3)
    with pytest.raises(ValueError, match="missing slot 'action'"):
        render_video({s: v for s, v in SLOTS_0.items() if s != "action"}, 3)
    with pytest.raises(ValueError, match="unknown slot"):
        render_video({**SLOTS_0, "mood": "happy"}, 3)
    with pytest.raises(ValueError, match="at least 20x20"):
        render_video(SLOTS_0, 3, height=12, width=32)
    with pytest.raises(ValueError, match="num_frames"):
        render_video(SLOTS_0, 0)


def test_vocab_yaml_matches_the_renderer():
    vocab = yaml.safe_load(VOCAB.read_text())
    assert vocab["name"] == "toyworld"
    assert tuple(vocab["slots"]) == SLOTS
    every = []
    for slot in SLOTS:
        values = [v["value"] if isinstance(v, dict) else v for v in vocab["slots"][slot]]
        assert tuple(values) == VALUES[slot], slot
        every += values
    assert len(set(every)) == len(every) == 20, "values must be unique across slots"
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", v) for v in every), every
    assert vocab["exclusions"] == [] and isinstance(vocab["negative_prompt"], str)
    assert 2 <= len(vocab["templates"]) <= 3
    for template in vocab["templates"]:
        prompt = template.format(**SLOTS_0)
        assert all(v in prompt for v in SLOTS_0.values()), template
