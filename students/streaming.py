"""Streaming inference with a causal student: decoded uint8 frames chunk by chunk, for any number of chunks.

    teacher = WanTeacher.from_config(recipe.teacher)          # the text encoder and the VAE
    folder = "outputs/toyworld/students/self_forcing/final"   # a saved causal student (Student.save_pretrained)
    for frames in stream_video(teacher, folder, "a red circle moving left", num_chunks=30, seed=0):
        show(frames)                                          # uint8 [f, H, W, 3], as soon as its chunk is done

Latents come from `students.causal.stream_causal` (the KV-cache rollout, a bounded cache with a `local_window`).
Each chunk is decoded as it arrives by `StreamingDecoder`, which runs the Wan VAE's own frame-by-frame decode loop
and keeps its causal feature cache between chunks, so the frames streamed equal a decode of the whole video (Wan's
4x temporal VAE: 1 frame for the first latent frame, 4 for every later one; the toy world's identity VAE: 1 each).
Noise follows the eval's convention (`sample_noise(seed, shape)`; fresh noise from `derive_seed(seed, 1)`), so a
stream of the eval's length equals the eval's sample of that seed.

Limitations: VAE tiling (`vae.enable_tiling()`) decodes whole videos only, so it is refused here; the VAE's cache is
module state, so nothing else may decode with the same VAE while a stream is open; no CFG (distilled causal
students sample without it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from core.seeding import derive_seed, sample_noise
from students.causal import CausalStream, chunk_bounds
from students.sampling import student_sigmas
from students.student import Student
from teachers.wan import IMAGE_SUFFIXES


class StreamingDecoder:
    """`decoder(latents)`: normalised latents [B, C, f, H, W], chunk after chunk of one video -> video
    [B, 3, f', H', W'] float32 in [-1, 1], equal to the matching frames of `teacher.decode(whole video)`.

    diffusers' `AutoencoderKLWan._decode` loops over latent frames with a causal conv cache (`_feat_map`) that it
    clears before and after each call; this replays that loop but keeps the cache between chunks. It uses diffusers'
    private decode internals (no public streaming decode exists); tests/test_self_forcing.py checks it against
    `vae.decode`.
    """

    def __init__(self, teacher):
        self.vae = teacher.pipe.vae
        if self.vae.use_tiling:
            raise ValueError("StreamingDecoder: VAE tiling decodes whole videos only; call vae.disable_tiling() first")
        cfg = self.vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
        self.first = True
        self.vae.clear_cache()

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents.to(vae.device, vae.dtype)
        z = z / (1.0 / self.std.to(z)) + self.mean.to(z)  # `WanTeacher.decode`'s (the pipeline's) exact expression
        x = vae.post_quant_conv(z)  # kernel 1: frame by frame
        frames = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            frames.append(
                vae.decoder(
                    x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=self.first
                )
            )
            self.first = False
        out = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0).float()

    def close(self) -> None:
        """Free the VAE's cache (the stream is over)."""
        self.vae.clear_cache()


def load_causal_student(teacher, folder: str | Path) -> Student:
    """A saved causal student (`final/` or `final_ema/`), in the teacher's dtype and device, in eval mode."""
    base = teacher.transformer_for(float(teacher.num_train_timesteps))
    student = Student.from_pretrained(folder, base_transformer=base)
    if not student.cfg.spec.causal:
        raise ValueError(f"{folder}: student.kind={student.cfg.kind}; streaming needs a causal student (kind: causal)")
    return student.to(dtype=base.dtype).eval()


def prefix_latents(
    teacher, frames, frames_per_block: int, p_t: int, first_block_frames: int | None = None
) -> torch.Tensor:
    """A clip to continue from -> normalised latents [1, C, P, H, W]: uint8 frames [F, H, W, 3] (numpy or torch),
    the path of a video file (read with PyAV), or of an image (.png, .jpg, .jpeg, .webp: resized to the teacher's
    size by diffusers' video processor, as its image-to-video pipeline does). F = 1 + 4k frames for Wan's VAE (k + 1
    latent frames); P must be whole chunks (the first `first_block_frames`, then `frames_per_block` each), or 1 (one
    image: image-to-video) where the temporal patch p_t is 1."""
    tcfg = teacher.cfg
    if isinstance(frames, (str, Path)):
        path = Path(frames)
        if not path.is_file():
            raise FileNotFoundError(f"continue_from: {path}: no such video or image file")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                frames = teacher.resize_image(im)[None]
        else:
            import av  # only a continuation from a video file needs PyAV

            with av.open(str(path)) as container:
                frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    video = torch.as_tensor(np.asarray(frames))
    if video.ndim != 4 or video.shape[-1] != 3 or tuple(video.shape[1:3]) != (tcfg.height, tcfg.width):
        raise ValueError(
            f"continue_from: frames {tuple(video.shape)}; expected [F, {tcfg.height}, {tcfg.width}, 3] uint8 "
            "(the teacher's height and width)"
        )
    pixels = video.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    latents = teacher.encode_video(pixels)
    n = latents.shape[2]
    if n == 1 and p_t != 1:
        raise ValueError(
            f"continue_from: one image is one latent frame, but this transformer's temporal patch is {p_t}: "
            "image-to-video needs a teacher with temporal patch 1 (Wan2.1); give a clip of whole chunks instead"
        )
    first = frames_per_block if first_block_frames is None else first_block_frames
    if n != 1 and (n < first or (n - first) % frames_per_block):
        layout = f"{frames_per_block} latent frames each" + (
            f", the first {first}" if first != frames_per_block else ""
        )
        raise ValueError(
            f"continue_from: {video.shape[0]} frames make {n} latent frames; a continuation needs a whole number of "
            f"chunks ({layout})"
        )
    return latents


Switches = Sequence[tuple[int, str]] | Callable[[int], str | None]
"""Prompt switches: (chunk index, prompt) pairs, the prompt taking over from that chunk on, or a callable called
before each chunk with its index that returns a new prompt or None."""


@torch.no_grad()
def stream_video(
    teacher,
    student: Student | str | Path,
    prompt: str,
    num_chunks: int,
    seed: int,
    switches: Switches = (),
    recache: bool = True,
    continue_from=None,
    keep_chunks: int | None = None,
    context_noise: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the decoded frames of each chunk, uint8 [f, H, W, 3], for `num_chunks` chunks of
    `student.frames_per_block` latent frames at the teacher's height and width (see the module docstring).

    `student`: a causal `Student` or the folder of a saved one; `teacher`: a `WanTeacher` (text encoder, VAE).
    `switches`: change the prompt mid-stream (`Switches`); `recache`: on a switch, recompute the context's KV cache
    under the new prompt (LongLive), else keep it; `keep_chunks`: re-cache only the latest this-many chunks;
    `context_noise`: re-cache them re-noised to this timestep (`CausalStream.switch`).
    `continue_from`: frames (or a video file) the stream continues;
    they are encoded by the teacher's VAE into the cache and not yielded again (`prefix_latents`)."""
    if not isinstance(student, Student):
        student = load_causal_student(teacher, student)
    cfg, tcfg = student.cfg, teacher.cfg
    if not cfg.spec.causal or not cfg.denoising_steps or cfg.guidance_scale != 1:
        raise ValueError(
            f"student {cfg.name}: streaming needs a causal student with denoising_steps and "
            "guidance_scale 1.0 (the few-step causal sampler has no CFG)"
        )
    if num_chunks < 1:
        raise ValueError(f"num_chunks: must be >= 1, got {num_chunks}")
    schedule = switches if callable(switches) else dict(switches).get
    sigmas = student_sigmas(cfg, tcfg.shift, tcfg.num_inference_steps)
    channels, _, height, width = teacher.latent_shape(1, tcfg.height, tcfg.width)
    causal, prefix = student.causal, None
    if continue_from is not None:
        prefix = prefix_latents(teacher, continue_from, cfg.frames_per_block, causal.p_t, causal.first_block_frames).to(
            teacher.device
        )
    start = 0 if prefix is None else prefix.shape[2]  # the frames of `num_chunks` chunks from there
    bounds = chunk_bounds(
        start + num_chunks * cfg.frames_per_block, cfg.frames_per_block, causal.first_block_frames, start
    )
    frames = bounds[num_chunks - 1][1] - start
    noise = sample_noise(seed, (channels, frames, height, width))[None].to(teacher.device)
    generator = [torch.Generator("cpu").manual_seed(derive_seed(seed, 1))]
    stream = CausalStream(
        student.causal, teacher.encode([prompt], None).prompt_embeds, noise, sigmas, generator, prefix=prefix
    )
    decoder = StreamingDecoder(teacher)
    try:
        if prefix is not None:
            decoder(prefix)  # the VAE's causal cache continues from the given frames (not yielded)
        for chunk in range(num_chunks):
            new = schedule(chunk)
            if new is not None:
                embeds = teacher.encode([new], None).prompt_embeds
                stream.switch(embeds, recache=recache, keep_chunks=keep_chunks, context_noise=context_noise)
            yield teacher.to_uint8(decoder(stream.next_chunk()))[0]
    finally:
        decoder.close()


__all__ = ["StreamingDecoder", "Switches", "load_causal_student", "prefix_latents", "stream_video"]
