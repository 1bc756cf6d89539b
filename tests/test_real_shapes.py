"""The released Wan shapes on CPU (slow): random weights at the real configs, nothing downloaded.

- Wan2.1-T2V-1.3B whole (30 blocks, bf16): the causal student's chunk-by-chunk rollout equals its block-causal
  forward, and a chunk back-propagates with gradient checkpointing;
- one Wan2.1-T2V-14B block (dim 5120, ffn 13824, bf16): the same;
- a pipeline at the 1.3B width (2 of its 30 blocks, the real Wan2.1 VAE config, a one-layer text encoder of UMT5-XXL's
  width 4096): one `self_forcing` training step through the trainer, and a LoRA student trained one step and exported
  to diffusers and ComfyUI, read back by diffusers' own loader. (The whole 1.3B with AdamW for a student and a critic
  needs ~45 GB, more than the CPU machines that run this suite.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_WORDS
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file
from test_trainer import run_train, write_recipe

from benchmarks.common import cast_like_from_pretrained
from distill.memory_plan import WAN21_13B_TRANSFORMER, WAN21_14B_TRANSFORMER, WAN21_VAE
from students.causal import CausalWan
from students.config import StudentConfig

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real_shapes"), pytest.mark.timeout(1800)]

BF16_RELATIVE = 2e-2
"""Max |cached - parallel| / max |parallel| in bf16: the two paths sum attention over keys in another order."""


def random_transformer(**config) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return cast_like_from_pretrained(WanTransformer3DModel(**config), torch.bfloat16).eval()


def causal_checks(transformer: WanTransformer3DModel, chunks: int = 2) -> None:
    """Cached rollout = block-causal forward (bf16 rounding), and one chunk's backward is finite and non-zero."""
    cfg = StudentConfig(name="c", kind="causal", frames_per_block=3, attention="sdpa")
    model = CausalWan(transformer, cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3 * chunks, 8, 8, generator=g)  # 4x4 tokens per latent frame (bf16 is slow on CPUs)
    t = torch.full((1, 3 * chunks), 700.0)
    text = torch.randn(1, 64, 4096, generator=g)
    with torch.no_grad():
        full = model(x, t, text).float()
        cache = model.init_cache(1, text)
        parts = [
            model.forward_chunk(x[:, :, s : s + 3], t[:, s : s + 3], cache, s, True) for s in range(0, 3 * chunks, 3)
        ]
    cached = torch.cat(parts, dim=2).float()
    assert torch.isfinite(full).all()
    assert (cached - full).abs().max() <= BF16_RELATIVE * full.abs().max()
    transformer.enable_gradient_checkpointing()
    transformer.requires_grad_(True)
    model.forward_chunk(
        x[:, :, 3:6], t[:, 3:6], cache_after_first(model, x, t, text), 3, False
    ).float().square().mean().backward()
    grads = [p.grad for p in transformer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert transformer.blocks[0].attn2.to_k.weight.grad.abs().max() > 0  # the text path trains from the cache path


def cache_after_first(model: CausalWan, x, t, text):
    cache = model.init_cache(1, text)
    with torch.no_grad():
        model.forward_chunk(x[:, :, :3], t[:, :3], cache, 0, True)
    return cache


def test_wan21_1_3b_causal_rollout_and_backward_at_the_real_config():
    transformer = random_transformer(**WAN21_13B_TRANSFORMER)
    assert sum(p.numel() for p in transformer.parameters()) == 1_418_996_800  # the released model's count
    causal_checks(transformer)


def test_one_wan21_14b_block_at_the_real_width():
    transformer = random_transformer(**{**WAN21_14B_TRANSFORMER, "num_layers": 1})
    block = sum(p.numel() for p in transformer.blocks[0].parameters())
    assert block == 351_394_304  # one of the 14B's 40 blocks
    causal_checks(transformer)


@pytest.fixture(scope="module")
def wide_pipeline_dir(tmp_path_factory):
    """A saved WanPipeline at the 1.3B width: 2 of its blocks, the real Wan2.1 VAE config, a one-layer UMT5 of
    width 4096 over the test vocabulary (random weights)."""
    from diffusers import AutoencoderKLWan

    from teachers.tiny import tiny_text_encoder, word_tokenizer

    tokenizer = word_tokenizer(TINY_WORDS)
    torch.manual_seed(0)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer), d_model=4096, num_layers=1, num_heads=2, d_ff=64),
        vae=AutoencoderKLWan(**WAN21_VAE).eval(),
        transformer=random_transformer(**{**WAN21_13B_TRANSFORMER, "num_layers": 2}),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    path = tmp_path_factory.mktemp("wide") / "pipeline"
    pipe.save_pretrained(path)
    return path


def wide_recipe(tmp_path, pipeline_dir, **sections):
    teacher = {"dtype": "bfloat16", "height": 64, "width": 64, "num_frames": 21, "max_sequence_length": 16}
    train = {
        "max_steps": 1,
        "batch_size": 1,
        "gradient_accumulation_steps": 1,
        "checkpointing_steps": 1,
        "lr_warmup_steps": 0,
        "data_source": "prompts",
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "ema": False,
    }
    return write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        pipeline_dir,
        teacher=teacher,
        train=train,
        data={"vocabulary": "synth_data/vocab/toyworld.yaml"},
        **sections,
    )


def test_self_forcing_step_at_the_1_3b_width(tmp_path, wide_pipeline_dir):
    recipe = wide_recipe(
        tmp_path,
        wide_pipeline_dir,
        student={"kind": "causal", "frames_per_block": 3, "denoising_steps": [1000, 500]},
        method={"name": "self_forcing", "self_forcing": {"critic": "lora", "critic_lora_rank": 4}},
    )
    final = run_train(recipe)
    trained = load_file(str(final / "expert_0" / "diffusion_pytorch_model.safetensors"))
    init = load_file(str(wide_pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert trained["blocks.0.attn1.to_q.weight"].shape == (1536, 1536)
    assert float((trained["proj_out.weight"].float() - init["proj_out.weight"].float()).abs().max()) > 0


def test_lora_student_exports_at_the_1_3b_width(tmp_path, wide_pipeline_dir):
    from distill.config import load_recipe
    from distill.export_stage import export_stage

    recipe = wide_recipe(
        tmp_path,
        wide_pipeline_dir,
        student={"kind": "lora", "lora_rank": 4, "lora_alpha": 4.0, "denoising_steps": [1000, 500]},
        method={"name": "dmd", "dmd": {"critic": "lora", "critic_lora_rank": 4}},
        export={"formats": ["diffusers_lora", "comfyui_lora"]},
    )
    run_train(recipe)
    out = export_stage(load_recipe(recipe))
    comfy_file = out["comfyui_lora"]
    comfy = load_file(str(comfy_file))
    assert comfy["diffusion_model.blocks.1.self_attn.q.lora_down.weight"].shape == (4, 1536)
    assert comfy["diffusion_model.blocks.0.ffn.0.lora_up.weight"].shape == (8960, 4)
    assert len(comfy) == 2 * 10 * 3  # blocks x modules x (down, up, alpha)
    for folder, name in ((out["diffusers_lora"], None), (comfy_file.parent, comfy_file.name)):
        fresh = WanPipeline.from_pretrained(wide_pipeline_dir, torch_dtype=torch.bfloat16)
        fresh.load_lora_weights(folder, **({"weight_name": name} if name else {}))
        loaded = [n for n, _ in fresh.transformer.named_parameters() if ".lora_A." in n]
        assert len(loaded) == 2 * 10  # every adapted linear of both blocks
