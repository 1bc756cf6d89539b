"""Tiny Wan components built from config: a word-level tokenizer, a small UMT5 text encoder, VAE and
transformer. Tests build random ones; the toy world builds its teacher from the same functions.

Nothing here downloads: the tokenizer is a `tokenizers` WordLevel model over a given word list, saved as
a `PreTrainedTokenizerFast`, so `WanPipeline.from_pretrained` loads it like Wan's own UMT5 tokenizer.
"""

from __future__ import annotations

import re

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def words_of(texts: list[str]) -> list[str]:
    """Sorted unique lowercase words (the tokenizer's vocabulary) of some texts."""
    return sorted({w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())})


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: pad=0, eos=1, unk=2, then one id per word. Appends </s> like T5."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    from tokenizers import normalizers, processors

    tok.normalizer = normalizers.Lowercase()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_text_encoder(
    vocab_size: int, d_model: int = 32, num_layers: int = 1, num_heads: int = 2, d_ff: int = 64, seed: int = 0
) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    return UMT5EncoderModel(cfg).eval()


def tiny_vae(z_dim: int = 4, base_dim: int = 3, seed: int = 0, wan22: bool = False) -> AutoencoderKLWan:
    """A random Wan VAE with the real 4x temporal / 8x spatial compression (like diffusers' tests); `wan22`: the
    Wan2.2 VAE's layout (the TI2V-5B's: residual blocks, 2x2 pixel patchify in front of the encoder, 16x spatial)."""
    torch.manual_seed(seed)
    wan22_layout = dict(
        decoder_base_dim=base_dim,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
    )
    return AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        **(wan22_layout if wan22 else {}),
    ).eval()


def tiny_transformer(
    in_channels: int = 4,
    text_dim: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 12,
    ffn_dim: int = 32,
    patch_size=(1, 2, 2),
    seed: int = 0,
    **kwargs,
) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=tuple(patch_size),
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
        **kwargs,
    ).eval()


def tiny_pipeline(
    words: list[str],
    num_layers: int = 2,
    two_experts: bool = False,
    seed: int = 0,
    flow_shift: float = 3.0,
    ti2v: bool = False,
) -> WanPipeline:
    """A random tiny `WanPipeline`: Wan2.1's layout; with `two_experts`, Wan2.2 A14B's (`transformer_2`,
    boundary_ratio=0.875); with `ti2v`, Wan2.2 TI2V-5B's (its 48-channel VAE, `expand_timesteps`)."""
    if ti2v and two_experts:
        raise ValueError("tiny_pipeline: TI2V is one expert; pass ti2v or two_experts, not both")
    tokenizer = word_tokenizer(words)
    text_encoder = tiny_text_encoder(len(tokenizer), seed=seed)
    vae = tiny_vae(z_dim=48, base_dim=8, seed=seed, wan22=True) if ti2v else tiny_vae(seed=seed)
    transformer = tiny_transformer(in_channels=vae.config.z_dim, num_layers=num_layers, seed=seed)
    transformer_2 = tiny_transformer(num_layers=num_layers, seed=seed + 1) if two_experts else None
    if ti2v:  # the TI2V-5B folder's scheduler: UniPC in flow mode
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
        transformer_2=transformer_2,
        boundary_ratio=0.875 if two_experts else None,
        expand_timesteps=ti2v,
    )
