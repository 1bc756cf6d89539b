"""DMD's critic role (the "fake score"), built from the teacher's transformer: a LoRA adapter on the teacher's
own module (no second copy of the weights) or a trainable full copy."""

from __future__ import annotations

import torch
from torch import nn

from distill.config import Recipe

CRITIC_ADAPTER = "critic"


class Critic(nn.Module):
    """DMD's critic (the "fake score"): `critic(x, t, encoder_hidden_states) -> v`, as a `Student` is called.

    `adapter` names the LoRA adapter on `transformer` (the teacher's own module) that is the critic; None means
    `transformer` is a trainable full copy. Either way it starts equal to the teacher.
    A LoRA critic activates its adapter for the call. Gradient checkpointing re-runs forwards in backward with
    whatever adapter is active THEN: so after a call without grad (inside generator_loss) the previous adapter is
    restored, for the student's pending backward; after a call with grad (critic_loss) the critic's stays active
    for its own backward (a LoRA student re-activates its adapter on its next call).
    """

    def __init__(self, transformer: nn.Module, adapter: str | None):
        super().__init__()
        self.transformer, self.adapter = transformer, adapter

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        from students.lora import active_adapter, set_active_adapter

        previous = None if self.adapter is None else active_adapter(self.transformer)
        if previous != self.adapter:
            set_active_adapter(self.transformer, self.adapter)
        dtype = self.transformer.dtype
        try:
            v = self.transformer(hidden_states=x.to(dtype), timestep=t,
                                 encoder_hidden_states=encoder_hidden_states.to(dtype), return_dict=False)[0]
        finally:
            if previous not in (None, self.adapter) and not torch.is_grad_enabled():
                set_active_adapter(self.transformer, previous)
        return v.to(x.dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        from students.lora import lora_parameters

        if self.adapter is None:
            return list(self.transformer.parameters())
        return lora_parameters(self.transformer, self.adapter)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        from students.lora import lora_state_dict

        if self.adapter is None:
            return self.transformer.state_dict()
        return lora_state_dict(self.transformer, self.adapter)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], where: str = "critic state") -> None:
        from students.lora import load_lora_state_dict

        if self.adapter is None:
            self.transformer.load_state_dict(state, strict=True)
        else:
            load_lora_state_dict(self.transformer, state, self.adapter, where)


class TrainableWeights:
    """`accelerator.register_for_checkpointing` target: a role's trainable weights only (custom_checkpoint_<i>)."""

    def __init__(self, role: Critic):
        self.role = role

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.role.trainable_state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.role.load_trainable_state_dict(state, "checkpoint critic weights")


def build_critic(recipe: Recipe, teacher) -> Critic:
    """The critic of `method.<dmd|self_forcing>.critic`, from the teacher's (high-noise) transformer.

    `lora`: adapter `critic` (rank = alpha = critic_lora_rank, on student.lora_target_modules) injected into the
    teacher's own module, so no second copy of the weights; teacher queries switch adapters off, the student
    and the critic each activate their own. Call it AFTER `accelerator.prepare(student)`: a LoRA student's DDP
    holds that module and must not see the critic's parameters. `full`: a trainable copy (Self-Forcing).
    """
    c, base = recipe.method.critic_config(), teacher.pipe.transformer
    if c.critic == "lora":
        from students.lora import add_lora

        add_lora(base, c.critic_lora_rank, float(c.critic_lora_rank), recipe.student.lora_target_modules,
                 CRITIC_ADAPTER)
        return Critic(base, CRITIC_ADAPTER)
    from students.pruned import prune_transformer

    return Critic(prune_transformer(base, None).requires_grad_(True), None)
