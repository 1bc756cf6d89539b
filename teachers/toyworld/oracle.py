"""Oracle of the toy world: reads the five slot values back from a (generated) video.

Per frame:
1. background colour = the frame's per-channel median (the object covers < 20% of the frame);
2. prop mask = pixels whose weakest channel is over halfway from the background to white;
   every other pixel gets the nearest of [that background, the 4 clothing colours];
3. the subject mask (pixels labelled with any clothing colour) and the prop mask are matched
   against the renderer's own shape templates at every position of the torus:
   IoU(shift) = I / (|mask| + |template| - I), with the overlap I from one circular
   cross-correlation by FFT, so shapes split across an edge match like any other.

Per time segment: background = nearest prototype to the median frame colour; subject / prop =
the template with the highest summed best-IoU; clothing = most frequent clothing label inside
the best subject template at its best position; action = the direction closest to the median
wrapped frame-to-frame displacement of that template's position.

Accuracy is ~100% on rendered clips and chance (25%) on noise, when labels are balanced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from teachers.toyworld.render import (
    ACTION_DIRECTION,
    ACTIONS,
    BACKGROUND_RGB,
    BACKGROUNDS,
    CLOTHING,
    CLOTHING_RGB,
    PROP_RGB,
    PROPS,
    SLOTS,
    SUBJECTS,
    Geometry,
    check_size,
    prop_mask,
    subject_mask,
    wrapped_offsets,
)

_CLOTHING_RGB = np.array([CLOTHING_RGB[c] for c in CLOTHING], dtype=np.float32)  # [4, 3]
_BACKGROUND_RGB = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=np.float32)  # [4, 3]
_DIRECTIONS = np.array([ACTION_DIRECTION[a] for a in ACTIONS], dtype=np.float32)  # [4, 2] (dy, dx)


def _templates(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered subject and prop masks centred at pixel (0, 0) of the torus: two float [4, H, W]."""
    geo = Geometry(height, width)
    dy = wrapped_offsets(np.zeros(1, dtype=int), height)[0][:, None]
    dx = wrapped_offsets(np.zeros(1, dtype=int), width)[0][None, :]
    subjects = np.stack([subject_mask(s, dy, dx, geo.radius) for s in SUBJECTS]).astype(np.float32)
    props = np.stack([prop_mask(p, dy, dx, geo.prop_size) for p in PROPS]).astype(np.float32)
    return subjects, props


def _best_iou(masks: np.ndarray, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Circular template matching of masks [F, H, W] with templates [K, H, W].

    Returns the best IoU over all shifts [F, K] and the (y, x) shift that reaches it [F, K, 2].
    """
    f, h, w = masks.shape
    overlap = np.fft.irfft2(
        np.fft.rfft2(masks)[:, None] * np.conj(np.fft.rfft2(templates))[None], s=(h, w)
    )  # [F, K, H, W]: overlap[f, k, y, x] = sum_p mask[f, p] * template[k, p - (y, x)]
    overlap = np.round(overlap)
    union = masks.sum(axis=(1, 2))[:, None, None, None] + templates.sum(axis=(1, 2))[None, :, None, None] - overlap
    iou = overlap / np.maximum(union, 1.0)
    flat = iou.reshape(f, templates.shape[0], h * w)
    best = flat.argmax(axis=2)
    positions = np.stack(np.unravel_index(best, (h, w)), axis=-1)
    return np.take_along_axis(flat, best[..., None], axis=2)[..., 0], positions


def _frame_features(video: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame statistics of a uint8 [F, H, W, 3] video (see the module docstring)."""
    f, h, w, _ = video.shape
    pixels = video.astype(np.float32)
    background = np.median(pixels.reshape(f, h * w, 3), axis=1)  # [F, 3]
    # Prop: whiter than halfway from the background to white in its weakest channel (every
    # clothing colour and background has a channel <= 50; blur keeps the 50% contour in place).
    whiteness = pixels.min(-1)
    prop = whiteness > (background.min(-1)[:, None, None] + min(PROP_RGB)) / 2  # [F, H, W]
    palette = np.concatenate([background[:, None], np.broadcast_to(_CLOTHING_RGB, (f, len(CLOTHING), 3))], axis=1)
    # Nearest palette colour; |pixel|^2 is the same for every candidate, so it is left out.
    score = (palette**2).sum(-1)[:, None, :] - 2 * pixels.reshape(f, h * w, 3) @ palette.transpose(0, 2, 1)
    labels = score.argmin(-1).reshape(f, h, w)  # 0 = background, 1.. = CLOTHING
    labels[prop] = 0
    subject_templates, prop_templates = _templates(h, w)
    subject_iou, subject_pos = _best_iou((labels > 0).astype(np.float32), subject_templates)
    prop_iou, _ = _best_iou(prop.astype(np.float32), prop_templates)
    # Clothing votes inside each subject template placed at its best position: [F, K, 4].
    rows = (np.arange(h)[None, None, :] - subject_pos[..., 0:1]) % h  # [F, K, H]
    cols = (np.arange(w)[None, None, :] - subject_pos[..., 1:2]) % w  # [F, K, W]
    placed = subject_templates[np.arange(len(SUBJECTS))[None, :, None, None], rows[..., None], cols[:, :, None, :]]
    onehot = (labels[..., None] == np.arange(1, len(CLOTHING) + 1)).astype(np.float32)  # [F, H, W, 4]
    return {
        "background": background,
        "clothing_votes": np.einsum("fkhw,fhwc->fkc", placed, onehot),
        "subject_iou": subject_iou,
        "subject_pos": subject_pos,
        "prop_iou": prop_iou,
    }


def _segment_motion(positions: np.ndarray, height: int, width: int) -> int:
    """[F, 2] subject centres of one segment -> index into ACTIONS of the median wrapped motion."""
    step = np.diff(positions.astype(np.float32), axis=0)
    size = np.array([height, width], dtype=np.float32)
    step = (step + size / 2) % size - size / 2
    return int((_DIRECTIONS @ np.median(step, axis=0)).argmax())


def read_video(video: np.ndarray, num_segments: int = 1) -> list[dict[str, str]]:
    """The slot values read back from uint8 [F, H, W, 3] `video`, one dict per equal time segment."""
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        got = f"{type(video).__name__} {getattr(video, 'dtype', '')} {getattr(video, 'shape', '')}"
        raise ValueError(f"read_video: expected a uint8 numpy array [F, H, W, 3], got {got}")
    f, h, w, _ = video.shape
    check_size(h, w)
    if num_segments < 1 or f // num_segments < 2:
        raise ValueError(
            f"read_video: num_segments={num_segments} over {f} frames gives segments shorter than the "
            f"2 frames needed to read motion; use num_segments <= {f // 2}"
        )
    feats = _frame_features(video)
    results = []
    for idx in np.array_split(np.arange(f), num_segments):
        background = np.median(feats["background"][idx], axis=0)
        subject = int(feats["subject_iou"][idx].sum(axis=0).argmax())
        results.append(
            {
                "subject": SUBJECTS[subject],
                "clothing": CLOTHING[int(feats["clothing_votes"][idx, subject].sum(axis=0).argmax())],
                "props": PROPS[int(feats["prop_iou"][idx].sum(axis=0).argmax())],
                "action": ACTIONS[_segment_motion(feats["subject_pos"][idx, subject], h, w)],
                "background": BACKGROUNDS[int(((_BACKGROUND_RGB - background) ** 2).sum(-1).argmin())],
            }
        )
    return results


def shape_scores(video: np.ndarray) -> dict[str, np.ndarray]:
    """How well each subject and prop template fits uint8 [F, H, W, 3] `video`: the best IoU over positions, averaged
    over frames, float [4] per slot in SUBJECTS / PROPS order. `read_video` (one segment) reads the argmax; the gap
    between the best and the second best says whether a shape was drawn clearly or ambiguously."""
    feats = _frame_features(video)
    return {"subject": feats["subject_iou"].mean(axis=0), "props": feats["prop_iou"].mean(axis=0)}


def grade(videos: np.ndarray, slots: Sequence[dict[str, str]], num_segments: int = 1) -> dict:
    """Oracle accuracy of uint8 [B, F, H, W, 3] `videos` against their prompts' `slots`.

    Returns {"accuracy": {"all": ..., <slot>: ...}, "segment_accuracy": [all-slot accuracy per
    segment], "segment_slot_accuracy": {<slot>: [accuracy per segment]}}; "all" is the fraction of
    (video, segment) pairs with every slot right.
    """
    if len(videos) != len(slots):
        raise ValueError(f"grade: got {len(videos)} videos but {len(slots)} slot assignments")
    if len(videos) == 0:
        raise ValueError("grade: no videos to grade")
    correct = np.zeros((len(videos), num_segments, len(SLOTS)), dtype=bool)
    for i, (video, truth) in enumerate(zip(videos, slots)):
        for j, read in enumerate(read_video(video, num_segments)):
            correct[i, j] = [read[s] == truth[s] for s in SLOTS]
    every = correct.all(axis=2)
    accuracy = {"all": float(every.mean())}
    accuracy.update({s: float(correct[:, :, k].mean()) for k, s in enumerate(SLOTS)})
    per_slot = {s: [float(a) for a in correct[:, :, k].mean(axis=0)] for k, s in enumerate(SLOTS)}
    return {
        "accuracy": accuracy,
        "segment_accuracy": [float(a) for a in every.mean(axis=0)],
        "segment_slot_accuracy": per_slot,
    }
