"""FSDP (`train.sharding: fsdp`): the training roles sharded over the processes with FSDP2, and their checkpoints.

    shard_roles(teacher, student, critic, device)   # after the roles are built and cast, before their optimizers
    save_checkpoint(path, roles, main=...)           # every rank calls: full (gathered) tensors, written by rank 0
    load_checkpoint(path, roles)                     # every rank reads the same files and keeps its shards

What is sharded (each Wan block is one FSDP unit: its weights are gathered for its forward and backward only):
- the teacher's transformers (every block, then the rest of each: `WanTeacher` calls the transformer's forward),
  frozen, without optimizer state; a LoRA student's and a LoRA critic's adapters live in these modules and are
  sharded with them;
- a full / pruned / causal student: every block of every expert, then the `Student` itself (one unit for the
  embeddings, head and modulation tables: the causal view calls those sub-modules inside `Student.forward`, not
  through the transformer's forward), with its optimizer state (AdamW's moments are created on the shards);
- a full critic: every block, then its transformer; a GAN head as its own unit.
Gradients are reduce-scattered (averaged over ranks, as DDP's all-reduce) in backward; the optimizers step on the
shards; gradient clipping takes the global norm over all shards.

Checkpoints are gathered: every tensor is assembled on rank 0 and written as one safetensors file per role (the
same bytes whatever the world size), nothing pickled; every rank reads them on resume and keeps its shard, so the
checkpoint folder must be on a filesystem all nodes see. `final/` is the same `Student.save_pretrained` folder as
without sharding. Host memory: rank 0 holds one role's full state at a time while writing.

Why torch's `fully_shard` rather than accelerate's FSDP plugin: accelerate turns FSDP on for GPU backends only (a CPU
run with the plugin stays plain data-parallel, so nothing could test it here), and it shards the one model `prepare`
sees; here three roles are sharded differently (the teacher without optimizer), with the same code on gloo and NCCL.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from core.files import load_safetensors

logger = logging.getLogger(__name__)

STUDENT_FILE, CRITIC_FILE = "student_fsdp.safetensors", "critic_fsdp.safetensors"
OPTIMIZER_FILES = ("optimizer_fsdp", "optimizer_1_fsdp")
"""Stems of the student's and the critic's optimizer state: `<stem>.safetensors` (tensors) + `<stem>.json`."""
SCHEDULER_FILES = ("scheduler.json", "scheduler_1.json")
EMA_FILES = ("ema.safetensors", "ema.json")
RNG_FILE = "rng_{rank}.safetensors"


def _blocks_then(module: nn.Module, blocks: nn.ModuleList, mesh) -> None:
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def shard_roles(teacher, student, critic, device: torch.device) -> None:
    """Shard the roles in place (see the module docstring). Call after every trainable weight is in its training
    dtype, before building optimizers and EMA (they must hold the sharded parameters)."""
    if not dist.is_initialized():
        raise ValueError("train.sharding: fsdp needs several processes (accelerate launch --num_processes N)")
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for transformer in (teacher.pipe.transformer, getattr(teacher.pipe, "transformer_2", None)):
        if transformer is not None:
            _blocks_then(transformer, _base(transformer).blocks, mesh)
    if not student.is_lora:
        for expert in student.experts:
            for block in expert.blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(student, mesh=mesh)
    if critic is not None:
        if critic.adapter is None:
            _blocks_then(critic.transformer, critic.transformer.blocks, mesh)
        if critic.gan_head is not None:
            fully_shard(critic.gan_head, mesh=mesh)
    logger.info(
        "train: FSDP over %d processes (%s): teacher, student and critic sharded by Wan block",
        mesh.size(),
        mesh.device_type,
    )


def reshard(*modules: nn.Module | None) -> None:
    """Free every gathered weight of `modules`' FSDP units. FSDP2 keeps the root unit gathered after a forward
    without a backward (a no-grad rollout, the teacher's queries); call this after the optimizer steps so the next
    forward gathers the updated shards, and before reading parameters by name."""
    for module in modules:
        if module is not None:
            for m in module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()


def _base(transformer: nn.Module) -> nn.Module:
    """The Wan transformer inside a peft wrapper (or itself)."""
    get = getattr(transformer, "get_base_model", None)
    return get() if get is not None else transformer


def full_tensors(state: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor]:
    """`state` with every sharded tensor assembled (a collective: every rank calls, in the same order); the CPU
    tensors on the main process, {} elsewhere."""
    out = {}
    for key, value in state.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if main:
            out[key] = full.detach().to("cpu", copy=True).contiguous()  # its own storage, not a view of a buffer
        del full
    return out


def scalar(value: torch.Tensor) -> torch.Tensor:
    """A (maybe replicated DTensor) scalar as a plain tensor, e.g. the global gradient norm."""
    return value.full_tensor() if isinstance(value, DTensor) else value


@dataclass
class Role:
    """A sharded role's checkpointed state: the module, its optimizer and scheduler (the prepared ones), and the
    files they go to."""

    module: nn.Module
    optimizer: object
    scheduler: object
    weights_file: str
    optimizer_stem: str
    scheduler_file: str

    def trainable(self) -> dict[str, torch.Tensor]:
        """The parameters this role's optimizer updates, by name in `module` (a LoRA student's module also holds
        the teacher's frozen weights and maybe a LoRA critic's adapter)."""
        mine = {id(p) for group in _inner(self.optimizer).param_groups for p in group["params"]}
        return {k: p for k, p in self.module.named_parameters() if id(p) in mine}


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def save_checkpoint(folder: Path, roles: list[Role], ema, main: bool) -> None:
    """Write the roles' gathered weights, optimizer and scheduler states, the EMA and every rank's RNG (every rank
    calls; the main process writes all but its RNG file)."""
    reshard(*(role.module for role in roles))
    for role in roles:
        weights = full_tensors(role.trainable(), main)
        state = get_optimizer_state_dict(
            role.module, _inner(role.optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if main:
            save_file(weights, str(folder / role.weights_file))
            tensors, scalars = {}, {}
            for name, entry in state["state"].items():
                for key, value in entry.items():
                    (tensors if torch.is_tensor(value) else scalars)[f"{name}/{key}"] = value
            save_file(
                {k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{role.optimizer_stem}.safetensors")
            )
            meta = {"param_groups": state["param_groups"], "scalars": scalars}
            (folder / f"{role.optimizer_stem}.json").write_text(json.dumps(meta) + "\n")
            (folder / role.scheduler_file).write_text(json.dumps(_scheduler_state(role.scheduler)) + "\n")
    if ema is not None:
        shadow = full_tensors({f"shadow_params.{i}": s for i, s in enumerate(ema.shadow_params)}, main)
        if main:
            save_file(shadow, str(folder / EMA_FILES[0]))
            rest = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            (folder / EMA_FILES[1]).write_text(json.dumps(rest) + "\n")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / RNG_FILE.format(rank=dist.get_rank())))


def _scheduler_state(scheduler) -> dict:
    """The LR scheduler's state (diffusers' schedulers are LambdaLR: numbers and lists) as JSON-able values."""
    state = getattr(scheduler, "scheduler", scheduler).state_dict()
    json.dumps(state)  # fails loudly on anything that is not plain data (a lambda's state is None)
    return state


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing, so the checkpoint is incomplete; resume from an earlier one")
    return path


def load_checkpoint(folder: Path, roles: list[Role], ema) -> None:
    """Inverse of `save_checkpoint`: every rank reads the files and keeps its shards."""
    reshard(*(role.module for role in roles))
    for role in roles:
        weights = load_safetensors(str(_require(folder / role.weights_file)))
        expected = set(role.trainable())
        if set(weights) != expected:
            missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
            raise ValueError(
                f"{folder / role.weights_file}: does not fit this run (missing {missing}, unexpected {extra}); "
                "resume with the recipe that wrote it"
            )
        set_model_state_dict(role.module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        tensors = load_safetensors(str(_require(folder / f"{role.optimizer_stem}.safetensors")))
        meta = json.loads(_require(folder / f"{role.optimizer_stem}.json").read_text())
        state: dict[str, dict] = {}
        for key, value in [*tensors.items(), *meta["scalars"].items()]:
            name, field = key.rsplit("/", 1)
            state.setdefault(name, {})[field] = value
        set_optimizer_state_dict(
            role.module,
            _inner(role.optimizer),
            {"state": state, "param_groups": meta["param_groups"]},
            options=StateDictOptions(full_state_dict=True),
        )
        inner = getattr(role.scheduler, "scheduler", role.scheduler)
        inner.load_state_dict(json.loads(_require(folder / role.scheduler_file).read_text()))
    if ema is not None:
        tensors = load_safetensors(str(_require(folder / EMA_FILES[0])))
        n = len(ema.shadow_params)
        if sorted(tensors) != sorted(f"shadow_params.{i}" for i in range(n)):
            raise ValueError(f"{folder / EMA_FILES[0]}: holds {len(tensors)} EMA tensors, this student has {n}")
        shadow = []
        for i, like in enumerate(ema.shadow_params):
            full = tensors[f"shadow_params.{i}"].to(like.device, like.dtype)
            if isinstance(like, DTensor):
                full = distribute_tensor(full, like.device_mesh, like.placements)
            shadow.append(full)
        state = json.loads(_require(folder / EMA_FILES[1]).read_text())
        ema.load_state_dict({**state, "shadow_params": shadow})
    rng = load_safetensors(str(_require(folder / RNG_FILE.format(rank=dist.get_rank()))))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"])


def gather_final(student, ema, main: bool) -> tuple:
    """(weights, EMA weights or None) of a sharded student, assembled on the main process (every rank calls)."""
    weights = full_tensors(student.trainable_state_dict(), main)
    ema_weights = None
    if ema is not None:
        params = student.trainable_parameters()
        ema.store(params)
        ema.copy_to(params)
        ema_weights = full_tensors(student.trainable_state_dict(), main)
        ema.restore(params)
    return weights, ema_weights


class Autocast(nn.Module):
    """A sharded student called under accelerate's autocast (what `accelerator.prepare` adds to the models it wraps;
    a sharded one is not prepared: DDP must not wrap it)."""

    def __init__(self, module: nn.Module, accelerator):
        super().__init__()
        self.module, self.accelerator = module, accelerator

    def forward(self, *args, **kwargs):
        with self.accelerator.autocast():
            return self.module(*args, **kwargs)
