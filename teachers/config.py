"""Teacher section of a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.wan_lora import LoraFile


@dataclass(kw_only=True)
class TeacherConfig:
    pretrained: str
    """A Hub id (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) or a local `WanPipeline` folder (with `model_index.json`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for reproducible downloads."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the transformer(s) and text encoder. The VAE always runs in float32, as Wan recommends."""
    offload: Literal["none", "model", "group"] = "none"
    """`model`: diffusers model CPU offload; `group`: diffusers group offload (block swap) of the transformer(s)."""
    quantize: Literal["none", "int8", "nf4"] = "none"
    """bitsandbytes quantization of the transformer(s) through diffusers' quantization config (needs a GPU)."""
    height: int = 480
    width: int = 832
    num_frames: int = 81
    """Pixel frames; Wan needs `num_frames - 1` divisible by the VAE's temporal factor (4)."""
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    """CFG in diffusers' convention: v = v_uncond + w·(v_cond - v_uncond); 1.0 disables guidance."""
    guidance_scale_2: float | None = None
    """CFG for the low-noise expert (`transformer_2`) of two-expert teachers; None uses guidance_scale."""
    shift: float = 3.0
    """Flow shift of the sampler: σ' = s·σ/(1+(s-1)·σ). Wan uses 3 at 480p, 5 at 720p."""
    max_sequence_length: int = 512
    """Text tokens fed to the text encoder (Wan: 512)."""
    negative_prompt: str | None = None
    """None uses the vocabulary's negative prompt."""
    cfg_batch: bool = True
    """Run the conditional and unconditional branches in one batched forward (faster, ~2x activation memory)."""
    lora: list[LoraFile] = field(default_factory=list)
    """LoRA files fused into the teacher's transformer(s) at load (distil from teacher + LoRA), in any Wan layout:
    ComfyUI / LightX2V / Kijai (`lora_down`/`lora_up`, `.alpha`, `.diff`, `.diff_b`) or diffusers / peft
    (`lora_A`/`lora_B`); each entry `{path, scale, experts}`. Every key must find its layer, or loading stops
    naming it."""
    encode_cache_size: int = 1024
    """Prompts whose text embeddings are kept (LRU, in CPU memory: ~4 MB each for Wan in bf16) so repeated
    prompts and the shared negative prompt are encoded once."""

    def __post_init__(self):
        if not self.pretrained:
            raise ValueError("pretrained: give a Hub id or a local WanPipeline folder")
        for key in ("height", "width", "num_frames", "num_inference_steps", "max_sequence_length", "encode_cache_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: must be >= 0, got {self.guidance_scale}")
        if self.lora and self.quantize != "none":
            raise ValueError(f"lora: cannot be fused into a {self.quantize}-quantized transformer; set quantize: none")
        if self.shift <= 0:
            raise ValueError(f"shift: must be > 0, got {self.shift}")
