"""Students of a Wan2.2 TI2V teacher (tiny, random, TI2V-shaped: the 48-channel Wan2.2 VAE, `expand_timesteps`): a
causal student with an independent first frame streams image-to-video from an image file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.seeding import derive_seed, sample_noise
from students.causal import sample_causal
from students.config import StudentConfig
from students.student import build_student
from teachers.config import TeacherConfig
from teachers.wan import WanTeacher

SIDE, FRAMES = 32, 5  # 2x2 latent px through the 16x VAE; 2 latent frames


@pytest.fixture(scope="module")
def teacher(tiny_ti2v_dir):
    cfg = TeacherConfig(
        pretrained=str(tiny_ti2v_dir),
        dtype="float32",
        height=SIDE,
        width=SIDE,
        num_frames=FRAMES,
        num_inference_steps=4,
        max_sequence_length=8,
        shift=5.0,
    )
    return WanTeacher.from_config(cfg, "cpu")


def test_the_wan22_vae_streams_chunk_by_chunk_like_the_whole_decode(teacher):
    from students.streaming import StreamingDecoder

    latents = torch.randn(1, 48, 7, 2, 2, generator=torch.Generator().manual_seed(4))
    decoder = StreamingDecoder(teacher)
    parts = [decoder(latents[:, :, a:b]) for a, b in ((0, 1), (1, 4), (4, 7))]
    decoder.close()
    whole = teacher.decode(latents)
    assert [p.shape[2] for p in parts] == [1, 12, 12] and whole.shape[2] == 25
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=0)


def test_image_to_video_stream_from_an_image_file(teacher, tmp_path):
    """The image, resized and encoded by the VAE, is chunk 0 in the cache; the stream yields chunks [1, 4), [4, 7) =
    one `sample_causal` from that prefix, decoded with the image's frame in front (which is not yielded)."""
    from students.streaming import stream_video

    cfg = StudentConfig(
        name="i2v", kind="causal", frames_per_block=3, independent_first_frame=True, denoising_steps=[1000, 500]
    )
    student = build_student(cfg, teacher.pipe.transformer)
    student.save_pretrained(tmp_path / "i2v")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "first.png")
    prompt, seed = "a red cat moving left", 3
    chunks = list(
        stream_video(teacher, tmp_path / "i2v", prompt, num_chunks=2, seed=seed, continue_from=tmp_path / "first.png")
    )
    assert [c.shape for c in chunks] == [(12, SIDE, SIDE, 3)] * 2
    with torch.no_grad():
        image = teacher.pipe.video_processor.preprocess(Image.open(tmp_path / "first.png").convert("RGB"), SIDE, SIDE)
        pixels = torch.from_numpy(teacher.to_uint8(image[:, :, None])[0, 0]).permute(2, 0, 1)[None].float() / 127.5 - 1
        first = teacher.encode_image(pixels)
        noise = sample_noise(seed, (48, 6, 2, 2))[None]
        gen = [torch.Generator().manual_seed(derive_seed(seed, 1))]
        embeds = teacher.encode([prompt]).prompt_embeds
        sigmas = [1.0, 5 * 0.5 / (1 + 4 * 0.5)]  # [1000, 500] warped through shift 5
        latents = sample_causal(student.causal, embeds, noise, sigmas, generator=gen, prefix=first)
        want = teacher.to_uint8(teacher.decode(torch.cat([first, latents], dim=2)))[0, 1:]
    # the chunked decode equals the whole one to ~1e-6 (above), which can move a pixel across an 8-bit level
    assert np.abs(np.concatenate(chunks).astype(int) - want.astype(int)).max() <= 1
    with pytest.raises(ValueError, match=r"a whole number of chunks \(3 latent frames each, the first 1\)"):
        list(stream_video(teacher, student, prompt, 1, seed, continue_from=np.zeros((5, SIDE, SIDE, 3), np.uint8)))


def test_lora_exports_of_a_ti2v_student_reproduce_it(tmp_path, tiny_ti2v_dir):
    """The 5B's layout (48 latent channels): diffusers' own loaders take both LoRA exports into a fresh TI2V pipeline
    (the ComfyUI file through diffusers' converter of Wan-native names) and reproduce the student."""
    from diffusers import WanPipeline
    from test_export import recipe_for, run, trained_student

    from distill.export import export_student

    recipe = recipe_for(tmp_path, tiny_ti2v_dir, ["diffusers_lora", "comfyui_lora"])
    pipe = WanPipeline.from_pretrained(tiny_ti2v_dir)
    student = trained_student(recipe, pipe)
    out = export_student(recipe, student, pipe, recipe.student_dir() / "export")
    g = torch.Generator().manual_seed(1)
    x, t, ehs = (
        torch.randn(2, 48, 2, 4, 4, generator=g),
        torch.tensor([900.0, 250.0]),
        torch.randn(2, 6, 32, generator=g),
    )
    with torch.no_grad():
        want = student(x, t, ehs)
    fresh = WanPipeline.from_pretrained(tiny_ti2v_dir)
    fresh.load_lora_weights(out["diffusers_lora"])
    assert (run(fresh.transformer, x, t, ehs) - want).abs().max() <= 1e-5
    fresh = WanPipeline.from_pretrained(tiny_ti2v_dir)
    fresh.load_lora_weights(out["comfyui_lora"].parent, weight_name=out["comfyui_lora"].name)
    assert (run(fresh.transformer, x, t, ehs) - want).abs().max() <= 1e-5
    base = WanPipeline.from_pretrained(tiny_ti2v_dir).transformer
    assert (run(base, x, t, ehs) - want).abs().max() > 1e-3  # the LoRA changes the output
