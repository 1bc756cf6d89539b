"""Training batches for every method: stored teacher samples (`dataset`), freshly rendered toy-world clips
(`toyworld`) or captions only (`prompts`, for the data-free methods), with one random stream per sample so a run
does not depend on the process count.

Determinism (the contract the trainer tests):
    G = train.batch_size · num_processes · train.gradient_accumulation_steps samples per optimizer step;
    step s uses the global sample indices [s·G, (s+1)·G); rank r takes the contiguous slice
    [s·G + r·b·A, s·G + (r+1)·b·A) and micro-batch a of it [.. + a·b, .. + (a+1)·b).
    Every random draw of sample g (which dataset row, then the algorithm's σ, noise, CFG dropout, ...)
    comes from ONE `torch.Generator` seeded with `derive_seed(train.seed, g)`, in a fixed order.
Hence 2 processes × batch b see exactly the samples and draws of 1 process × batch 2b.

Tensors: latents x0 [B, C, F, H, W] float32; trajectory [B, S, C, F, H, W] float32 (the teacher's states at
`data.trajectory_steps`, then its clean endpoint last); text embeddings [B, L, D].
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

from core.recipe_loader import resolve_path
from core.seeding import derive_seed, sample_generator
from core.vocabulary import load_vocabulary
from distill.batch import Batch
from synth_data.composer import compose
from synth_data.layout import is_complete
from teachers.toyworld.render import render_batch

logger = logging.getLogger(__name__)


def sample_indices(
    step: int, micro: int, *, batch_size: int, grad_accum: int, num_processes: int, rank: int
) -> list[int]:
    """Global sample indices of micro-batch `micro` of optimizer step `step` on `rank` (module docstring)."""
    per_step = batch_size * grad_accum * num_processes
    start = step * per_step + rank * batch_size * grad_accum + micro * batch_size
    return list(range(start, start + batch_size))


class StoredSamples(torch.utils.data.Dataset):
    """Sample g -> a row of the generated dataset, chosen with replacement by sample g's generator.

    Rows come from `synth_data.dataset.load_local(<output_dir>/dataset)`; the `video` column is never decoded.
    """

    def __init__(self, folder: Path, seed: int, need_trajectory: bool):
        if not folder.is_dir() or not any(folder.iterdir()):
            raise FileNotFoundError(
                f"{folder}: no generated dataset here; run `python -m distill generate RECIPE` first "
                "(or set train.data_source: toyworld to train on freshly rendered clips)"
            )
        if not is_complete(folder):
            raise FileNotFoundError(
                f"{folder}: the dataset is incomplete (no COMPLETE marker); finish it with "
                "`python -m distill generate RECIPE`"
            )
        from synth_data.dataset import load_local  # datasets: absent on GPU-only images that train on rendered clips

        ds = load_local(folder)
        if len(ds) == 0:
            raise FileNotFoundError(f"{folder}: the dataset has no rows; run `python -m distill generate RECIPE`")
        has = set(ds.column_names)
        if need_trajectory and "trajectory" not in has:
            raise ValueError(
                f"{folder}: the dataset has no `trajectory` column; set data.trajectory_steps "
                "(e.g. to the student's denoising steps) and regenerate it"
            )
        if "latents" not in has and "trajectory" not in has:
            raise ValueError(
                f"{folder}: the dataset has no `latents` column; set data.save_latents: true and regenerate it"
            )
        self.x0_column = "latents" if "latents" in has else "trajectory"
        tensors = [self.x0_column] + (["trajectory", "trajectory_sigmas"] if need_trajectory else [])
        tensors = list(dict.fromkeys(tensors))
        self.rows = ds.select_columns(["caption", *tensors]).with_format(
            "torch", columns=tensors, output_all_columns=True
        )
        self.seed = seed
        self.need_trajectory = need_trajectory
        self.given_frames = 1 if "image" in has else 0  # an image-to-video dataset: frame 0 is the given image

    def __len__(self) -> int:  # only used by DataLoader bookkeeping; indices are unbounded global sample ids
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        g = sample_generator(self.seed, index)
        row = self.rows[int(torch.randint(len(self.rows), (1,), generator=g))]
        x0 = row["latents"] if self.x0_column == "latents" else row["trajectory"][-1]
        item = {"index": index, "rng_state": g.get_state(), "caption": row["caption"], "x0": x0.float()}
        if self.given_frames:
            item["given_frames"] = self.given_frames
        if self.need_trajectory:
            item["trajectory"] = row["trajectory"].float()
            item["trajectory_sigmas"] = row["trajectory_sigmas"].float()
        return item


class ComposedPrompts:
    """Prompt rows composed afresh for every optimizer step: sample g of step s = g // G is row g mod G of
    compose(vocabulary, G, derive_seed(seed, -(s+1))), G samples per step.

    The compose seed uses negative indices so it never coincides with a sample's own seed derive_seed(seed, g≥0).
    """

    def __init__(self, vocabulary, per_step: int, seed: int, mode: str):
        self.vocabulary, self.per_step, self.seed, self.mode = vocabulary, per_step, seed, mode

    @lru_cache(maxsize=2)  # noqa: B019 (one object per training run: the cache lives as long as the run)
    def _rows(self, step: int) -> list[dict]:
        return compose(self.vocabulary, self.per_step, derive_seed(self.seed, -(step + 1)), self.mode)

    def row(self, index: int) -> dict:
        """The prompt row `{index, prompt, slots, seed}` of global sample `index`."""
        return self._rows(index // self.per_step)[index % self.per_step]


class RenderedSamples(ComposedPrompts, torch.utils.data.Dataset):
    """Sample g -> its `ComposedPrompts` row rendered by the toy-world renderer with the row's seed. Pixels
    [3, F, H, W] in [-1, 1]."""

    def __init__(self, vocabulary, per_step: int, seed: int, mode: str, num_frames: int, height: int, width: int):
        super().__init__(vocabulary, per_step, seed, mode)
        self.shape = (num_frames, height, width)

    def __len__(self) -> int:
        return self.per_step

    def __getitem__(self, index: int) -> dict:
        row = self.row(index)
        frames = render_batch([row["slots"]], *self.shape, seeds=[row["seed"]])[0]  # uint8 [F, H, W, 3]
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        return {
            "index": index,
            "rng_state": sample_generator(self.seed, index).get_state(),
            "caption": row["prompt"],
            "video": video,
        }


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of `train.prompts_file`: a `.jsonl` with a string `prompt` per row, or text with one prompt per
    line (blank lines and lines starting with `#` skipped)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"train.prompts_file: {path} does not exist; give a text file with one prompt per "
            "line, or a .jsonl with a `prompt` field per row (e.g. <output_dir>/prompts.jsonl)"
        )
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"train.prompts_file: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or (path.suffix != ".jsonl" and line.startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                prompt = json.loads(line).get("prompt")
            except (json.JSONDecodeError, AttributeError):
                prompt = None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(
                    f"{path}:{number}: expected a JSON object with a non-empty string `prompt`, got {line[:80]!r}"
                )
            line = prompt.strip()
        prompts.append(line)
    if not prompts:
        raise ValueError(f"train.prompts_file: {path} holds no prompts")
    return prompts


class PromptSamples(torch.utils.data.Dataset):
    """`train.data_source: prompts`: captions only, for the data-free methods (DMD2 and Self-Forcing roll the
    student out from noise; they need prompts, not videos). With `train.prompts_file` sample g takes a line drawn
    with replacement by its own generator (as `StoredSamples` draws rows); without one, its `ComposedPrompts` row."""

    def __init__(self, seed: int, prompts: list[str] | None = None, composed: ComposedPrompts | None = None):
        if (prompts is None) == (composed is None):
            raise ValueError("PromptSamples: give exactly one of prompts and composed")
        self.seed, self.prompts, self.composed = seed, prompts, composed

    def __len__(self) -> int:  # DataLoader bookkeeping only
        return len(self.prompts) if self.prompts is not None else self.composed.per_step

    def __getitem__(self, index: int) -> dict:
        g = sample_generator(self.seed, index)
        if self.prompts is not None:
            caption = self.prompts[int(torch.randint(len(self.prompts), (1,), generator=g))]
        else:
            caption = self.composed.row(index)["prompt"]
        return {"index": index, "rng_state": g.get_state(), "caption": caption}


class RenderedPool:
    """`train.toyworld_pool` = P > 0: P encoded toy-world clips kept in memory, R = `toyworld_pool_refresh` of them
    re-rendered at the start of every optimizer step; sample g draws a pool slot with its own generator.

    Why: encoding through the Wan VAE costs as much as the teacher's training step on a CPU, so encoding every
    sample afresh halves the throughput; a rolling pool encodes R clips per step instead of a whole batch.

    Clip c is row c mod 64 of compose(vocabulary, 64, derive_seed(seed, -(c // 64 + 1))), rendered with that row's
    seed. Clips 0..P-1 fill slots 0..P-1; the refresh of step s writes clips P + sR + i into slots (sR + i) mod P.
    Clips are encoded in aligned groups of R (P is a multiple of R), so a pool rebuilt on resume holds the same
    bits as one that ran through; every rank keeps the full pool.
    """

    GROUP = 64

    def __init__(
        self,
        vocabulary,
        size: int,
        refresh: int,
        seed: int,
        mode: str,
        num_frames: int,
        height: int,
        width: int,
        encode,
    ):
        if size % refresh:
            raise ValueError(
                f"train.toyworld_pool: must be a multiple of train.toyworld_pool_refresh ({refresh}), got {size}"
            )
        self.vocabulary, self.size, self.refresh, self.seed, self.mode = vocabulary, size, refresh, seed, mode
        self.shape, self.encode = (num_frames, height, width), encode
        self.x0: torch.Tensor | None = None
        self.captions: list[str] = [""] * size

    @lru_cache(maxsize=4)  # noqa: B019 (one pool per training run)
    def _rows(self, group: int) -> list[dict]:
        return compose(self.vocabulary, self.GROUP, derive_seed(self.seed, -(group + 1)), self.mode)

    def _write(self, first_clip: int) -> None:
        """Render + encode clips first_clip .. first_clip + R - 1 into their slots."""
        clips = range(first_clip, first_clip + self.refresh)
        rows = [self._rows(c // self.GROUP)[c % self.GROUP] for c in clips]
        frames = render_batch([r["slots"] for r in rows], *self.shape, seeds=[r["seed"] for r in rows])
        video = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        latents = self.encode(video).cpu()
        if self.x0 is None:
            self.x0 = torch.empty(self.size, *latents.shape[1:])
        slot = first_clip % self.size
        self.x0[slot : slot + self.refresh] = latents
        self.captions[slot : slot + self.refresh] = [r["prompt"] for r in rows]

    def build(self, step: int) -> None:
        """The pool as it is before the refresh of `step`: slot j holds the newest clip c ≡ j (mod P) written."""
        written = self.size + step * self.refresh  # clips 0 .. written-1 exist
        # slots j = 0, R, 2R, ... start the aligned groups; written is a multiple of R, so each newest clip starts one
        firsts = sorted(j + self.size * ((written - 1 - j) // self.size) for j in range(0, self.size, self.refresh))
        from tqdm.auto import tqdm

        for first in tqdm(firsts, desc="toyworld pool", unit="group", leave=False):
            self._write(first)

    def step(self, step: int) -> None:
        self._write(self.size + step * self.refresh)

    def take(self, indices: list[int]) -> dict:
        generators = [sample_generator(self.seed, g) for g in indices]
        slots = [int(torch.randint(self.size, (1,), generator=g)) for g in generators]
        return {
            "index": indices,
            "rng_state": [g.get_state() for g in generators],
            "caption": [self.captions[j] for j in slots],
            "x0": self.x0[slots],
        }


def _pool_batches(pool: RenderedPool, start_step: int, max_steps: int, **shape) -> Iterator[dict]:
    pool.build(start_step)
    for step in range(start_step, max_steps):
        pool.step(step)
        for micro in range(shape["grad_accum"]):
            yield pool.take(sample_indices(step, micro, **shape))


class _StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of global indices, from `start_step` to `max_steps`."""

    def __init__(self, start_step: int, max_steps: int, **shape):
        self.start_step, self.max_steps, self.shape = start_step, max_steps, shape

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.shape["grad_accum"]):
                yield sample_indices(step, micro, **self.shape)

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.shape["grad_accum"]


def _collate(items: list[dict]) -> dict:
    out = {
        "index": [it["index"] for it in items],
        "rng_state": [it["rng_state"] for it in items],
        "caption": [it["caption"] for it in items],
    }
    for key in ("x0", "trajectory", "trajectory_sigmas", "video"):
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    if "given_frames" in items[0]:
        out["given_frames"] = items[0]["given_frames"]
    return out


def negative_prompt(recipe) -> str:
    """The teacher's negative prompt: `teacher.negative_prompt`, else the vocabulary's."""
    if recipe.teacher.negative_prompt is not None:
        return recipe.teacher.negative_prompt
    return _vocabulary(recipe).negative_prompt


def training_batches(
    recipe, teacher, *, start_step: int, num_processes: int, rank: int, need_trajectory: bool = False
) -> Iterator[Batch]:
    """This rank's micro-batches from optimizer step `start_step` on, as `Batch`es on the teacher's device.

    `train.data_source: dataset` reads `<output_dir>/dataset/`; `toyworld` renders clips on the fly at the
    teacher's num_frames/height/width and encodes them with the teacher's VAE; `prompts` gives captions only
    (`train.prompts_file`, else composed from `data.vocabulary`), with x0 None.
    """
    tc = recipe.train
    shape = dict(
        batch_size=tc.batch_size, grad_accum=tc.gradient_accumulation_steps, num_processes=num_processes, rank=rank
    )
    per_step = tc.batch_size * tc.gradient_accumulation_steps * num_processes
    if tc.data_source != "dataset" and need_trajectory:
        raise ValueError(
            f"train.data_source: {tc.data_source} has no teacher trajectories; method "
            f"{recipe.method.name!r} needs train.data_source: dataset"
        )
    if tc.data_source == "dataset":
        source = StoredSamples(recipe.out / "dataset", tc.seed, need_trajectory)
    elif tc.data_source == "prompts":
        if tc.prompts_file is not None:
            source = PromptSamples(tc.seed, prompts=read_prompts_file(resolve_path(tc.prompts_file)))
        else:
            source = PromptSamples(
                tc.seed, composed=ComposedPrompts(_vocabulary(recipe), per_step, tc.seed, recipe.data.mode)
            )
    else:
        t = teacher.cfg
        vocabulary = _vocabulary(recipe)
        if tc.toyworld_pool:
            pool = RenderedPool(
                vocabulary,
                tc.toyworld_pool,
                tc.toyworld_pool_refresh,
                tc.seed,
                recipe.data.mode,
                t.num_frames,
                t.height,
                t.width,
                encode=teacher.encode_video,
            )
            negative = negative_prompt(recipe)
            for raw in _pool_batches(pool, start_step, tc.max_steps, **shape):
                yield _to_batch(raw, teacher, negative)
            return
        source = RenderedSamples(vocabulary, per_step, tc.seed, recipe.data.mode, t.num_frames, t.height, t.width)
    loader = torch.utils.data.DataLoader(
        source,
        batch_sampler=_StepSampler(start_step, tc.max_steps, **shape),
        collate_fn=_collate,
        num_workers=tc.dataloader_num_workers,
    )
    negative = negative_prompt(recipe)
    for raw in loader:
        yield _to_batch(raw, teacher, negative)


def _vocabulary(recipe):
    return load_vocabulary(resolve_path(recipe.data.vocabulary))


def _to_batch(raw: dict, teacher, negative: str) -> Batch:
    # Rendered clips are encoded as one batch (10x faster than clip by clip on CPU); batched convolutions may round
    # differently from per-clip ones, so across process counts these latents agree to float precision, not bits.
    if "x0" in raw:
        x0 = raw["x0"]
    elif "video" in raw:
        x0 = teacher.encode_video(raw["video"])
    else:  # captions only (data_source: prompts)
        x0 = None
    t = teacher.cfg
    generators = [torch.Generator().set_state(s) for s in raw["rng_state"]]
    trajectory, sigmas = raw.get("trajectory"), raw.get("trajectory_sigmas")
    return Batch(
        x0=None if x0 is None else x0.to(teacher.device, torch.float32),
        latent_shape=tuple(teacher.latent_shape(t.num_frames, t.height, t.width)) if x0 is None else None,
        cond=teacher.encode(raw["caption"], negative),
        generators=generators,
        indices=raw["index"],
        captions=raw["caption"],
        trajectory=None if trajectory is None else trajectory.to(teacher.device, torch.float32),
        trajectory_sigmas=None if sigmas is None else sigmas.to(teacher.device, torch.float32),
        given_frames=int(raw.get("given_frames", 0)),
    )
