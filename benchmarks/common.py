"""Shared pieces of the benchmark scripts: the models they time, clocks and memory readings.

- `toy_teacher_dir`: the shipped toy teacher (teachers/toyworld/pipeline), else an UNTRAINED build of the same
  architecture (`teachers.toyworld.build`), for `--size tiny`.
- `wan21_pipeline`: a `WanPipeline` with the Wan2.1-T2V-1.3B transformer and the Wan2.1 VAE built from config with
  RANDOM weights (no download, no text encoder: the benchmarks feed random [B, 512, 4096] text embeddings), for
  `--size 1.3b`; `tiny_shape=True` shrinks it (same classes, a few layers, a small VAE) for a CPU smoke run.
- `Clock`: wall time with `torch.cuda.synchronize` around every reading on a GPU.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path

import torch

from distill.memory_plan import (  # noqa: F401  (the released configs)
    WAN21_13B_TRANSFORMER,
    WAN21_VAE,
    WAN22_TI2V_5B_TRANSFORMER,
    WAN22_VAE,
)

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TOY_TEACHER = ROOT / "teachers" / "toyworld" / "pipeline"

TINY_SHAPE_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2)
"""`--tiny-shape`: the 1.3B config with these keys replaced (text_dim 4096, 16 channels and patch kept)."""
TINY_SHAPE_VAE = dict(base_dim=8, num_res_blocks=1)
TINY_SHAPE_HW = (64, 64)
"""`--tiny-shape` pixel height, width (8x8 latents, 4x4 tokens per latent frame)."""
TEXT_LEN = 512
"""Wan's max_sequence_length: random text embeddings are [B, 512, text_dim]."""


def require_cuda(script: str, tiny_shape: bool, size: str = "1.3b") -> torch.device:
    """The device of a `--size 1.3b` / `5b` run: CUDA, or the CPU with `--tiny-shape`; otherwise exit with a clear
    message."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if tiny_shape:
        return torch.device("cpu")
    raise SystemExit(
        f"{script}: --size {size} needs a CUDA GPU (the real Wan shape in bf16 is hours on a CPU); "
        "run --size tiny here, or add --tiny-shape for a few-layer CPU smoke run of the same code path"
    )


def toy_teacher_dir(tmp: Path) -> tuple[Path, bool]:
    """(toy WanPipeline folder, trained?): the shipped teacher, else an untrained build written to tmp/init."""
    if (SHIPPED_TOY_TEACHER / "model_index.json").is_file():
        return SHIPPED_TOY_TEACHER, True
    from teachers.toyworld.build import main as build

    logger.warning("%s not found: timing an UNTRAINED toy teacher (same architecture)", SHIPPED_TOY_TEACHER)
    build([str(tmp / "init")])
    return tmp / "init", False


def wan21_pipeline(
    device: torch.device, dtype: torch.dtype, tiny_shape: bool = False, seed: int = 0, model: str = "1.3b"
):
    """A random-weight `WanPipeline` of the Wan2.1-T2V-1.3B shape (`model="5b"`: Wan2.2-TI2V-5B's, with the Wan2.2 VAE
    and `expand_timesteps`), transformer in `dtype`, VAE in float32 as `teachers.wan` runs it, without tokenizer or
    text encoder. Built on `device` (no CPU round trip)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    ti2v = model == "5b"
    tcfg = {**(WAN22_TI2V_5B_TRANSFORMER if ti2v else WAN21_13B_TRANSFORMER)}
    vcfg = {**(WAN22_VAE if ti2v else WAN21_VAE)}
    if tiny_shape:
        tcfg.update(TINY_SHAPE_TRANSFORMER)
        vcfg.update(TINY_SHAPE_VAE, **({"decoder_base_dim": 8} if ti2v else {}))
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = cast_like_from_pretrained(WanTransformer3DModel(**tcfg), dtype).eval()
        vae = AutoencoderKLWan(**vcfg).eval()
    # Wan's scheduler/scheduler_config.json (UniPC in flow mode; shift 3 for Wan2.1, 5 for TI2V-5B)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0 if ti2v else 3.0,
        num_train_timesteps=1000,
        solver_order=2,
        final_sigmas_type="zero",
    )
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler, expand_timesteps=ti2v
    )


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` in `dtype` except its `_keep_in_fp32_modules` (Wan: rope, time_embedder, scale_shift_table, norms),
    which stay float32, as `from_pretrained(..., torch_dtype=dtype)` loads the real checkpoint."""
    keep = model._keep_in_fp32_modules or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def random_text(batch: int, text_dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Random text embeddings [batch, 512, text_dim] float32 (UMT5-XXL's output shape for Wan)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_LEN, text_dim, generator=g).to(device)


class Clock:
    """`clock()` -> seconds (perf_counter), after `torch.cuda.synchronize()` on a CUDA device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sig(x: float, digits: int = 6) -> float:
    """x rounded to `digits` significant digits (for the JSON line; ratios are computed before rounding)."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None
