"""The frozen Wan teacher: diffusers' `WanPipeline` (Wan2.1, Wan2.2 two-expert, Wan2.2 TI2V) behind a small query API.

Conventions (DESIGN.md §3):
    latents x [B, C, F, H, W] (normalised, as the transformer sees them); videos [B, 3, F, H, W] in [-1, 1]
    x_σ = (1-σ)·x0 + σ·ε; the model predicts v = ε - x0 at timestep t = 1000·σ
    CFG: v = v_uncond + w·(v_cond - v_uncond); w = 1 means no guidance
    image-to-video (Wan2.2 TI2V, `expand_timesteps`): the clean first latent frame is part of the input at timestep 0
    (per-token timesteps), as diffusers' `WanImageToVideoPipeline` does for that model

Freezing lives here and only here: `from_config` calls `requires_grad_(False)` and `eval()` on every
component, and every public query runs under `torch.no_grad`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from tqdm.auto import tqdm

from core.flow import cfg as apply_cfg
from core.lora import adapters_disabled
from core.wan_lora import fuse_loras
from teachers.config import TeacherConfig

logger = logging.getLogger(__name__)

try:  # diffusers renamed `torch_dtype` to `dtype` (huggingface/diffusers#14205); older releases only know `torch_dtype`
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    DTYPE_KW = "dtype"
except ImportError:
    DTYPE_KW = "torch_dtype"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""Image files taken where a first frame is given (`data.images`, `stream.continue_from`)."""
VAE_TEMPORAL_CHUNK = 4
"""`AutoencoderKLWan.encode` reads the first frame, then chunks of 4: it encodes 1 + 4k frames only."""


@dataclass
class Cond:
    """Text conditioning for a batch: `prompt_embeds` [B, L, D]; `negative_embeds` [B, L, D] or None."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device=None, dtype=None) -> Cond:
        neg = None if self.negative_embeds is None else self.negative_embeds.to(device=device, dtype=dtype)
        return Cond(prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype), negative_embeds=neg)

    def index(self, idx) -> Cond:
        """Select rows (an int keeps the batch dimension); also available as `cond[idx]`."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        neg = None if self.negative_embeds is None else self.negative_embeds[idx]
        return Cond(prompt_embeds=self.prompt_embeds[idx], negative_embeds=neg)

    __getitem__ = index

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Concatenate on the batch dimension; all must have negatives or none."""
        has_neg = {c.negative_embeds is not None for c in conds}
        if len(has_neg) != 1:
            raise ValueError("Cond.cat: some conds have negative_embeds and some don't; encode them alike")
        neg = torch.cat([c.negative_embeds for c in conds]) if has_neg.pop() else None
        return Cond(prompt_embeds=torch.cat([c.prompt_embeds for c in conds]), negative_embeds=neg)


@dataclass
class SampleOutput:
    latents: torch.Tensor
    """Final latents [B, C, F, H, W] (float32), exactly `WanPipeline.__call__(..., output_type="latent")`."""
    trajectory: torch.Tensor
    """[B, len(save_at), C, F, H, W] float32: the state *before* step i for each i in sorted(save_at)
    (i == steps is the final latents). [B, 0, ...] when save_at is empty."""
    timesteps: torch.Tensor
    """[steps] the scheduler's timesteps t = 1000·σ used for each step."""
    sigmas: torch.Tensor
    """[steps + 1] σ of the state before each step (the last is the final σ, 0 for flow-matching Euler)."""


def _is_local(pretrained: str) -> bool:
    p = Path(pretrained).expanduser()
    return p.exists() or pretrained.startswith(("/", ".", "~")) or pretrained.count("/") != 1


def check_video_shape(cfg: TeacherConfig, vae_config: dict, transformer_configs: list[dict]) -> None:
    """`teacher.num_frames/height/width` against the VAE's compression (frames 1 + t·k, sides multiples of s) and
    each transformer's patch (latent frames and sides multiples of it), from the models' config.json alone: a bad
    shape fails with the keys to change before any weights load."""
    tf, sf = vae_config.get("scale_factor_temporal", 4), vae_config.get("scale_factor_spatial", 8)
    f, h, w = cfg.num_frames, cfg.height, cfg.width
    if (f - 1) % tf or f < 1:
        fix = sorted({max(1, f - 1 - (f - 1) % tf + 1), f - 1 - (f - 1) % tf + tf + 1})
        raise ValueError(
            f"teacher.num_frames: {f} does not fit the VAE, which needs 1 + {tf}·k frames; "
            f"use {' or '.join(map(str, fix))}"
        )
    for key, side in (("height", h), ("width", w)):
        if side % sf or side < sf:
            raise ValueError(
                f"teacher.{key}: {side} px is not a multiple of the VAE's {sf}; use "
                f"{max(sf, side - side % sf)} or {side - side % sf + sf}"
            )
    latent = ((f - 1) // tf + 1, h // sf, w // sf)
    for config in transformer_configs:
        patch = tuple(config.get("patch_size", (1, 2, 2)))
        for key, n, p in zip(("num_frames", "height", "width"), latent, patch):
            if n % p:
                raise ValueError(
                    f"teacher.{key}: gives {n} latent {'frames' if key == 'num_frames' else 'px'}, "
                    f"not a multiple of the transformer's patch {p} (patch_size {list(patch)}); "
                    f"latent size = (frames - 1) / {tf} + 1 frames, side / {sf} px"
                )


def _check_folder(cfg: TeacherConfig, folder: Path) -> None:
    """A local pipeline folder before anything loads: every part its model_index.json lists is there, and the video
    shape fits its VAE and transformers (`check_video_shape`, from their config.json)."""
    index = json.loads((folder / "model_index.json").read_text())
    parts = [n for n, v in index.items() if isinstance(v, list) and v[0] is not None]
    absent = [n for n in parts if not (folder / n).is_dir()]
    if absent:
        raise ValueError(
            f"teacher.pretrained: {folder} has no {absent[0]}/ folder though its model_index.json "
            "lists it; copy the whole pipeline folder (save_pretrained writes every part)"
        )
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        names = [n for n in ("transformer", "transformer_2") if n in parts]
        transformers = [json.loads((folder / n / "config.json").read_text()) for n in names]
    except (OSError, ValueError):
        return  # loading then says what is missing, in diffusers' words
    check_video_shape(cfg, vae, transformers)


def _check_levers(cfg: TeacherConfig, device: torch.device) -> None:
    if cfg.offload != "none" and device.type == "cpu":
        raise ValueError(
            f"teacher.offload: {cfg.offload!r} offloads to CPU from an accelerator, but the device is {device}; "
            "set teacher.offload: none or run on a GPU"
        )
    if cfg.quantize != "none":
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise ValueError(
                f"teacher.quantize: {cfg.quantize!r} needs bitsandbytes and a CUDA GPU; install the `gpu` extra "
                "(pip install 'wan-distill[gpu]') and run on a GPU, or set teacher.quantize: none"
            )
        if device.type != "cuda":
            raise ValueError(f"teacher.quantize: {cfg.quantize!r} needs a CUDA device, got {device}")


def _quantization_config(quantize: str):
    from diffusers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _with_shift(scheduler, shift: float):
    """A fresh copy of the pipeline's scheduler class with the recipe's flow shift."""
    if "flow_shift" in scheduler.config:  # UniPCMultistepScheduler (Wan's default), DPM-Solver
        return scheduler.__class__.from_config(scheduler.config, flow_shift=shift)
    if "shift" in scheduler.config:  # FlowMatchEulerDiscreteScheduler
        return scheduler.__class__.from_config(scheduler.config, shift=shift)
    raise ValueError(
        f"teacher.shift: the pipeline's scheduler {scheduler.__class__.__name__} has no `shift`/`flow_shift`; "
        "use a flow-matching scheduler (FlowMatchEulerDiscreteScheduler or UniPCMultistepScheduler)"
    )


class WanTeacher:
    """A frozen `WanPipeline`. Build it with `WanTeacher.from_config(cfg, device)`."""

    def __init__(self, pipe: WanPipeline, cfg: TeacherConfig, device: torch.device | str = "cpu"):
        self.pipe = pipe
        self.cfg = cfg
        self.device = torch.device(device)
        self.scheduler = _with_shift(pipe.scheduler, cfg.shift)
        pipe.scheduler = self.scheduler
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.eval()
        if cfg.guidance_scale_2 is not None and self.boundary is None:
            raise ValueError(
                "teacher.guidance_scale_2: only two-expert teachers (boundary_ratio set, e.g. Wan2.2 A14B) use it; "
                "remove it or load a two-expert pipeline"
            )

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: TeacherConfig, device: torch.device | str = "cpu") -> WanTeacher:
        device = torch.device(device)
        _check_levers(cfg, device)
        if _is_local(cfg.pretrained):
            folder = Path(cfg.pretrained).expanduser()
            if not (folder / "model_index.json").is_file():
                raise ValueError(
                    f"teacher.pretrained: {folder} is not a diffusers WanPipeline folder (no model_index.json); "
                    "pass a Hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers or a folder saved with save_pretrained"
                )
            _check_folder(cfg, folder)
            pretrained = str(folder)
        else:
            pretrained = cfg.pretrained
        dtype = DTYPES[cfg.dtype]
        common = {"revision": cfg.revision, DTYPE_KW: dtype}
        # Wan recommends the VAE in float32: load it apart so it is never rounded through `dtype`.
        vae_kwargs = {**common, DTYPE_KW: torch.float32}
        parts = {"vae": AutoencoderKLWan.from_pretrained(pretrained, subfolder="vae", **vae_kwargs)}
        if cfg.quantize != "none":
            index = WanPipeline.load_config(pretrained, revision=cfg.revision)
            for name in ("transformer", "transformer_2"):
                if index.get(name, [None])[0] is not None:
                    parts[name] = WanTransformer3DModel.from_pretrained(
                        pretrained, subfolder=name, quantization_config=_quantization_config(cfg.quantize), **common
                    )
        pipe = WanPipeline.from_pretrained(pretrained, **parts, **common)
        pipe.set_progress_bar_config(disable=True)
        if cfg.lora:
            experts = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
            fuse_loras(experts, cfg.lora, "teacher.lora")
        if not _is_local(cfg.pretrained):  # a Hub id's configs are known once loaded
            models = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
            check_video_shape(cfg, dict(pipe.vae.config), [dict(m.config) for m in models])
        if cfg.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif cfg.offload == "group":
            for model in (pipe.transformer, pipe.transformer_2):
                if model is not None:
                    model.enable_group_offload(
                        onload_device=device,
                        offload_device=torch.device("cpu"),
                        offload_type="block_level",
                        num_blocks_per_group=1,
                    )
            pipe.text_encoder.to(device)
            pipe.vae.to(device)
        else:
            pipe.to(device)
        return cls(pipe, cfg, device)

    # ---- properties ----------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def boundary(self) -> float | None:
        """Expert switch timestep (`boundary_ratio · num_train_timesteps`), None for one expert."""
        ratio = self.pipe.config.boundary_ratio
        return None if ratio is None else ratio * self.num_train_timesteps

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F', H', W') of the latents for a pixel video of this size."""
        tf, sf = self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial
        if (num_frames - 1) % tf != 0 or height % sf or width % sf:
            raise ValueError(
                f"latent_shape: {num_frames} frames of {height}x{width} px don't fit the VAE; frames must be "
                f"1 + {tf}·k and height/width multiples of {sf}"
            )
        model = self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2
        return model.config.in_channels, (num_frames - 1) // tf + 1, height // sf, width // sf

    def transformer_for(self, t: float) -> torch.nn.Module:
        """The expert WanPipeline uses at timestep t: `transformer` if t >= boundary, else `transformer_2`."""
        if self.boundary is None or t >= self.boundary:
            return self.pipe.transformer
        return self.pipe.transformer_2

    @property
    def image_conditioned(self) -> bool:
        """True for teachers that also do image-to-video in the same weights (Wan2.2 TI2V: `expand_timesteps`)."""
        return bool(self.pipe.config.get("expand_timesteps", False))

    def _check_first_frame(self, first_frame: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.image_conditioned:
            raise ValueError(
                "first_frame: this teacher has no image conditioning (its model_index.json has no expand_timesteps: "
                "true); image-to-video needs a TI2V teacher such as Wan-AI/Wan2.2-TI2V-5B-Diffusers"
            )
        want = (x.shape[0], x.shape[1], 1, *x.shape[3:])
        if tuple(first_frame.shape) != want:
            raise ValueError(
                f"first_frame: expected latents {want} (one latent frame, from encode_image), "
                f"got {tuple(first_frame.shape)}"
            )
        return first_frame.to(x.device, x.dtype)

    # ---- text ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], negative: str | list[str] | None = None) -> Cond:
        """Text embeddings [B, L, D] (L = max_sequence_length, zero past each prompt's tokens, like WanPipeline).

        A str `negative` is shared by every prompt; None gives `negative_embeds=None` (no CFG). Each distinct
        string is encoded once and kept (on CPU) in an LRU cache of `teacher.encode_cache_size` entries.
        """
        if isinstance(prompts, str):
            raise TypeError("encode: prompts must be a list of strings, got a single str")
        if isinstance(negative, str):
            negative = [negative] * len(prompts)
        if negative is not None and len(negative) != len(prompts):
            raise ValueError(f"encode: {len(negative)} negative prompts for {len(prompts)} prompts")
        texts = list(prompts) + (list(negative) if negative is not None else [])
        missing = list(dict.fromkeys(p for p in texts if p not in self._cache))
        if missing:
            embeds, _ = self.pipe.encode_prompt(
                missing,
                do_classifier_free_guidance=False,
                max_sequence_length=self.cfg.max_sequence_length,
                device=self.device,
            )
            for text, e in zip(missing, embeds):
                self._cache[text] = e.cpu()
        rows = []
        for text in texts:
            self._cache.move_to_end(text)
            rows.append(self._cache[text])
        while len(self._cache) > self.cfg.encode_cache_size:
            self._cache.popitem(last=False)
        stacked = torch.stack(rows).to(self.device)
        n = len(prompts)
        return Cond(prompt_embeds=stacked[:n], negative_embeds=stacked[n:] if negative is not None else None)

    # ---- the score -----------------------------------------------------------------------------
    def _expert(self, t: torch.Tensor, guidance: float | None, guidance_2: float | None):
        w = self.cfg.guidance_scale if guidance is None else guidance
        if self.boundary is None:
            return self.pipe.transformer, w
        high = t >= self.boundary
        if bool(high.all()):
            return self.pipe.transformer, w
        if bool((~high).all()):
            if guidance_2 is None:
                guidance_2 = guidance if guidance is not None else self.cfg.guidance_scale_2
            return self.pipe.transformer_2, w if guidance_2 is None else guidance_2
        raise ValueError(
            f"velocity: the timesteps {t.flatten().tolist()} straddle the expert boundary {self.boundary}; "
            "call the teacher once per side (t >= boundary uses `transformer`, t < boundary `transformer_2`)"
        )

    def _model_timestep(self, t: torch.Tensor, x: torch.Tensor, model) -> torch.Tensor:
        """[B] stays [B]; per-frame [B, F] becomes per-token [B, F·H'·W'] (Wan's 2-D timestep path)."""
        if t.ndim == 1 and self.pipe.config.expand_timesteps:  # Wan2.2 TI2V always feeds per-token timesteps
            t = t[:, None].expand(-1, x.shape[2])
        if t.ndim == 1:
            return t
        p_t, p_h, p_w = model.config.patch_size
        if p_t != 1:
            raise ValueError(f"velocity: per-frame timesteps need a temporal patch size of 1, got {p_t}")
        return t.repeat_interleave((x.shape[3] // p_h) * (x.shape[4] // p_w), dim=1)

    def _timesteps(self, t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape[0] != x.shape[0] or t.ndim > 2 or (t.ndim == 2 and t.shape[1] != x.shape[2]):
            raise ValueError(f"velocity: t must be [B] or [B, F] for latents {tuple(x.shape)}, got {tuple(t.shape)}")
        return t

    def _velocity(self, x, t, cond: Cond, guidance=None, guidance_2=None) -> torch.Tensor:
        """The velocity in the transformer's dtype, with the same operations as WanPipeline's loop."""
        t = self._timesteps(t, x)
        if len(cond) != x.shape[0]:
            raise ValueError(f"velocity: cond has batch {len(cond)} but latents have batch {x.shape[0]}")
        model, w = self._expert(t, guidance, guidance_2)
        dtype = model.dtype
        x_in, t_in = x.to(self.device, dtype), self._model_timestep(t, x, model)
        pos = cond.prompt_embeds.to(self.device, dtype)

        def forward(xs, ts, embeds):
            # A LoRA student may share this module (one copy of the base weights): the teacher always
            # answers with the adapters off.
            with adapters_disabled(model):
                return model(hidden_states=xs, timestep=ts, encoder_hidden_states=embeds, return_dict=False)[0]

        if w == 1 or cond.negative_embeds is None:
            return forward(x_in, t_in, pos)
        neg = cond.negative_embeds.to(self.device, dtype)
        if self.cfg.cfg_batch:
            v_cond, v_uncond = forward(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), torch.cat([pos, neg])).chunk(2)
        else:
            v_cond, v_uncond = forward(x_in, t_in, pos), forward(x_in, t_in, neg)
        return apply_cfg(v_uncond, v_cond, w)

    @torch.no_grad()
    def velocity(
        self, x: torch.Tensor, t, cond: Cond, guidance: float | None = None, guidance_2: float | None = None
    ) -> torch.Tensor:
        """Guided velocity v = v_u + w·(v_c - v_u), float32 [B, C, F, H, W].

        x: latents [B, C, F, H, W]; t: timesteps 1000·σ as a scalar, [B], or per latent frame [B, F].
        guidance: w (None: teacher.guidance_scale). With two experts every t must be on one side of the
        boundary; the low-noise expert uses `guidance_2`, else an explicit `guidance`, else
        teacher.guidance_scale_2, else teacher.guidance_scale (WanPipeline's rule).
        w == 1 or `cond.negative_embeds is None` runs the conditional branch only. (WanPipeline also skips CFG
        for w < 1; here any w != 1 is applied as written.)
        """
        return self._velocity(x, t, cond, guidance, guidance_2).float()

    # ---- sampling ------------------------------------------------------------------------------
    def make_scheduler(self, shift: float | None = None):
        """A fresh scheduler (they are stateful) of the pipeline's class with `shift` (None: teacher.shift)."""
        return _with_shift(self.scheduler, self.cfg.shift if shift is None else shift)

    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        noise: torch.Tensor,
        steps: int | None = None,
        guidance: float | None = None,
        shift: float | None = None,
        save_at: Sequence[int] = (),
        guidance_2: float | None = None,
        first_frame: torch.Tensor | None = None,
        start_step: int = 0,
    ) -> SampleOutput:
        """Run the pipeline's sampler from `noise` [B, C, F, H, W]; identical to
        `WanPipeline.__call__(prompt_embeds=..., latents=noise, output_type="latent")` with the same steps,
        guidance (and guidance_scale_2 = `guidance_2`) and scheduler shift.
        `save_at`: step indices in [0, steps] whose input state goes to `trajectory`.
        `first_frame` [B, C, 1, H, W] (from `encode_image`; image-conditioned teachers only): image-to-video. The
        first latent frame is that clean frame at timestep 0 in every step's input, in the trajectory and in the
        result, as `WanImageToVideoPipeline(expand_timesteps=True)(image=..., latents=noise)` does.
        `start_step` k: `noise` is the state at step k of the `steps`-step schedule (e.g. clean latents re-noised to
        its σ_k, SDEdit-style) and only steps k.. run; `save_at` and `trajectory` count from step k.
        """
        steps = self.cfg.num_inference_steps if steps is None else steps
        scheduler = self.make_scheduler(shift)
        scheduler.set_timesteps(steps, device=self.device)
        if not 0 <= start_step < steps:
            raise ValueError(f"sample: start_step must be in [0, {steps}), got {start_step}")
        timesteps = scheduler.timesteps[start_step:]
        scheduler.set_begin_index(start_step)
        save = sorted(set(save_at))
        if save and (save[0] < 0 or save[-1] > len(timesteps)):
            raise ValueError(f"sample: save_at indices must be in [0, {len(timesteps)}], got {list(save_at)}")
        latents = noise.to(self.device, torch.float32)
        if first_frame is not None:
            first_frame = self._check_first_frame(first_frame, latents)
            latents = torch.cat([first_frame, latents[:, :, 1:]], dim=2)
        trajectory = []
        for i, t in enumerate(tqdm(timesteps, desc="teacher sampling", leave=False, disable=None)):
            if i in save:
                trajectory.append(latents)
            t_in = t.expand(latents.shape[0])
            if first_frame is not None:  # per frame: the clean first frame at 0, the rest at t
                t_in = t_in[:, None].repeat(1, latents.shape[2])
                t_in[:, 0] = 0
            v = self._velocity(latents, t_in, cond, guidance, guidance_2)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            if first_frame is not None:  # the scheduler moves every frame; the first stays the given image
                latents = torch.cat([first_frame, latents[:, :, 1:]], dim=2)
        if len(timesteps) in save:
            trajectory.append(latents)
        traj = (
            torch.stack(trajectory, dim=1)
            if trajectory
            else latents.new_empty((latents.shape[0], 0, *latents.shape[1:]))
        )
        return SampleOutput(
            latents=latents,
            trajectory=traj,
            timesteps=timesteps,
            sigmas=scheduler.sigmas[start_step : start_step + len(timesteps) + 1].to(self.device),
        )

    # ---- pixels --------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae_cfg = self.pipe.vae.config
        mean = torch.tensor(vae_cfg.latents_mean).view(1, vae_cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(vae_cfg.latents_std).view(1, vae_cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, F, H, W] -> video [B, 3, F', H', W'] float32 in [-1, 1] (WanPipeline's decode)."""
        z = latents.to(self.device, self.pipe.vae.dtype)
        mean, std = self._latent_stats(z)
        z = z / (1.0 / std) + mean  # the pipeline's exact expression
        return self.pipe.vae.decode(z, return_dict=False)[0].float()

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (F = 1 + 4k) -> normalised latents (posterior mode), float32."""
        if video.ndim != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % VAE_TEMPORAL_CHUNK:
            raise ValueError(f"encode_video: expected [B, 3, F, H, W] with F = 1 + 4k frames, got {tuple(video.shape)}")
        z = self.pipe.vae.encode(video.to(self.device, self.pipe.vae.dtype)).latent_dist.mode()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).float()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> the normalised first latent frame [B, C, 1, H', W'] (posterior mode)
        that `sample(first_frame=...)` takes. Wan's VAE is causal in time: this equals the first latent frame of
        `encode_video` of any clip that starts with these images."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_image: expected [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        return self.encode_video(images[:, :, None])

    def resize_image(self, image) -> np.ndarray:
        """A PIL image at the teacher's height x width, resized by diffusers' video processor as its image-to-video
        pipeline does -> uint8 [H, W, 3] (the 8-bit frame `encode_image` should be given)."""
        pixels = self.pipe.video_processor.preprocess(
            image.convert("RGB"), height=self.cfg.height, width=self.cfg.width
        )
        return self.to_uint8(pixels[:, :, None])[0, 0]

    @staticmethod
    def to_uint8(video: torch.Tensor) -> np.ndarray:
        """Video [B, 3, F, H, W] in [-1, 1] -> uint8 numpy [B, F, H, W, 3]."""
        v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return v.permute(0, 2, 3, 4, 1).cpu().numpy()
