"""Knowledge distillation from a frozen teacher: output KD, feature KD and data KD in one weighted loss.

On one noisy point x_σ = (1-σ)·x0 + σ·ε (x0: the batch's clean latents, e.g. the teacher's stored samples):

    L_out  = ‖ v_S(x_σ, t, c) - v_T^w(x_σ, t, c) ‖²                    (Hinton et al. 2015 on the velocity;
                                                                      v_T^w = v_u + w·(v_c - v_u), teacher CFG)
    L_feat = 1/|M| Σ_{(i→j)∈M} ‖ h_S^i - h_T^j ‖²                     (FitNets, Romero et al. 2015; BK-SDM's
                                                                      feature KD with M = method.kd.layer_map)
    L_data = ‖ v_S(x_σ, t, c) - (ε - x0) ‖²                           (flow matching on the teacher's samples)
    L      = output_weight·L_out + feature_weight·L_feat + data_weight·L_data

h^i is the output of transformer block i ([B, N, D] tokens), collected with forward hooks. The student is
called once and the teacher once (twice with CFG when features are collected: the features come from the
conditional branch).

Image-to-video data (`Batch.given_frames` = 1, a TI2V teacher's dataset): the image's frame stays clean at σ = 0
(per-frame σ: Wan's per-token timesteps for both models) and out of L_out and L_data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.flow import add_noise, cfg, timestep, velocity_target
from core.lora import adapters_disabled
from distill.batch import Batch, given_frame_sigmas, unconditional
from distill.flow_matching import Model, draw_sigma_noise


def output_kd_loss(v_student: torch.Tensor, v_teacher: torch.Tensor) -> torch.Tensor:
    """L_out = mean ‖v_S - v_T‖² over all elements; both [B, C, F, H, W]. float32 scalar."""
    return F.mse_loss(v_student.float(), v_teacher.float())


def feature_kd_loss(
    student_features: dict[int, torch.Tensor], teacher_features: dict[int, torch.Tensor], layer_map: dict[int, int]
) -> torch.Tensor:
    """L_feat = mean over the map of mean ‖h_S^i - h_T^j‖²; features [B, N, D] keyed by block index."""
    losses = []
    for i, j in layer_map.items():
        hs, ht = student_features[i], teacher_features[j]
        if hs.shape != ht.shape:
            raise ValueError(
                f"method.kd.layer_map: student block {i} outputs {tuple(hs.shape)} but teacher block {j} outputs "
                f"{tuple(ht.shape)}; feature KD needs blocks of the same width"
            )
        losses.append(F.mse_loss(hs.float(), ht.float()))
    return torch.stack(losses).mean()


@contextmanager
def block_outputs(blocks: nn.ModuleList, indices: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the outputs of `blocks[i]` for i in `indices` while the context is open (forward hooks).

    Hooks are removed on exit, so a LoRA student sharing its blocks with the teacher can be hooked for one
    forward and the teacher for the next.
    """
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i in indices:

        def hook(_module, _args, output, i=i):
            out[i] = output[0] if isinstance(output, tuple) else output

        handles.append(blocks[i].register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def check_layer_map(layer_map: dict[int, int], n_student: int, n_teacher: int) -> None:
    for i, j in layer_map.items():
        if not 0 <= i < n_student:
            raise ValueError(
                f"method.kd.layer_map: student block {i} does not exist; the student has "
                f"{n_student} blocks (0..{n_student - 1})"
            )
        if not 0 <= j < n_teacher:
            raise ValueError(
                f"method.kd.layer_map: teacher block {j} (for student block {i}) does not exist; the "
                f"teacher has {n_teacher} blocks (0..{n_teacher - 1})"
            )


@contextmanager
def frozen_teacher(teacher) -> Iterator[None]:
    """LoRA adapters off on the teacher's transformers while it is queried: a LoRA student injected into the
    teacher's own module (shared base) must not leak into the teacher's answers. A no-op without adapters."""
    with ExitStack() as stack:
        for model in (teacher.pipe.transformer, teacher.pipe.transformer_2):
            if model is not None:
                stack.enter_context(adapters_disabled(model))
        yield


def teacher_velocity(teacher, x: torch.Tensor, t: torch.Tensor, cond, guidance: float | None) -> torch.Tensor:
    """`teacher.velocity` (adapters off) for a batch whose timesteps may straddle a two-expert boundary."""
    with frozen_teacher(teacher):
        if teacher.boundary is None:
            return teacher.velocity(x, t, cond, guidance)
        high = t >= teacher.boundary
        v = torch.empty_like(x, dtype=torch.float32)
        for mask in (high, ~high):
            if bool(mask.any()):
                idx = mask.nonzero().flatten()
                v[idx] = teacher.velocity(x[idx], t[idx], cond[idx], guidance)
        return v


class KD:
    """Output / feature / data KD of a student against a frozen teacher (see the module docstring)."""

    @dataclass(kw_only=True)
    class Config:
        output_weight: float = 1.0
        """Weight of L_out (student velocity vs the teacher's guided velocity)."""
        feature_weight: float = 0.0
        """Weight of L_feat (block outputs mapped by `layer_map`)."""
        data_weight: float = 0.0
        """Weight of L_data (flow matching on the batch's clean latents)."""
        layer_map: dict[int, int] = field(default_factory=dict)
        """Student block index -> teacher block index for feature KD, e.g. {0: 0, 1: 3} (pruned [0, 3])."""
        guidance_scale: float | None = None
        """Teacher CFG w for L_out (diffusers' convention, 1 = none); None uses `teacher.guidance_scale`."""
        shift: float | None = None
        """σ shift for training noise levels; None uses `teacher.shift`."""
        weighting: Literal["uniform", "logit_normal"] = "uniform"

        def __post_init__(self):
            for key in ("output_weight", "feature_weight", "data_weight"):
                if getattr(self, key) < 0:
                    raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
            if self.output_weight == self.feature_weight == self.data_weight == 0:
                raise ValueError("output_weight: all three KD weights are 0; give at least one a positive weight")
            if self.feature_weight > 0 and not self.layer_map:
                raise ValueError("layer_map: feature_weight > 0 needs a student->teacher block map, e.g. {0: 0, 1: 3}")
            if self.layer_map and self.feature_weight == 0:
                raise ValueError(
                    "feature_weight: layer_map is set but feature_weight is 0; set a weight or drop the map"
                )
            if self.shift is not None and self.shift <= 0:
                raise ValueError(f"shift: must be > 0 or null, got {self.shift}")

    two_player = False
    """Trains a critic beside the student (`generator_loss` / `critic_loss`) instead of one `loss`."""
    needs_trajectory = False
    """Reads the teacher's stored ODE states (the dataset's `trajectory` column)."""
    data_free = False
    """Can train from captions alone (`train.data_source: prompts`)."""
    queries_teacher = True
    """Runs the teacher in its loss while the student's graph is alive (the memory plan counts that forward)."""
    student_kinds = None
    """The student kinds it trains; None: every kind."""

    @classmethod
    def from_recipe(cls, recipe, *, teacher, student, unwrapped, critic=None, num_processes: int = 1) -> KD:
        blocks = unwrapped.transformers()[0].blocks if unwrapped.num_experts == 1 else None
        return cls(recipe.method.kd, student=student, teacher=teacher, student_blocks=blocks)

    def __init__(self, config: KD.Config, *, student: Model, teacher, student_blocks: nn.ModuleList | None = None):
        """`student` is called as a `Model`; `student_blocks` (its transformer's `.blocks`) for feature KD."""
        self.config, self.student, self.teacher = config, student, teacher
        self.shift = teacher.cfg.shift if config.shift is None else config.shift
        self.guidance = teacher.cfg.guidance_scale if config.guidance_scale is None else config.guidance_scale
        self.student_blocks = student_blocks
        if config.feature_weight > 0:
            if student_blocks is None:
                raise ValueError(
                    "method.kd.feature_weight: feature KD needs a single-expert student "
                    "(student.experts: 1); set feature_weight: 0"
                )
            if teacher.boundary is not None:
                raise ValueError(
                    "method.kd.feature_weight: feature KD supports single-expert teachers only "
                    "(this one has transformer_2); set feature_weight: 0"
                )
            check_layer_map(config.layer_map, len(student_blocks), len(teacher.pipe.transformer.blocks))

    def _teacher(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Guided teacher velocity, plus the conditional branch's mapped block outputs for feature KD."""
        c = self.config
        if c.feature_weight == 0:
            return teacher_velocity(self.teacher, x_t, t, cond, self.guidance), {}
        blocks = self.teacher.pipe.transformer.blocks
        with frozen_teacher(self.teacher), block_outputs(blocks, sorted(set(c.layer_map.values()))) as feats:
            v_cond = self.teacher.velocity(x_t, t, cond, guidance=1.0)
        if self.guidance == 1.0 or cond.negative_embeds is None:
            return v_cond, feats
        with frozen_teacher(self.teacher):
            v_uncond = self.teacher.velocity(x_t, t, unconditional(cond), guidance=1.0)
        return cfg(v_uncond, v_cond, self.guidance), feats

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        # 1. draw σ and ε per sample and build the shared noisy point x_σ
        sigma, noise = draw_sigma_noise(batch.generators, batch.x0, self.shift, c.weighting)
        g = batch.given_frames  # an image-to-video dataset's image: clean at t = 0, out of the output / data terms
        sigma = given_frame_sigmas(sigma, batch.x0.shape[2], g)
        x_t, t = add_noise(batch.x0, noise, sigma), timestep(sigma)
        # 2. student forward (with its mapped block outputs)
        student_idx = sorted(c.layer_map) if c.feature_weight > 0 else []
        blocks = self.student_blocks if student_idx else nn.ModuleList()
        with block_outputs(blocks, student_idx) as student_feats:
            v_s = self.student(x_t, t, batch.cond.prompt_embeds)
        # 3. teacher forward (frozen, no grad, with CFG)
        logs: dict[str, torch.Tensor] = {}
        loss = v_s.new_zeros((), dtype=torch.float32)
        if c.output_weight > 0 or c.feature_weight > 0:
            v_t, teacher_feats = self._teacher(x_t, t, batch.cond)
        # 4. the weighted sum of the three terms
        if c.output_weight > 0:
            logs["loss/kd_output"] = output_kd_loss(v_s[:, :, g:], v_t[:, :, g:])
            loss = loss + c.output_weight * logs["loss/kd_output"]
        if c.feature_weight > 0:
            logs["loss/kd_feature"] = feature_kd_loss(student_feats, teacher_feats, c.layer_map)
            loss = loss + c.feature_weight * logs["loss/kd_feature"]
        if c.data_weight > 0:
            target = velocity_target(batch.x0, noise)[:, :, g:]
            logs["loss/kd_data"] = F.mse_loss(v_s[:, :, g:].float(), target.float())
            loss = loss + c.data_weight * logs["loss/kd_data"]
        logs = {k: v.detach() for k, v in logs.items()}
        logs["loss"] = loss.detach()
        return loss, logs


__all__ = ["KD", "output_kd_loss", "feature_kd_loss", "block_outputs", "check_layer_map", "teacher_velocity"]
