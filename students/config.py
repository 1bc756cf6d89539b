"""Student section of a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.wan_lora import LoraFile

LORA_TARGETS = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
]


@dataclass(frozen=True)
class StudentKind:
    """What a student kind is made of. Code that depends on the kind reads these flags, never the kind's name, so a
    new combination is one line in `KINDS`."""

    adapters: bool
    """peft LoRA adapters on the teacher's (shared) transformer; else one trainable transformer copy per expert."""
    prunes: bool = False
    """Copies only the teacher blocks `keep_blocks` names (BK-SDM style)."""
    causal: bool = False
    """Block-causal attention with a KV cache: samples chunk by chunk and streams (a single expert)."""


KINDS: dict[str, StudentKind] = {
    "lora": StudentKind(adapters=True),
    "pruned": StudentKind(adapters=False, prunes=True),
    "full": StudentKind(adapters=False),
    "causal": StudentKind(adapters=False, causal=True),
}
"""The student kinds, `student.kind` -> what it is made of."""


@dataclass(kw_only=True)
class StudentConfig:
    name: str
    """Folder name under `<output_dir>/students/`; also the key in the eval report."""
    kind: Literal[tuple(KINDS)]  # type: ignore[valid-type]
    """`lora`: peft adapter on the teacher's transformer; `pruned`: a copy with `keep_blocks` only;
    `full`: a full copy fine-tuned; `causal`: block-causal Wan with a KV cache."""
    init: str | None = None
    """A `WanTransformer3DModel` folder to start from; None copies the teacher's (high-noise) transformer."""
    init_lora: list[LoraFile] = field(default_factory=list)
    """LoRA files to start from (e.g. a 4-step LightX2V LoRA), each `{path, scale, experts}`, any Wan layout:
    fused into a full / pruned / causal student's weights (a pruned one takes its kept blocks' share), or loaded
    as a `lora` student's adapters (same rank; `.diff` keys are refused there). Every key must find its layer."""
    keep_blocks: list[int] | None = None
    """Pruned students: teacher block indices to copy, in order (BK-SDM style). None keeps all."""
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """peft target modules (suffixes inside each Wan block)."""
    experts: int = 1
    """Timestep experts: one LoRA / pruned student per σ interval; 1 means a single student."""
    expert_boundaries: list[float] = field(default_factory=list)
    """σ boundaries between experts, descending, `experts - 1` values in (0, 1); expert 0 serves σ above the
    first boundary (high noise), as Wan2.2's `transformer` does above `boundary_ratio`."""
    denoising_steps: list[int] = field(default_factory=list)
    """Few-step students: explicit timesteps, e.g. [1000, 750, 500, 250]. Empty: the teacher's sampler."""
    warp_denoising_steps: bool = True
    """Warp `denoising_steps` through the teacher's shift (Self-Forcing's warp_denoising_step)."""
    guidance_scale: float = 1.0
    """CFG used when sampling the student (1.0: none, the usual for distilled few-step students)."""
    num_inference_steps: int | None = None
    """Multi-step students without `denoising_steps`: sampler steps (None: the teacher's)."""
    frames_per_block: int = 3
    """Causal students: latent frames per chunk (the block-causal mask's block and the rollout's step);
    a multiple of the transformer's temporal patch size p_t."""
    independent_first_frame: bool = False
    """Causal students: the first latent frame is a chunk of its own, then chunks of `frames_per_block` (CausVid's
    `independent_first_frame`). Wan's VAE encodes the first frame alone (1 + 4k pixel frames), so that chunk is one
    image: given clean, the stream is image-to-video (Wan2.2 TI2V: 1 + 3k latent frames, e.g. 31 at 121 frames).
    Needs temporal patch 1."""
    local_window: int | None = None
    """Causal students: latent frames of self-attention context a chunk sees, its own frames and the `sink`
    included (the KV cache holds at most this many); None = all earlier frames. A multiple of p_t."""
    sink: int = 0
    """Causal students: latent frames at the start of the video that stay visible (never evicted from the
    cache) when `local_window` is set. A multiple of p_t."""
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    """Causal students' parallel (training) forward: `flex` runs flex_attention with a block mask (O((S/128)²)
    integers), `sdpa` scaled_dot_product_attention with a dense [S, S] mask (1.07 GB at 480×832×81); `auto`: flex
    on CUDA, sdpa elsewhere (flex_attention has no backward on CPU). Both compute the same attention."""
    context_noise: int = 0
    """Causal students: timestep t in [0, 1000] (σ = t/1000) at which each finished chunk is re-run to write
    the KV cache (Self-Forcing's context_noise; 0 = the clean output)."""

    @property
    def spec(self) -> StudentKind:
        """What this kind of student is made of (`KINDS`)."""
        return KINDS[self.kind]

    def __post_init__(self):
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ValueError(f"name: must be a plain folder name, got {self.name!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank: must be >= 1, got {self.lora_rank}")
        if self.experts < 1:
            raise ValueError(f"experts: must be >= 1, got {self.experts}")
        b = self.expert_boundaries
        if len(b) != self.experts - 1:
            raise ValueError(f"expert_boundaries: {self.experts} experts need {self.experts - 1} boundaries, got {b}")
        if any(not 0.0 < x < 1.0 for x in b) or sorted(b, reverse=True) != b or len(set(b)) != len(b):
            raise ValueError(f"expert_boundaries: must be strictly descending values in (0, 1), got {b}")
        if any(not 0 < t <= 1000 for t in self.denoising_steps):
            raise ValueError(f"denoising_steps: timesteps must lie in (0, 1000], got {self.denoising_steps}")
        if sorted(self.denoising_steps, reverse=True) != self.denoising_steps:
            raise ValueError(f"denoising_steps: must be descending, got {self.denoising_steps}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {self.lora_alpha}")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules: must name at least one module suffix, e.g. attn1.to_q")
        if self.keep_blocks is not None and not self.spec.prunes:
            pruning = ", ".join(n for n, k in KINDS.items() if k.prunes)
            raise ValueError(f"keep_blocks: only used by kind={pruning}, got kind={self.kind}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: must be >= 1 or null, got {self.num_inference_steps}")
        if self.frames_per_block < 1:
            raise ValueError(f"frames_per_block: must be >= 1, got {self.frames_per_block}")
        if self.sink < 0:
            raise ValueError(f"sink: must be >= 0, got {self.sink}")
        if self.sink and self.local_window is None:
            raise ValueError(f"sink: {self.sink} needs a local_window (without one every frame stays visible)")
        if self.local_window is not None and self.local_window < self.frames_per_block + self.sink:
            raise ValueError(
                f"local_window: must be >= frames_per_block + sink = {self.frames_per_block + self.sink} so a chunk "
                f"sees itself and the sink, got {self.local_window}"
            )
        if not 0 <= self.context_noise <= 1000:
            raise ValueError(f"context_noise: must be a timestep in [0, 1000], got {self.context_noise}")
        if self.spec.causal and self.experts != 1:
            raise ValueError(f"experts: kind={self.kind} supports a single expert (causal), got {self.experts}")
        if self.keep_blocks is not None and (not self.keep_blocks or min(self.keep_blocks) < 0):
            raise ValueError(f"keep_blocks: must be a non-empty list of block indices >= 0, got {self.keep_blocks}")
