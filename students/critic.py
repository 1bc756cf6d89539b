"""DMD's critic role (the "fake score"), built from the teacher's transformer: a LoRA adapter on the teacher's
own module (no second copy of the weights) or a trainable full copy; optionally with DMD2's GAN classifier head on
one of its blocks."""

from __future__ import annotations

import torch
from torch import nn

from core.lora import (
    active_adapter,
    add_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    set_active_adapter,
)
from students.pruned import prune_transformer

CRITIC_ADAPTER = "critic"
GAN_HEAD_PREFIX = "gan_head."
"""Keys of the GAN head in the critic's trainable state dict (checkpoints)."""


class GANHead(nn.Module):
    """DMD2's classifier on the fake score's features (Yin et al. 2024, §4.3): per-token logits [B, S] from one
    transformer block's hidden states [B, S, D] (a patch discriminator: every token votes real or fake)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(hidden.float()))))[..., 0]


class Critic(nn.Module):
    """DMD's critic (the "fake score"): `critic(x, t, encoder_hidden_states) -> v`, as a `Student` is called.

    `adapter` names the LoRA adapter on `transformer` (the teacher's own module) that is the critic; None means
    `transformer` is a trainable full copy. Either way it starts equal to the teacher.
    A LoRA critic activates its adapter for the call. Gradient checkpointing re-runs forwards in backward with
    whatever adapter is active THEN: so after a call without grad (inside generator_loss) the previous adapter is
    restored, for the student's pending backward; after a call with grad (critic_loss) the critic's stays active
    for its own backward (a LoRA student re-activates its adapter on its next call).
    """

    def __init__(self, transformer: nn.Module, adapter: str | None, gan_layer: int | None = None):
        """`gan_layer`: None, or the block whose output feeds a new `GANHead` (`forward(..., return_logits=True)`)."""
        super().__init__()
        self.transformer, self.adapter = transformer, adapter
        self.gan_layer, self.gan_head = gan_layer, None
        if gan_layer is not None:
            blocks = len(transformer.blocks)
            if not 0 <= gan_layer < blocks:
                raise ValueError(f"gan_layer: the critic has blocks 0..{blocks - 1}, got {gan_layer}")
            self.gan_head = GANHead(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
            self.gan_head.to(transformer.device)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, return_logits: bool = False
    ):
        """v [like x]; with `return_logits`, (v, the GAN head's per-token logits [B, S] float32)."""
        if return_logits and self.gan_head is None:
            raise ValueError("Critic: return_logits needs a GAN head (method.<dmd|self_forcing>.gan_weight > 0)")
        previous = None if self.adapter is None else active_adapter(self.transformer)
        if previous != self.adapter:
            set_active_adapter(self.transformer, self.adapter)
        dtype, features = self.transformer.dtype, []
        hook = None
        if return_logits:  # a forward hook reads the block's output, so the diffusers forward runs unchanged
            hook = self.transformer.blocks[self.gan_layer].register_forward_hook(
                lambda module, args, out: features.append(out[0] if isinstance(out, tuple) else out)
            )
        try:
            v = self.transformer(
                hidden_states=x.to(dtype),
                timestep=t,
                encoder_hidden_states=encoder_hidden_states.to(dtype),
                return_dict=False,
            )[0]
        finally:
            if hook is not None:
                hook.remove()
            if previous not in (None, self.adapter) and not torch.is_grad_enabled():
                set_active_adapter(self.transformer, previous)
        if not return_logits:
            return v.to(x.dtype)
        return v.to(x.dtype), self.gan_head(features[0])

    def trainable_parameters(self) -> list[nn.Parameter]:
        head = [] if self.gan_head is None else list(self.gan_head.parameters())
        if self.adapter is None:
            return list(self.transformer.parameters()) + head
        return lora_parameters(self.transformer, self.adapter) + head

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = (
            self.transformer.state_dict() if self.adapter is None else lora_state_dict(self.transformer, self.adapter)
        )
        if self.gan_head is not None:
            state = {**state, **{GAN_HEAD_PREFIX + k: v for k, v in self.gan_head.state_dict().items()}}
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], where: str = "critic state") -> None:
        head = {k[len(GAN_HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(GAN_HEAD_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(GAN_HEAD_PREFIX)}
        if (self.gan_head is None) != (not head):
            raise ValueError(
                f"{where}: the checkpoint {'has' if head else 'lacks'} a GAN head and this recipe's "
                f"critic {'lacks' if self.gan_head is None else 'has'} one (gan_weight); resume with "
                "the recipe that wrote it"
            )
        if self.gan_head is not None:
            self.gan_head.load_state_dict(head, strict=True)
        if self.adapter is None:
            self.transformer.load_state_dict(state, strict=True)
        else:
            load_lora_state_dict(self.transformer, state, self.adapter, where)


def build_critic(
    transformer,
    kind: str,
    *,
    lora_rank: int,
    target_modules: list[str],
    gan_layer: int | None,
    gradient_checkpointing: bool,
    key: str,
) -> Critic:
    """The critic of kind `kind` (`lora` or `full`) from the teacher's (high-noise) transformer; `key` is the recipe
    section it comes from (e.g. `method.dmd`), named in errors.

    `lora`: adapter `critic` (rank = alpha = lora_rank, on `target_modules`, the student's) injected into the
    teacher's own module, so no second copy of the weights; teacher queries switch adapters off, the student
    and the critic each activate their own. Call it AFTER `accelerator.prepare(student)`: a LoRA student's DDP
    holds that module and must not see the critic's parameters. `full`: a trainable copy (Self-Forcing).
    `gan_layer`: the block whose output feeds DMD2's GAN head; None: no head.
    """
    if gan_layer is not None and kind == "lora" and gradient_checkpointing:
        # the GAN term backpropagates through the critic inside the generator's loss, so the critic's adapter is
        # active when the student's checkpointed blocks re-run: they would recompute with the wrong adapter
        raise ValueError(
            f"{key}.gan_weight: a GAN head on a `critic: lora` can't train with "
            "train.gradient_checkpointing; use `critic: full` or turn checkpointing off"
        )
    if kind == "lora":
        add_lora(transformer, lora_rank, float(lora_rank), target_modules, CRITIC_ADAPTER)
        return Critic(transformer, CRITIC_ADAPTER, gan_layer)
    return Critic(prune_transformer(transformer, None).requires_grad_(True), None, gan_layer)
