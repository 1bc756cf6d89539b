"""Causal students: block-causal mask, KV cache, RoPE offsets, the few-step causal sampler (DESIGN.md §5)."""

from __future__ import annotations

import math

import pytest
import torch

from students.causal import CausalWan, sample_causal, stream_causal
from students.causal_attention import rotary_at
from students.config import StudentConfig
from students.student import Student, build_student
from teachers.tiny import tiny_transformer as build_tiny

B, C, H, W = 2, 4, 4, 4  # 2x2 = 4 tokens per latent frame with the (1, 2, 2) patch


def causal_cfg(**kw) -> StudentConfig:
    return StudentConfig(**{"name": "c", "kind": "causal", **kw})


def inputs(frames: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000  # a different timestep on every frame
    ehs = torch.randn(B, 6, 32, generator=g)
    return x, t, ehs


def teacher_v(transformer, x, t, ehs):
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=ehs, return_dict=False)[0]


@torch.no_grad()
def chunked(model: CausalWan, x, t, ehs, offsets=None):
    """Teacher-forced cached forward: each chunk once, written to the cache; returns (v, cache, sizes)."""
    fpb = model.frames_per_block
    cache = model.init_cache(B, ehs)
    outs, sizes = [], []
    for i, start in enumerate(range(0, x.shape[2], fpb)):
        offset = start if offsets is None else offsets[i]
        outs.append(model.forward_chunk(x[:, :, start : start + fpb], t[:, start : start + fpb], cache, offset, True))
        sizes.append(cache.num_tokens())
    return torch.cat(outs, dim=2), cache, sizes


# ---- 1-2. the cached rollout equals one block-causal forward -------------------------------------------
def test_kv_cache_equals_block_causal_forward(tiny_transformer):
    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=3))
    x, t, ehs = inputs(frames=9)  # 3 chunks, RoPE offsets 0, 3, 6
    with torch.no_grad():
        full = model(x, t, ehs)
    v, cache, _ = chunked(model, x, t, ehs)
    assert (v - full).abs().max() <= 1e-5
    assert cache.positions.tolist() == list(range(9))
    # The offsets matter: chunk 1 at frame 4 instead of 3 (a gap) changes chunks 1 and 2.
    v_shifted, _, _ = chunked(model, x, t, ehs, offsets=[0, 4, 7])
    assert torch.equal(v_shifted[:, :, :3], v[:, :, :3])
    assert (v_shifted[:, :, 3:] - v[:, :, 3:]).abs().max() > 1e-3
    # The mask matters: the bidirectional teacher (per-token timesteps) differs on the first chunk.
    with torch.no_grad():
        bidirectional = teacher_v(tiny_transformer, x, t.repeat_interleave(H * W // 4, dim=1), ehs)
    assert (bidirectional[:, :, :3] - full[:, :, :3]).abs().max() > 1e-3


def test_windowed_cache_with_sink_equals_masked_forward(tiny_transformer):
    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=2, local_window=5, sink=1))
    x, t, ehs = inputs(frames=9)  # chunks of 2, the last one of 1 frame
    with torch.no_grad():
        full = model(x, t, ehs)
        unwindowed = CausalWan(tiny_transformer, causal_cfg(frames_per_block=2))(x, t, ehs)
    v, cache, _ = chunked(model, x, t, ehs)
    assert (v - full).abs().max() <= 1e-5
    assert cache.positions.tolist() == [0, 5, 6, 7, 8]  # the sink, then the last window - sink frames
    # The window matters: chunks that see frames past it differ from the unwindowed student.
    assert torch.equal(full[:, :, :4], unwindowed[:, :, :4])
    assert (full[:, :, 4:] - unwindowed[:, :, 4:]).abs().max() > 1e-3


# ---- 3. one chunk over the whole video is the teacher ----------------------------------------------------
def test_one_block_equals_the_bidirectional_teacher(tiny_transformer):
    teacher = build_tiny()
    x, t, ehs = inputs(frames=5)
    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=5))
    with torch.no_grad():
        ref = teacher_v(teacher, x, torch.full((B,), 640.0), ehs)
        assert (model(x, torch.full((B,), 640.0), ehs) - ref).abs().max() <= 1e-6
        assert (model(x, torch.full((B, 5), 640.0), ehs) - ref).abs().max() <= 1e-6
        # The wrapped module called directly is still the teacher (the processors fall back).
        assert torch.equal(teacher_v(tiny_transformer, x, torch.full((B,), 640.0), ehs), ref)
        # Per-frame timesteps match diffusers' own per-token (2-D timestep) path.
        ref_t = teacher_v(teacher, x, t.repeat_interleave(H * W // 4, dim=1), ehs)
        assert (model(x, t, ehs) - ref_t).abs().max() <= 1e-6


# ---- 3b. CausVid's independent first frame ----------------------------------------------------------------
def test_independent_first_frame_is_a_chunk_of_its_own():
    """Chunks [0, 1), [1, 4), [4, 7): frame 0 is the bidirectional teacher on frame 0 alone, frames 1-3 (one block,
    so the keys of frame 0 are its embedded patches) the teacher on frames 0-3; chunk by chunk with the cache, the
    same as the parallel forward."""
    from students.causal import chunk_bounds

    teacher = build_tiny(num_layers=1)
    model = CausalWan(build_tiny(num_layers=1), causal_cfg(frames_per_block=3, independent_first_frame=True))
    x, t, ehs = inputs(frames=7)
    per_token = t.repeat_interleave(H * W // 4, dim=1)
    with torch.no_grad():
        full = model(x, t, ehs)
        alone = teacher_v(teacher, x[:, :, :1], per_token[:, :4], ehs)
        first_two = teacher_v(teacher, x[:, :, :4], per_token[:, :16], ehs)
        plain = CausalWan(build_tiny(num_layers=1), causal_cfg(frames_per_block=3))(x, t, ehs)
    assert (full[:, :, :1] - alone).abs().max() <= 1e-5
    assert (full[:, :, 1:4] - first_two[:, :, 1:4]).abs().max() <= 1e-5
    assert (plain[:, :, :1] - alone).abs().max() > 1e-3  # without it, frame 0 sees frames 1-2
    bounds = chunk_bounds(7, 3, model.first_block_frames)
    assert bounds == [(0, 1), (1, 4), (4, 7)] and chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    cache = model.init_cache(B, ehs)
    with torch.no_grad():
        v = torch.cat([model.forward_chunk(x[:, :, s:e], t[:, s:e], cache, s, True) for s, e in bounds], dim=2)
    assert (v - full).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="independent_first_frame: the first latent frame alone is a chunk only"):
        CausalWan(build_tiny(patch_size=(3, 2, 2)), causal_cfg(frames_per_block=3, independent_first_frame=True))


def test_image_to_video_stream_starts_after_the_given_first_frame(tiny_transformer):
    """With an independent first frame, a one-frame prefix (an image) is chunk 0: the stream generates chunks
    [1, 4), [4, 7), each what one block-causal forward of [image at t = 0, the chunk's noise at σ] gives; without a
    prefix the first chunk generated is the single frame 0."""
    from students.causal import CausalStream

    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=3, independent_first_frame=True))
    noise, ehs, _ = _stream_inputs(7)
    image = torch.randn(B, C, 1, H, W, generator=torch.Generator().manual_seed(4))
    sigma = 0.7
    stream = CausalStream(model, ehs, noise[:, :, 1:], [sigma], prefix=image)
    got = stream.next_chunk()
    x = torch.cat([image, noise[:, :, 1:4]], dim=2)
    t = torch.cat([torch.zeros(B, 1), torch.full((B, 3), sigma * 1000)], dim=1)
    with torch.no_grad():
        want = noise[:, :, 1:4] - sigma * model(x, t, ehs)[:, :, 1:4]
        rolled = sample_causal(model, ehs, noise[:, :, 1:], [sigma], prefix=image)
    assert got.shape[2] == 3 and (got - want).abs().max() <= 1e-5
    assert rolled.shape[2] == 6 and (rolled[:, :, :3] - got).abs().max() <= 1e-6
    text_only = CausalStream(model, ehs, noise, [sigma])
    assert [text_only.next_chunk().shape[2] for _ in range(3)] == [1, 3, 3]


# ---- 4. causality ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["timestep", "latents"])
def test_a_chunk_only_influences_itself_and_later_chunks(tiny_transformer, what):
    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=2))
    x, t, ehs = inputs(frames=8)
    k = 2  # chunk 2 = frames 4, 5
    x2, t2 = x.clone(), t.clone()
    if what == "timestep":
        t2[:, 4:6] = 1000.0 - t2[:, 4:6]
    else:
        x2[:, :, 4:6] += 1.0
    with torch.no_grad():
        v, v2 = model(x, t, ehs), model(x2, t2, ehs)
    assert (v2[:, :, : 2 * k] - v[:, :, : 2 * k]).abs().max() <= 1e-6  # earlier chunks: unchanged
    for c in (k, k + 1):
        assert (v2[:, :, 2 * c : 2 * c + 2] - v[:, :, 2 * c : 2 * c + 2]).abs().max() > 1e-3
    # Same in the cached rollout.
    c1, _, _ = chunked(model, x, t, ehs)
    c2, _, _ = chunked(model, x2, t2, ehs)
    assert torch.equal(c1[:, :, : 2 * k], c2[:, :, : 2 * k])
    assert (c2[:, :, 2 * k :] - c1[:, :, 2 * k :]).abs().max() > 1e-3


# ---- 5. bounded cache, rollouts past the trained length --------------------------------------------------
def test_rope_past_the_table_and_inside_it(tiny_transformer):
    rope = tiny_transformer.rope
    cos, sin = rotary_at(tiny_transformer, torch.arange(3), 2, 2, torch.device("cpu"))
    ref_cos, ref_sin = rope(torch.zeros(1, 4, 3, 4, 4))
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    far = rope.max_seq_len + 5  # beyond Wan's table: θ_i = pos · 10000^(-2i/t_dim)
    cos_far, _ = rotary_at(tiny_transformer, torch.tensor([far]), 1, 1, torch.device("cpu"))
    expected = math.cos(far * 10000 ** (-2 / rope.t_dim))
    assert abs(cos_far[0, 0, 0, 2].item() - expected) < 1e-6


def test_cache_is_bounded_and_long_rollouts_run(tiny_transformer):
    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=3, local_window=9, sink=3))
    train_frames = 6
    noise, _, ehs = inputs(frames=10 * train_frames)  # 60 frames: past rope_max_seq_len = 32 too
    sizes, original = [], model.forward_chunk

    def spy(x, t, cache, frame_offset, update_cache):  # records the cache size after each write
        out = original(x, t, cache, frame_offset, update_cache)
        if update_cache:
            sizes.append(cache.num_tokens())
        return out

    model.forward_chunk = spy
    with torch.no_grad():
        video = sample_causal(model, ehs, noise, [1.0, 0.5], generator=torch.Generator().manual_seed(0))
    assert video.shape == noise.shape and torch.isfinite(video).all()
    assert sizes[:3] == [12, 24, 36] and set(sizes[3:]) == {36}  # window 9 frames x 4 tokens, then constant
    assert video[:, :, -3:].std() > 0.1


# ---- the causal sampler ----------------------------------------------------------------------------------
def test_one_step_rollout_is_teacher_forcing_on_its_own_output(tiny_transformer):
    """Chunk c of a 1-step rollout = the parallel forward on [x0 of chunks < c at t=context_noise, noise_c at 1000]."""
    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=2))
    noise, _, ehs = inputs(frames=6)
    with torch.no_grad():
        video = sample_causal(model, ehs, noise, [1.0])
        for c in range(3):
            s = 2 * c
            x_in = torch.cat([video[:, :, :s], noise[:, :, s : s + 2]], dim=2)
            t_in = torch.cat([torch.zeros(B, s), torch.full((B, 2), 1000.0)], dim=1)
            x0 = x_in[:, :, s:] - model(x_in, t_in, ehs)[:, :, s:]
            assert (x0 - video[:, :, s : s + 2]).abs().max() <= 1e-5
    assert (video[:, :, 2:] - (noise - model(noise, 1000.0, ehs))[:, :, 2:]).abs().max() > 1e-3


def test_stream_chunks_context_noise_and_exit_steps(tiny_transformer):
    noise, _, ehs = inputs(frames=7)
    sigmas = [1.0, 0.6, 0.3]
    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=3))
    with torch.no_grad():
        chunks = list(stream_causal(model, ehs, noise, sigmas, torch.Generator().manual_seed(3)))
        video = sample_causal(model, ehs, noise, sigmas, torch.Generator().manual_seed(3))
        noisy_ctx = sample_causal(
            CausalWan(tiny_transformer, causal_cfg(frames_per_block=3, context_noise=500)),
            ehs,
            noise,
            sigmas,
            torch.Generator().manual_seed(3),
        )
    assert [ch.shape[2] for ch in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat(chunks, dim=2), video)
    # context_noise only changes what later chunks see (chunk 0 draws the same renoise first).
    assert torch.equal(noisy_ctx[:, :, :3], video[:, :, :3])
    assert (noisy_ctx[:, :, 3:] - video[:, :, 3:]).abs().max() > 1e-3
    # Self-Forcing's exit step: the output keeps its graph, the cache does not.
    tiny_transformer.requires_grad_(True)
    out = sample_causal(model, ehs, noise, sigmas, torch.Generator().manual_seed(3), exit_steps=[0, 1, 2])
    assert out.requires_grad
    with torch.no_grad():
        one_step = sample_causal(model, ehs, noise[:, :, :3], [1.0])
    assert (out[:, :, :3] - one_step).abs().max() <= 1e-6  # chunk 0 stopped at step 0
    out.square().mean().backward()
    assert tiny_transformer.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exit_steps"):
        sample_causal(model, ehs, noise, sigmas, exit_steps=[0, 3, 0])


# ---- 6. weights, Student integration, config ------------------------------------------------------------
def test_causal_student_holds_the_teachers_weights_key_for_key(tiny_transformer, tmp_path):
    cfg = causal_cfg(frames_per_block=2, local_window=4, sink=2)
    student = build_student(cfg, tiny_transformer)
    teacher_sd = tiny_transformer.state_dict()
    sd = student.experts[0].state_dict()
    assert list(sd) == list(teacher_sd)
    assert all(torch.equal(sd[k], teacher_sd[k]) for k in teacher_sd)
    assert list(student.causal.state_dict()) == [f"transformer.{k}" for k in teacher_sd]
    assert list(student.trainable_state_dict()) == [f"expert_0.{k}" for k in teacher_sd]
    x, t, ehs = inputs(frames=6)
    with torch.no_grad():
        v = student(x, t, ehs)
        assert torch.equal(v, student.causal(x, t, ehs))
        student.save_pretrained(tmp_path / "s")
        loaded = Student.from_pretrained(tmp_path / "s", build_tiny(), cfg)
        assert torch.equal(loaded(x, t, ehs), v)


def test_causal_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"local_window: must be >= frames_per_block \+ sink = 5"):
        causal_cfg(frames_per_block=3, local_window=4, sink=2)
    with pytest.raises(ValueError, match="sink: 1 needs a local_window"):
        causal_cfg(sink=1)
    with pytest.raises(ValueError, match="context_noise"):
        causal_cfg(context_noise=1001)
    with pytest.raises(ValueError, match="experts: kind=causal supports a single expert"):
        causal_cfg(experts=2, expert_boundaries=[0.5])
    with pytest.raises(ValueError, match=r"student\.frames_per_block: must be a multiple .* 2, got 3"):
        CausalWan(build_tiny(num_layers=1, patch_size=(2, 2, 2)), causal_cfg(frames_per_block=3))
    model = CausalWan(build_tiny(num_layers=1), causal_cfg(frames_per_block=2))
    x, t, ehs = inputs(frames=4)
    cache = model.init_cache(B, ehs)
    with torch.no_grad():
        model.forward_chunk(x[:, :, :2], t[:, :2], cache, 0, update_cache=True)
        with pytest.raises(ValueError, match="overlaps the cache"):
            model.forward_chunk(x[:, :, :2], t[:, :2], cache, 1, update_cache=True)
        with pytest.raises(ValueError, match="chunk 1..2 frames"):
            model.forward_chunk(x[:, :, :3], t[:, :3], cache, 2, update_cache=True)


def test_gradient_checkpointing_keeps_the_mask_and_the_cache_snapshot(tiny_transformer):
    model = CausalWan(tiny_transformer.requires_grad_(True), causal_cfg(frames_per_block=2, local_window=4, sink=2))
    x, t, ehs = inputs(frames=6)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            tiny_transformer.enable_gradient_checkpointing()
        for run in ("parallel", "rollout"):  # the rollout's recompute happens after later chunks changed the cache
            tiny_transformer.zero_grad()
            out = (
                model(x, t, ehs)
                if run == "parallel"
                else sample_causal(model, ehs, x, [1.0, 0.5], exit_steps=1, generator=torch.Generator().manual_seed(0))
            )
            out.square().mean().backward()
            grads.append(tiny_transformer.blocks[0].attn1.to_k.weight.grad.clone())
    for plain, checkpointed in zip(grads[:2], grads[2:]):
        assert plain.abs().max() > 0 and (checkpointed - plain).abs().max() <= 1e-6


# ---- interactive streams: prompt switches (KV re-cache) and continuation from given frames ----------------------
def _stream_inputs(frames, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, C, frames, H, W, generator=g),
        torch.randn(B, 6, 32, generator=g),
        torch.randn(B, 6, 32, generator=g),
    )


def test_stream_without_switch_equals_stream_causal(tiny_transformer):
    from students.causal import CausalStream

    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=2, local_window=4, sink=1))
    noise, ehs, _ = _stream_inputs(7)
    sigmas = [0.9, 0.5, 0.2]
    with torch.no_grad():
        want = list(stream_causal(model, ehs, noise, sigmas, generator=torch.Generator().manual_seed(5)))
    stream = CausalStream(model, ehs, noise, sigmas, generator=torch.Generator().manual_seed(5))
    got = [stream.next_chunk() for _ in range(4)]
    assert [g.shape[2] for g in got] == [2, 2, 2, 1]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(StopIteration):
        stream.next_chunk()


@pytest.mark.parametrize("prefix", [False, True])
def test_recache_switch_and_continuation_equal_a_block_causal_forward_under_the_new_prompt(tiny_transformer, prefix):
    """After a switch with KV re-cache (or from a given clip), the next chunk is what one block-causal forward of
    [the clean context at t = 0, the chunk's noise at σ] under the new prompt gives; keeping the old cache is not."""
    from students.causal import CausalStream

    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=2))
    noise, ehs_a, ehs_b = _stream_inputs(6)
    sigma = 0.8
    if prefix:  # continuation: frames 0-3 given, under prompt B from the start
        context = torch.randn(B, C, 4, H, W, generator=torch.Generator().manual_seed(9))
        stream = CausalStream(model, ehs_b, noise[:, :, 4:], [sigma], prefix=context)
    else:  # two chunks under A, then a switch to B
        stream = CausalStream(model, ehs_a, noise, [sigma])
        context = torch.cat([stream.next_chunk(), stream.next_chunk()], dim=2)
        stream.switch(ehs_b, recache=True)
    got = stream.next_chunk()
    x = torch.cat([context, noise[:, :, 4:6]], dim=2)
    t = torch.cat([torch.zeros(B, 4), torch.full((B, 2), sigma * 1000)], dim=1)
    with torch.no_grad():
        want = noise[:, :, 4:6] - sigma * model(x, t, ehs_b)[:, :, 4:6]
    assert (got - want).abs().max() <= 1e-5
    if not prefix:  # keeping the old cache: the cross-attention follows B, the context's keys still read A
        kept = CausalStream(model, ehs_a, noise, [sigma])
        kept.next_chunk(), kept.next_chunk()
        kept.switch(ehs_b, recache=False)
        other = kept.next_chunk()
        assert (other - want).abs().max() > 1e-3
        with torch.no_grad():  # the stored keys are B's, by hand: text projection, then each block's to_k, norm_k
            text = tiny_transformer.condition_embedder.text_embedder(ehs_b)
            for block, k in zip(tiny_transformer.blocks, kept.cache.cross_k):
                want_k = block.attn2.norm_k(block.attn2.to_k(text)).unflatten(2, (block.attn2.heads, -1))
                assert (k - want_k).abs().max() <= 1e-6


def test_a_switch_that_keeps_only_the_last_chunk_forgets_the_older_context(tiny_transformer):
    """keep_chunks=1: after two chunks under A, the switch re-caches only chunk 1 under B; the next chunk is one
    block-causal forward of [chunk 1 clean at t = 0, the chunk's noise] (RoPE is relative: the positions' offset
    does not matter), and differs from a full re-cache."""
    from students.causal import CausalStream

    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=2))
    noise, ehs_a, ehs_b = _stream_inputs(6)
    sigma = 0.8
    stream = CausalStream(model, ehs_a, noise, [sigma])
    stream.next_chunk()
    last = stream.next_chunk()
    stream.switch(ehs_b, recache=True, keep_chunks=1)
    got = stream.next_chunk()
    x = torch.cat([last, noise[:, :, 4:6]], dim=2)
    t = torch.cat([torch.zeros(B, 2), torch.full((B, 2), sigma * 1000)], dim=1)
    with torch.no_grad():
        want = noise[:, :, 4:6] - sigma * model(x, t, ehs_b)[:, :, 2:4]
    assert (got - want).abs().max() <= 1e-4
    full = CausalStream(model, ehs_a, noise, [sigma])
    full.next_chunk(), full.next_chunk()
    full.switch(ehs_b, recache=True)
    assert (full.next_chunk() - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match="they need recache=True"):
        full.switch(ehs_a, recache=False, keep_chunks=1)


def test_a_switch_can_re_cache_the_old_scene_re_noised(tiny_transformer):
    """context_noise=500: the re-cached chunks (and the one finished before the switch) are written re-noised to
    σ = 0.5 at t = 500, with the stream's generator; the next chunk is one block-causal forward of [that noisy
    context at t = 500, the chunk's noise at σ] under the new prompt."""
    from diffusers.utils.torch_utils import randn_tensor

    from students.causal import CausalStream

    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=2))
    noise, ehs_a, ehs_b = _stream_inputs(6)
    sigma = 0.8
    stream = CausalStream(model, ehs_a, noise, [sigma], generator=torch.Generator().manual_seed(3))
    context = torch.cat([stream.next_chunk(), stream.next_chunk()], dim=2)
    stream.switch(ehs_b, recache=True, context_noise=500)
    got = stream.next_chunk()
    g = torch.Generator().manual_seed(3)  # one-step chunks draw nothing: the draws are the two re-noisings
    eps = torch.cat([randn_tensor((B, C, 2, H, W), generator=g) for _ in range(2)], dim=2)
    x = torch.cat([0.5 * context + 0.5 * eps, noise[:, :, 4:6]], dim=2)
    t = torch.cat([torch.full((B, 4), 500.0), torch.full((B, 2), sigma * 1000)], dim=1)
    with torch.no_grad():
        want = noise[:, :, 4:6] - sigma * model(x, t, ehs_b)[:, :, 4:6]
    assert (got - want).abs().max() <= 1e-5
    clean = CausalStream(model, ehs_a, noise, [sigma], generator=torch.Generator().manual_seed(3))
    clean.next_chunk(), clean.next_chunk()
    clean.switch(ehs_b, recache=True)
    assert (clean.next_chunk() - got).abs().max() > 1e-3


def test_a_prefix_must_fit_the_temporal_patch():
    from students.causal import CausalStream

    model = CausalWan(build_tiny(patch_size=(3, 2, 2)), causal_cfg(frames_per_block=3))
    noise, ehs, _ = _stream_inputs(3)
    with pytest.raises(ValueError, match=r"temporal patch is 3, so a prefix must be a multiple of 3 latent frames"):
        CausalStream(model, ehs, noise, [0.5], prefix=torch.zeros(B, C, 1, H, W))


# ---- the flex_attention block mask -------------------------------------------------------------------------
def _rule(tokens_per_pos, block, num_pos, window, sink, first=None):
    """The visibility rule written out per token pair for torch's create_block_mask (independent of the module);
    `first` = 1: the first position is a chunk of its own."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos, k_pos = q_idx // tokens_per_pos, kv_idx // tokens_per_pos
        if first == 1:  # chunks [0, 1), [1, 1 + block), ...
            end = torch.where(q_pos == 0, 1, torch.clamp((q_pos - 1) // block * block + block + 1, max=num_pos))
        else:
            end = torch.clamp((q_pos // block + 1) * block, max=num_pos)
        seen = k_pos < end
        if window is not None:
            seen = seen & ((k_pos < sink) | (k_pos >= end - (window - sink)))
        return seen

    return mask_mod


@pytest.mark.parametrize(
    "num_pos,tokens_per_pos,block,window,sink,block_size,first",
    [
        (7, 20, 3, None, 0, 16, None),
        (9, 12, 2, 5, 1, 16, None),
        (21, 10, 3, 9, 3, 32, None),
        (6, 5, 3, None, 0, 128, None),
        (10, 12, 3, None, 0, 16, 1),
        (13, 10, 3, 7, 1, 32, 1),
    ],
)
def test_block_mask_tiles_equal_torchs_create_block_mask(
    num_pos, tokens_per_pos, block, window, sink, block_size, first
):
    from torch.nn.attention.flex_attention import create_block_mask

    from students.causal_attention import block_causal_block_mask, block_causal_mask

    total = num_pos * tokens_per_pos
    ours = block_causal_block_mask(
        num_pos, tokens_per_pos, block, window, sink, "cpu", block_size=block_size, first=first
    )
    rule = _rule(tokens_per_pos, block, num_pos, window, sink, first)
    ref = create_block_mask(rule, None, None, total, total, "cpu", BLOCK_SIZE=block_size)
    q, k = torch.arange(total)[:, None], torch.arange(total)[None, :]
    dense = block_causal_mask(num_pos, tokens_per_pos, block, window, sink, "cpu", first=first)
    assert torch.equal(dense, rule(None, None, q, k))  # the SDPA mask follows the same rule
    n = ref.kv_num_blocks.shape[-1]
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)  # partial tiles per query block
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)  # full tiles per query block
    assert torch.equal(ours.to_dense(), ref.to_dense())
    for q in range(n):  # the same tiles of each kind (any order within a row)
        k = int(ref.kv_num_blocks[0, 0, q])
        assert sorted(ours.kv_indices[0, 0, q, :k].tolist()) == sorted(ref.kv_indices[0, 0, q, :k].tolist())
        k = int(ref.full_kv_num_blocks[0, 0, q])
        got = sorted(ours.full_kv_indices[0, 0, q, :k].tolist())
        assert got == sorted(ref.full_kv_indices[0, 0, q, :k].tolist())


def test_block_mask_at_480p_is_a_megabyte_not_a_gigabyte():
    from students.causal_attention import block_causal_block_mask

    # Wan2.1 480x832x81: 21 latent frames of 30x52 tokens, chunks of 3 frames
    mask = block_causal_block_mask(21, 30 * 52, 3, None, 0, "cpu")
    size = sum(t.numel() * t.element_size() for t in (mask.kv_num_blocks, mask.kv_indices))
    size += sum(t.numel() * t.element_size() for t in (mask.full_kv_num_blocks, mask.full_kv_indices))
    assert size < 2**20 < (21 * 30 * 52) ** 2 // 1000  # the dense bool mask: 1.07 GB
    assert int(mask.full_kv_num_blocks.sum()) > int(mask.kv_num_blocks.sum())  # most tiles need no mask call


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("window,sink", [(None, 0), (5, 1)])
def test_flex_attention_forward_equals_the_dense_mask(tiny_transformer, window, sink):
    x, t, ehs = inputs(frames=9)
    kw = {"frames_per_block": 2, "local_window": window, "sink": sink}
    with torch.no_grad():
        dense = CausalWan(tiny_transformer, causal_cfg(attention="sdpa", **kw))(x, t, ehs)
        flex = CausalWan(tiny_transformer, causal_cfg(attention="flex", **kw))(x, t, ehs)
        bidirectional = CausalWan(tiny_transformer, causal_cfg(frames_per_block=9))(x, t, ehs)
    assert (flex - dense).abs().max() <= 1e-5
    assert (flex - bidirectional).abs().max() > 1e-3  # the mask is applied


def test_a_chunk_forward_with_grad_trains_the_text_path_like_the_parallel_forward(tiny_transformer):
    """Gradients of one chunk through the cache path (text projected and cross K/V computed inside the blocks) equal
    those of the parallel forward, also after an earlier chunk without grad stored the cross K/V."""
    model = CausalWan(tiny_transformer, causal_cfg(frames_per_block=3))
    x, t, ehs = inputs(frames=6)
    names = [
        "condition_embedder.text_embedder.linear_1.weight",
        "blocks.0.attn2.to_k.weight",
        "blocks.1.attn2.to_v.weight",
    ]
    params = dict(tiny_transformer.named_parameters())

    def grads(loss):
        return torch.autograd.grad(loss, [params[n] for n in names])

    want = grads(model(x[:, :, :3], t[:, :3], ehs).square().sum())
    cache = model.init_cache(B, ehs)
    got = grads(model.forward_chunk(x[:, :, :3], t[:, :3], cache, 0, update_cache=False).square().sum())
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() and b.abs().max() > 0
    with torch.no_grad():  # chunk 0 written without grad: the cross K/V are stored...
        model.forward_chunk(x[:, :, :3], t[:, :3], cache, 0, update_cache=True)
    assert cache.has_cross()
    later = grads(model.forward_chunk(x[:, :, 3:], t[:, 3:], cache, 3, update_cache=False).square().sum())
    assert all(g.abs().max() > 0 for g in later)  # ...and a later forward with grad still reaches the text path
