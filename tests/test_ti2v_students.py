"""Students of a Wan2.2 TI2V teacher (tiny, random, TI2V-shaped: the 48-channel Wan2.2 VAE, `expand_timesteps`): a
causal student with an independent first frame streams image-to-video from an image file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_teacher import make_cfg

from core.seeding import derive_seed, sample_noise
from students.causal import sample_causal
from students.config import StudentConfig
from students.student import build_student
from teachers.wan import WanTeacher

SIDE, FRAMES = 32, 5  # 2x2 latent px through the 16x VAE; 2 latent frames


@pytest.fixture(scope="module")
def teacher(tiny_ti2v_dir):
    return WanTeacher.from_config(make_cfg(tiny_ti2v_dir, height=SIDE, width=SIDE, num_frames=FRAMES), "cpu")


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


def test_self_forcing_scores_a_given_first_frame_as_image_conditioning(tiny_ti2v_dir):
    """With a TI2V teacher, a step whose first chunk is given (the image) re-noises only the generated frames: σ = 0
    on frame 0, the teacher and the critic get per-token timesteps with frame 0's tokens at 0, and the critic's
    flow-matching loss leaves frame 0 out. Redone by hand from each sample's draws."""
    from core.flow import add_noise, shift_sigma, x0_from_velocity
    from core.seeding import randn_per_sample, sample_generator
    from distill.batch import Batch
    from distill.dmd import dmd_generator_loss
    from distill.self_forcing import CausalRollout, SelfForcing, draw_exit_steps, draw_given_first_chunk

    teacher = WanTeacher.from_config(make_cfg(tiny_ti2v_dir, height=SIDE, width=SIDE, num_frames=9), "cpu")
    shape = (48, 3, 2, 2)  # chunks [0, 1) (the image) and [1, 3)
    cfg = StudentConfig(
        name="c", kind="causal", frames_per_block=2, independent_first_frame=True, denoising_steps=[1000, 500]
    )
    student = build_student(cfg, teacher.pipe.transformer)
    sigmas = [1.0, 5 * 0.5 / (1 + 4 * 0.5)]
    step = next(s for s in range(40) if draw_given_first_chunk(0, s, 0.5))
    seen = []

    def critic(x, t, c):
        seen.append(t)
        return 0.1 * x

    rollout = CausalRollout(student.causal, sigmas, seed=0, samples_per_step=2, last_only=True, given_first_chunk=0.5)
    config = SelfForcing.Config(guidance_scale=3.0, min_sigma=0.1, max_sigma=0.9, shift=2.0, given_first_chunk=0.5)
    algo = SelfForcing(config, teacher=teacher, critic=critic, rollout=rollout)
    captions = ["a red cat moving left", "a blue square"]

    def batch():
        return Batch(
            x0=torch.randn(2, *shape, generator=torch.Generator().manual_seed(5)),
            cond=teacher.encode(captions, "blurry"),
            generators=[sample_generator(0, i) for i in (2 * step, 2 * step + 1)],
            indices=[2 * step, 2 * step + 1],
            captions=captions,
        )

    loss, _ = algo.generator_loss(batch())
    b = batch()
    gens = b.generators
    with torch.no_grad():
        noise = randn_per_sample(gens, shape, "cpu")
        image = b.x0[:, :, :1]
        x0 = torch.cat(
            [image, sample_causal(student.causal, b.cond.prompt_embeds, noise[:, :, 1:], sigmas, gens, prefix=image)], 2
        )
    u = torch.cat([torch.rand(1, generator=g) for g in gens])
    sigma = (0.1 + 0.8 * shift_sigma(u, 2.0))[:, None].repeat(1, 3)
    sigma[:, 0] = 0.0
    eps = randn_per_sample(gens, shape, "cpu")
    x_t = add_noise(x0, eps, sigma)
    assert torch.equal(x_t[:, :, :1], image)  # the image is never re-noised
    torch.testing.assert_close(seen[0], 1000 * sigma)  # one token per frame (2x2 latent px, patch 2x2)
    real = x0_from_velocity(x_t, teacher.velocity(x_t, 1000 * sigma, b.cond, 3.0), sigma)
    torch.testing.assert_close(loss, dmd_generator_loss(x0, real, x0_from_velocity(x_t, 0.1 * x_t, sigma)))
    c_loss, _ = algo.critic_loss(batch())
    v = 0.1 * x_t
    target = eps - x0
    torch.testing.assert_close(c_loss, ((v - target)[:, :, 1:] ** 2).mean())  # frame 0 left out
    assert draw_exit_steps(0, step, 2, 2, last_only=True) == [1, 1]


def test_a_student_takes_per_frame_timesteps_as_wan_per_token_ones(teacher):
    """A LoRA student called with t [B, F] runs Wan's 2-D timestep path: the same as the transformer given the
    per-token timesteps built by hand (4 tokens per frame: 4x4 latent px, patch 2x2)."""
    from diffusers import WanTransformer3DModel

    student = build_student(StudentConfig(name="l", kind="lora", lora_rank=2), teacher.pipe.transformer)
    g = torch.Generator().manual_seed(2)
    x, ehs = torch.randn(2, 48, 3, 4, 4, generator=g), torch.randn(2, 6, 32, generator=g)
    t = torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]])
    per_token = t.repeat_interleave(4, dim=1)
    with torch.no_grad():
        got = student(x, t, ehs)
        want = student.transformer(hidden_states=x, timestep=per_token, encoder_hidden_states=ehs, return_dict=False)[0]
        uniform = student(x, t[:, 1], ehs)
    assert isinstance(student.transformer, WanTransformer3DModel)
    torch.testing.assert_close(got, want)
    assert (got - uniform).abs().max() > 1e-4  # frame 0 at t = 0 is not the 1-D path


def test_trajectory_on_image_to_video_data_sees_the_image_at_t0_and_scores_the_rest(teacher):
    """Batch.given_frames = 1 (a TI2V teacher's image-to-video dataset): the student gets per-frame t with frame 0
    at 0, and the loss of a zero-velocity student is the mean over frames 1.. of (x_σ - x0_T)², by hand."""
    from core.seeding import randint_per_sample, sample_generator
    from distill.batch import Batch
    from distill.trajectory import Trajectory

    seen = {}

    def zero(x, t, c):
        seen["t"] = t
        return torch.zeros_like(x)

    traj = torch.randn(2, 3, 48, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    traj[:, :, :, :1] = traj[:, -1:, :, :1]  # the image: clean in every stored state
    sig = torch.tensor([1.0, 0.5, 0.0]).repeat(2, 1)
    batch = Batch(
        x0=traj[:, -1],
        cond=teacher.encode(["a red cat", "a blue square"], "blurry"),
        generators=[sample_generator(0, i) for i in (0, 1)],
        indices=[0, 1],
        captions=["a red cat", "a blue square"],
        trajectory=traj,
        trajectory_sigmas=sig,
        given_frames=1,
    )
    method = Trajectory(Trajectory.Config(max_sigma_gap=0.01), student=zero, student_sigmas=[1.0, 0.5])
    loss, _ = method.loss(batch)
    k = randint_per_sample([sample_generator(0, i) for i in (0, 1)], 2)  # the student's level per sample
    want_t = torch.stack([torch.tensor([0.0] + [1000 * float(sig[j, k[j]])] * 2) for j in range(2)])
    torch.testing.assert_close(seen["t"], want_t)
    x_t = torch.stack([traj[j, k[j]] for j in range(2)])
    torch.testing.assert_close(loss, ((x_t - traj[:, -1])[:, :, 1:] ** 2).mean())


def test_an_image_to_video_dataset_gives_batches_with_the_given_frame(tmp_path, tiny_ti2v_dir, teacher):
    """The training batches of an image-to-video dataset carry given_frames = 1 (what trajectory and KD read); a
    text-to-video dataset's carry 0."""
    from test_generate import make_project, run_generate, write_images

    from distill.data import StoredSamples, _collate, _to_batch

    root = make_project(tmp_path / "p", tiny_ti2v_dir, num_prompts=2, images="images")
    write_images(root / "images", 1)
    folder = run_generate(root, "teacher.height=32", "teacher.width=32")
    samples = StoredSamples(folder, seed=0, need_trajectory=True)
    assert _to_batch(_collate([samples[0], samples[1]]), teacher, "blurry").given_frames == 1
    t2v = run_generate(
        make_project(tmp_path / "q", tiny_ti2v_dir, num_prompts=2), "teacher.height=32", "teacher.width=32"
    )
    t2v_samples = StoredSamples(t2v, seed=0, need_trajectory=True)
    assert _to_batch(_collate([t2v_samples[0]]), teacher, "blurry").given_frames == 0


def test_kd_on_image_to_video_data_keeps_the_image_clean_for_both_models(teacher):
    """KD with Batch.given_frames = 1: x_σ's frame 0 is the clean image, the student and the TI2V teacher get per-frame
    t with frame 0 at 0, and L_out / L_data leave frame 0 out; redone by hand from each sample's draws."""
    from core.flow import add_noise
    from core.seeding import sample_generator
    from distill.batch import Batch
    from distill.flow_matching import draw_sigma_noise
    from distill.kd import KD

    seen = {}

    def student(x, t, c):
        seen.update(x=x, t=t)
        return 0.5 * x

    x0 = torch.randn(2, 48, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    cond = teacher.encode(["a red cat", "a blue square"], "blurry")

    def batch():
        gens = [sample_generator(0, i) for i in (0, 1)]
        return Batch(x0=x0, cond=cond, generators=gens, indices=[0, 1], captions=["a", "b"], given_frames=1)

    config = KD.Config(output_weight=1.0, data_weight=0.5, guidance_scale=2.0)
    loss, logs = KD(config, student=student, teacher=teacher).loss(batch())
    sigma, noise = draw_sigma_noise(batch().generators, x0, teacher.cfg.shift, "uniform")
    per_frame = sigma[:, None].repeat(1, 3)
    per_frame[:, 0] = 0.0
    x_t = add_noise(x0, noise, per_frame)
    assert torch.equal(x_t[:, :, 0], x0[:, :, 0]) and torch.equal(seen["x"], x_t)
    torch.testing.assert_close(seen["t"], 1000 * per_frame)
    v_t = teacher.velocity(x_t, 1000 * per_frame, cond, 2.0)
    out = ((0.5 * x_t - v_t)[:, :, 1:] ** 2).mean()
    data = ((0.5 * x_t - (noise - x0))[:, :, 1:] ** 2).mean()
    torch.testing.assert_close(logs["loss/kd_output"], out)
    torch.testing.assert_close(loss, out + 0.5 * data)
