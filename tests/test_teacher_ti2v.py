"""The Wan2.2 TI2V teacher (one set of weights for text- and image-to-video) against diffusers' own pipelines on the
same tiny random TI2V-shaped weights: `WanPipeline(expand_timesteps=True)` for text-to-video and
`WanImageToVideoPipeline(expand_timesteps=True)` for image-to-video (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image
from test_teacher import FRAMES, HEIGHT, NEG, PROMPTS, WIDTH, make_cfg, make_noise, pipe_latents, reference

from teachers.wan import WanTeacher


@pytest.fixture(scope="module")
def teacher(tiny_ti2v_dir):
    return WanTeacher.from_config(make_cfg(tiny_ti2v_dir))


def _reference(cls, path):
    return reference(path, UniPCMultistepScheduler, "flow_shift", pipeline_cls=cls)


def _call(pipe, noise, **kw):
    return pipe_latents(pipe, noise, 4.0, **kw)  # make_cfg's guidance


def _noise(teacher, seed=0):
    return make_noise(teacher, batch=len(PROMPTS), seed=seed)


def _image(seed=1):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def test_the_tiny_pipeline_has_the_ti2v_layout(teacher):
    vae = teacher.pipe.vae.config
    assert teacher.image_conditioned and vae.z_dim == 48 and vae.is_residual and vae.patch_size == 2
    assert (teacher.pipe.vae_scale_factor_temporal, teacher.pipe.vae_scale_factor_spatial) == (4, 16)
    assert teacher.latent_shape(FRAMES, HEIGHT, WIDTH) == (48, 3, 4, 4)


def test_text_to_video_matches_the_pipeline(teacher, tiny_ti2v_dir):
    noise = _noise(teacher)
    cond = teacher.encode(PROMPTS, NEG)
    ours = teacher.sample(cond, noise).latents
    expected = _call(_reference(WanPipeline, tiny_ti2v_dir), noise)
    assert ours.abs().max() > 0.1
    assert (ours - expected).abs().max() <= 1e-4


def test_image_to_video_matches_the_image_pipeline(teacher, tiny_ti2v_dir):
    noise = _noise(teacher)
    image = _image()  # the diffusers pipeline takes one image for every prompt
    # The image as the teacher takes it: [B, 3, H, W] in [-1, 1], by hand from the uint8 pixels.
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    first = teacher.encode_image(pixels[None].expand(len(PROMPTS), -1, -1, -1))
    assert first.shape == (2, 48, 1, 4, 4)
    cond = teacher.encode(PROMPTS, NEG)
    out = teacher.sample(cond, noise, first_frame=first, save_at=[0, 2])
    expected = _call(_reference(WanImageToVideoPipeline, tiny_ti2v_dir), noise, image=image)
    assert (out.latents - expected).abs().max() <= 1e-4
    assert torch.equal(out.latents[:, :, :1], first) and torch.equal(out.trajectory[:, 1, :, :1], first)
    t2v = teacher.sample(cond, noise).latents
    assert (out.latents[:, :, 1:] - t2v[:, :, 1:]).abs().max() > 1e-2  # the image steers the later frames


def test_the_first_frame_is_the_first_latent_frame_of_a_clip(teacher):
    clip = torch.rand(1, 3, FRAMES, HEIGHT, WIDTH) * 2 - 1
    assert (teacher.encode_image(clip[:, :, 0]) - teacher.encode_video(clip)[:, :, :1]).abs().max() <= 1e-5


def test_a_text_only_teacher_refuses_a_first_frame(tiny_pipeline_dir):
    teacher = WanTeacher.from_config(make_cfg(tiny_pipeline_dir))
    noise = torch.randn(1, *teacher.latent_shape(FRAMES, HEIGHT, WIDTH))
    with pytest.raises(ValueError, match="first_frame: this teacher has no image conditioning"):
        teacher.sample(teacher.encode(PROMPTS[:1], NEG), noise, first_frame=noise[:, :, :1])


def test_a_first_frame_of_the_wrong_shape_is_refused(teacher):
    noise = _noise(teacher)
    with pytest.raises(ValueError, match=r"first_frame: expected latents \(2, 48, 1, 4, 4\)"):
        teacher.sample(teacher.encode(PROMPTS, NEG), noise, first_frame=noise[:, :, :2])
