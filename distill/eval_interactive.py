"""Interactive streaming graded by the toy world's oracle: prompt switches and continuation.

Enabled by `eval.interactive_prompts`.

Switches. Each of the first N eval prompts (A) streams 3k chunks (k = chunks of a teacher-length video) and
switches at chunk k to a prompt B, with the KV re-cache and with the old cache kept:
- one slot: B changes one slot of A (the slot cycles over the prompts; the value is the next one the vocabulary
  allows). `changed_within_2`: the share of streams whose changed slot reads B's value in chunk k + 1 (the second
  chunk after the switch); `changed_per_chunk`: that share in each chunk from k on; `unchanged_kept`: the share of
  (stream, chunk after the switch, unchanged slot) that still read A's value.
- all slots: B is another eval prompt that differs from A in every slot. `after_accuracy`: all-attribute accuracy
  (against B) of chunks k + 2 .. 3k - 1, beside `fresh_accuracy`, a stream of B from the start graded on the same
  chunks with the same noise.
Continuation. For the same prompts, a ground-truth clip of the teacher's length is rendered by the toy world (the
eval row's seed places it), its first `eval.continuation_chunks` chunks (None: all) are written into the student's
cache (`students.causal.CausalStream`'s prefix), and the student continues for `eval.long_rollout_factor` times the
teacher's length. `segment_accuracy`: all-attribute accuracy
(against the clip's slots, motion included) per equal segment of the continuation; `accuracy`: their mean.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from core.seeding import derive_seed, sample_noise
from core.vocabulary import Vocabulary
from distill.config import Recipe
from students.causal import CausalStream
from students.sampling import student_sigmas
from teachers.toyworld.oracle import read_video
from teachers.toyworld.render import SLOTS, render_batch

logger = logging.getLogger(__name__)


def _prompt(vocab: Vocabulary, slots: dict[str, str]) -> str:
    text = vocab.templates[0].format(**slots)
    return text[:1].upper() + text[1:]


def _allowed(vocab: Vocabulary, slots: dict[str, str]) -> bool:
    return not any(all(slots.get(k) == v for k, v in excl.items()) for excl in vocab.exclusions)


def one_slot_switch(vocab: Vocabulary, slots: dict[str, str], i: int) -> tuple[str, dict[str, str]]:
    """(changed slot, new assignment): slot SLOTS[i % 5] moved to the next value the exclusions allow."""
    slot = SLOTS[i % len(SLOTS)]
    values = vocab.slots[slot]
    start = values.index(slots[slot])
    for step in range(1, len(values)):
        new = {**slots, slot: values[(start + step + i) % len(values)]}
        if new[slot] != slots[slot] and _allowed(vocab, new):
            return slot, new
    raise ValueError(f"eval: no other value of slot {slot} fits {slots} under the vocabulary's exclusions")


def all_slot_partner(rows: list[dict], i: int) -> dict | None:
    """The first other row (in order after i) whose slots all differ from row i's; None if there is none."""
    for j in list(range(i + 1, len(rows))) + list(range(i)):
        if all(rows[j]["slots"][s] != rows[i]["slots"][s] for s in SLOTS):
            return rows[j]
    return None


def _reads(videos: np.ndarray, chunks: int) -> list[list[dict[str, str]]]:
    """Oracle reads per chunk (equal segments) of each video."""
    return [read_video(v, chunks) for v in videos]


def _all_right(reads: list[list[dict[str, str]]], rows: list[dict], chunks: range) -> int:
    """(video, chunk) pairs over `chunks` whose every slot reads its row's value."""
    return sum(all(rd[c][x] == r["slots"][x] for x in SLOTS) for rd, r in zip(reads, rows) for c in chunks)


class InteractiveEval:
    """Runs the switch and continuation grading of one causal student (see the module docstring)."""

    def __init__(self, student, teacher, recipe: Recipe, vocab: Vocabulary, rows: list[dict]):
        self.student, self.teacher, self.recipe, self.vocab = student, teacher, recipe, vocab
        self.rows = rows[: recipe.eval.interactive_prompts]
        tcfg, cfg = teacher.cfg, student.cfg
        self.c, self.f, self.h, self.w = teacher.latent_shape(tcfg.num_frames, tcfg.height, tcfg.width)
        self.fpb = cfg.frames_per_block
        self.k = -(-self.f // self.fpb)  # chunks of a teacher-length video
        self.sigmas = student_sigmas(cfg, tcfg.shift, tcfg.num_inference_steps)

    def _embeds(self, prompts: list[str]) -> torch.Tensor:
        return self.teacher.encode(prompts, None).prompt_embeds

    @torch.no_grad()
    def _stream(
        self, rows, prompts_a, prompts_b, chunks, switch_at, recache, prefix=None, keep=None, noise_t=None
    ) -> np.ndarray:
        """Decoded uint8 videos [B, F, H, W, 3] of `chunks` generated chunks; `prefix`: the latents of the clips the
        stream continues (decoded with it for the VAE's context, then dropped)."""
        noise = torch.stack([sample_noise(r["seed"], (self.c, chunks * self.fpb, self.h, self.w)) for r in rows])
        gens = [torch.Generator("cpu").manual_seed(derive_seed(r["seed"], 1)) for r in rows]
        dev = self.teacher.device
        stream = CausalStream(
            self.student.causal, self._embeds(prompts_a), noise.to(dev), self.sigmas, gens, prefix=prefix
        )
        out = []
        for chunk in range(chunks):
            if switch_at is not None and chunk == switch_at:
                stream.switch(self._embeds(prompts_b), recache=recache, keep_chunks=keep, context_noise=noise_t)
            out.append(stream.next_chunk())
        if prefix is None:
            return self.teacher.to_uint8(self.teacher.decode(torch.cat(out, dim=2)))
        # decoded after the prefix (the VAE's causal context); its pixel frames (1 + t·(P - 1)) are dropped
        videos = self.teacher.to_uint8(self.teacher.decode(torch.cat([prefix, *out], dim=2)))
        return videos[:, 1 + self.teacher.pipe.vae_scale_factor_temporal * (prefix.shape[2] - 1) :]

    def switches(self) -> dict:
        size, k = self.recipe.eval.batch_size, self.k
        one = [one_slot_switch(self.vocab, r["slots"], i) for i, r in enumerate(self.rows)]
        partners = [all_slot_partner(self.rows, i) for i in range(len(self.rows))]
        result: dict = {"chunks": 3 * k, "switch_chunk": k, "num_prompts": len(self.rows)}
        modes = [("recache", True, None, None), ("keep_cache", False, None, None)]
        n, noise_t = self.recipe.eval.switch_keep_chunks, self.recipe.eval.switch_context_noise
        if n is not None or noise_t is not None:
            name = "recache" + (f"_last{n}" if n is not None else "") + (f"_t{noise_t}" if noise_t is not None else "")
            modes.append((name, True, n, noise_t))
        for name, recache, keep, noise_t in modes:
            changed = np.zeros((len(self.rows), 2 * k))
            kept, kept_n = 0, 0
            after, fresh, n_all = 0.0, 0.0, 0
            for s in tqdm(range(0, len(self.rows), size), desc=f"eval switches ({name})", leave=False):
                rows = self.rows[s : s + size]
                a = [r["prompt"] for r in rows]
                b = [_prompt(self.vocab, one[s + i][1]) for i in range(len(rows))]
                reads = _reads(self._stream(rows, a, b, 3 * k, k, recache, keep=keep, noise_t=noise_t), 3 * k)
                for i, rd in enumerate(reads):
                    slot, new = one[s + i]
                    changed[s + i] = [rd[c][slot] == new[slot] for c in range(k, 3 * k)]
                    for c in range(k, 3 * k):
                        for other in SLOTS:
                            if other != slot:
                                kept += rd[c][other] == rows[i]["slots"][other]
                                kept_n += 1
                pairs = [(i, partners[s + i]) for i in range(len(rows)) if partners[s + i] is not None]
                if pairs:
                    sub = [rows[i] for i, _ in pairs]
                    b_rows = [p for _, p in pairs]
                    switched = _reads(
                        self._stream(
                            sub,
                            [r["prompt"] for r in sub],
                            [p["prompt"] for p in b_rows],
                            3 * k,
                            k,
                            recache,
                            keep=keep,
                            noise_t=noise_t,
                        ),
                        3 * k,
                    )
                    after += _all_right(switched, b_rows, range(k + 2, 3 * k))
                    if name == "recache":  # the fresh stream of B does not depend on the cache mode: run it once
                        own = _reads(self._stream(sub, [p["prompt"] for p in b_rows], None, 3 * k, None, True), 3 * k)
                        fresh += _all_right(own, b_rows, range(k + 2, 3 * k))
                    n_all += len(pairs) * (2 * k - 2)  # chunks k + 2 .. 3k - 1 of each pair
            result[name] = {
                "one_slot": {
                    "changed_within_2": float(changed[:, 1].mean()),
                    "changed_per_chunk": [float(x) for x in changed.mean(axis=0)],
                    "unchanged_kept": float(kept / max(kept_n, 1)),
                },
                "all_slots": {"num_pairs": n_all // max(2 * k - 2, 1), "after_accuracy": after / max(n_all, 1)},
            }
            if name == "recache":
                result["fresh_accuracy"] = fresh / max(n_all, 1)
        return result

    def continuation(self) -> dict:
        tcfg, factor, size = self.teacher.cfg, self.recipe.eval.long_rollout_factor, self.recipe.eval.batch_size
        if self.f % self.fpb:
            return {"skipped": f"a teacher-length clip ({self.f} latent frames) is not whole chunks of {self.fpb}"}
        chunks = factor * self.k
        given = (
            self.k
            if self.recipe.eval.continuation_chunks is None
            else min(self.recipe.eval.continuation_chunks, self.k)
        )
        sums, count = np.zeros(factor), 0
        for s in tqdm(range(0, len(self.rows), size), desc="eval continuation", leave=False):
            rows = self.rows[s : s + size]
            clips = render_batch(
                [r["slots"] for r in rows],
                tcfg.num_frames,
                tcfg.height,
                tcfg.width,
                seeds=[r["seed"] % 2**31 for r in rows],
            )
            pixels = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
            prefix = self.teacher.encode_video(pixels)[:, :, : given * self.fpb]
            videos = self._stream(rows, [r["prompt"] for r in rows], None, chunks, None, True, prefix=prefix)
            reads = _reads(videos, factor)
            sums += [_all_right(reads, rows, range(seg, seg + 1)) for seg in range(factor)]
            count += len(rows)
        seg = [float(x) for x in sums / count]
        return {
            "length_factor": factor,
            "given_chunks": given,
            "num_prompts": count,
            "segment_accuracy": seg,
            "accuracy": float(np.mean(seg)),
        }
