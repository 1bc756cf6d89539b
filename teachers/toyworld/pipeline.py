"""The toy world's teacher: a real diffusers `WanPipeline` with tiny, hand-set components.

- tokenizer: `teachers.tiny.word_tokenizer` (one id per word);
- text encoder: a real `UMT5EncoderModel` made into a pass-through, last_hidden_state =
  final_layer_norm(token embedding), with seeded random embeddings, so every word is a distinct,
  (near-)orthogonal vector;
- VAE: a real `AutoencoderKLWan` that is the identity map (no down/up-sampling, scale factors 1):
  latents are the pixels [B, 3, F, H, W] in [-1, 1], divided by `latents_std` by the pipeline's normalisation;
- transformer: `WanTransformer3DModel(**transformer_kwargs)` on 3 channels (trained by the `flow_matching` recipe);
- scheduler: `FlowMatchEulerDiscreteScheduler(shift=flow_shift)`.

The folder written by `save_toy_pipeline` loads with `WanPipeline.from_pretrained` and goes through the same
`teachers.wan.WanTeacher` code as Wan2.1.

Caveat: with `scale_factor_temporal = 1`, `WanPipeline.__call__(num_frames=n)` rounds n up to n + 1 (its
`num_frames % 1 != 1` check always fires); pass `latents=` (as `WanTeacher.sample` does) to fix the length.
The Wan VAE still encodes only 1 + 4k frames (it reads the first frame, then chunks of 4).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
)
from transformers import UMT5EncoderModel

from teachers.tiny import tiny_text_encoder, word_tokenizer

VAE_BASE_DIM = 8
"""VAE hidden channels: [x (3), -x (3), K (1), 0 (1)]."""
VAE_CONST = 1000.0
"""K, the constant channel that dominates the RMS norms: relative error of the identity ~ 3/K² (|x| <= 1)."""
VAE_LOGVAR = -30.0
"""Posterior log-variance (DiagonalGaussianDistribution's lower clamp): the posterior is a point mass."""


def toy_text_encoder(vocab_size: int, text_dim: int, seed: int) -> UMT5EncoderModel:
    """A 1-layer UMT5 whose output is final_layer_norm(token embedding).

    Why: a frozen *random* UMT5 mixes the tokens of a prompt into near-identical vectors, and prototypes
    trained on it reached ~1% attribute accuracy. Zeroing the attention output `o` and the FFN output `wo`
    leaves only the residual stream, i.e. each token's own embedding (RMS-normalised), which the
    transformer's cross-attention can read word by word. Embeddings are seeded N(0, 1) rows (cosine
    ~ ±1/√d between words), made exactly orthogonal when the vocabulary fits in `text_dim`.
    """
    with torch.random.fork_rng(devices=[]):
        model = tiny_text_encoder(vocab_size, d_model=text_dim, num_layers=1, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = torch.randn(vocab_size, text_dim, generator=gen)
        if vocab_size <= text_dim:  # room for exactly orthogonal words: orthonormalise, keep N(0, 1)'s norm √d
            emb = torch.linalg.qr(emb.T).Q.T * text_dim**0.5
        model.shared.weight.copy_(emb)
        for block in model.encoder.block:
            block.layer[0].SelfAttention.o.weight.zero_()
            block.layer[1].DenseReluDense.wo.weight.zero_()
        model.encoder.final_layer_norm.weight.fill_(1.0)
    return model.eval()


def _set_conv(conv: WanCausalConv3d, pairs: list[tuple[int, int, float]], bias: dict[int, float] | None = None):
    """Weights that read only the current frame and pixel: out[o] += w·in[i] for (o, i, w) in pairs.

    A WanCausalConv3d pads 2·p frames on the left only, so the current frame is the *last* temporal tap;
    the spatial padding is symmetric, so the current pixel is the spatial centre.
    """
    kt, kh, kw = conv.kernel_size
    conv.weight.zero_()
    conv.bias.zero_()
    for o, i, w in pairs:
        conv.weight[o, i, kt - 1, kh // 2, kw // 2] = w
    for o, b in (bias or {}).items():
        conv.bias[o] = b


def _set_head(norm, conv_out: WanCausalConv3d, outputs: int) -> None:
    """norm_out -> SiLU -> conv_out returns x from [x, -x, K, 0]: silu(a) - silu(-a) = a.

    The RMS norm gives h·sqrt(C)·γ/‖h‖ with ‖h‖ ≈ K, so γ = K/sqrt(C) on the ±x channels undoes it.
    """
    norm.gamma.zero_()
    norm.gamma[:6] = VAE_CONST / norm.scale
    _set_conv(conv_out, [(c, c, 1.0) for c in range(outputs)] + [(c, 3 + c, -1.0) for c in range(outputs)])


def identity_vae(latents_std: float = 0.5, seed: int = 0) -> AutoencoderKLWan:
    """A Wan VAE whose encode (posterior mode) and decode are the identity on [-1, 1] videos of 1 + 4k frames."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=VAE_BASE_DIM,
            z_dim=3,
            dim_mult=[1],
            num_res_blocks=0,
            temperal_downsample=[],
            latents_mean=[0.0] * 3,
            latents_std=[latents_std] * 3,
            scale_factor_temporal=1,
            scale_factor_spatial=1,
        )
    into = [(c, c, 1.0) for c in range(3)] + [(3 + c, c, -1.0) for c in range(3)]  # [x, -x, K, 0]
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, WanResample):
                raise AssertionError("identity_vae: unexpected resampling layer")
            if isinstance(module, WanResidualBlock):  # residual branch off: block(x) = x
                assert isinstance(module.conv_shortcut, torch.nn.Identity)
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            if isinstance(module, WanAttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
        for coder in (vae.encoder, vae.decoder):
            _set_conv(coder.conv_in, into, bias={6: VAE_CONST})
        # encoder's conv_out has z_dim·2 outputs: mean = x, logvar = a very negative constant
        _set_head(vae.encoder.norm_out, vae.encoder.conv_out, outputs=3)
        vae.encoder.conv_out.bias[3:6] = VAE_LOGVAR
        _set_head(vae.decoder.norm_out, vae.decoder.conv_out, outputs=3)
        _set_conv(vae.quant_conv, [(c, c, 1.0) for c in range(6)])
        _set_conv(vae.post_quant_conv, [(c, c, 1.0) for c in range(3)])
    return vae.eval()


def build_toy_pipeline(
    words: list[str],
    *,
    transformer_kwargs: dict,
    text_dim: int = 32,
    seed: int = 0,
    latents_std: float = 0.5,
    flow_shift: float = 3.0,
) -> WanPipeline:
    """The toy world's teacher pipeline (transformer randomly initialised from `seed`; train it afterwards).

    `transformer_kwargs` are `WanTransformer3DModel` arguments; in/out_channels (3) and text_dim are set here.
    """
    fixed = {"in_channels": 3, "out_channels": 3, "text_dim": text_dim}
    for key, value in fixed.items():
        if key in transformer_kwargs and transformer_kwargs[key] != value:
            raise ValueError(f"transformer_kwargs.{key}: the toy world needs {value}, got {transformer_kwargs[key]}")
    tokenizer = word_tokenizer(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**{**transformer_kwargs, **fixed}).eval()
        text_encoder = toy_text_encoder(len(tokenizer), text_dim, seed)
        vae = identity_vae(latents_std, seed)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=flow_shift),
    )


def save_toy_pipeline(pipe: WanPipeline, path: str | Path) -> Path:
    """Write a `WanPipeline.from_pretrained`-loadable folder."""
    path = Path(path)
    pipe.save_pretrained(path)
    return path
