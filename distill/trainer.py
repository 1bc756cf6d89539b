"""The `train` stage: ONE accelerate loop for every method.

    teacher = WanTeacher.from_config(recipe.teacher)            frozen, shared by every method
    student = build_student(recipe.student, teacher.pipe.transformer)
    algorithm = METHODS[recipe.method.name].from_recipe(...)   the table of distill/methods.py
    for step: for micro-batch in accumulate: loss, logs = algorithm.loss(batch); backward
              clip, optimizer, LR scheduler, EMA; checkpoint-<step>/; log

Two-player methods (`two_player`: `dmd`, `self_forcing`) also train a critic, built by `students.critic.build_critic`,
with its own optimizer and LR scheduler (TTUR). Every step: critic_loss on each micro-batch, critic update; on the steps
the algorithm's `trains_generator(step)` names, generator_loss first and a generator update (and EMA step) too. Both LR
schedules run on the trainer's step clock. The critic is never DDP-wrapped (a LoRA critic lives inside the module the
student's DDP holds): its gradients are all-reduced by `distill.accel.all_reduce_grads`.

Outputs under `<output_dir>/students/<student.name>/`:
    checkpoint-<step>/   accelerate state (student trainable weights, optimizer, LR scheduler, RNG per rank;
                         two-player: the critic's optimizer_1 / scheduler_1), the EMA (ema.safetensors + ema.json)
                         and the critic's weights (critic.safetensors; `distill.role_state`: nothing is unpickled)
                         + training_state.json (step, data position, fingerprint), written last
    final/               Student.save_pretrained + training_state.json + COMPLETE (written last)
    final_ema/           the EMA weights (train.ema)
    logs/train/          tensorboard

Data order and randomness are fixed by the global sample index (`distill.data`), so a resumed run equals an
uninterrupted one and N processes × batch b equal 1 process × batch N·b.
Run alone with `accelerate launch -m distill.trainer RECIPE.yaml [dotted.key=value ...]` (the CLI's
`python -m distill train` does the same).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from core.files import load_safetensors
from core.locking import exclusive
from distill.accel import all_reduce_grads, make_accelerator
from distill.checkpoints import (
    CHECKPOINT_PREFIX,
    COMPLETE,
    FINAL_EMA,
    STUDENT_WEIGHTS,
    check_checkpoint,
    final_dir,
    fingerprint,
    list_checkpoints,
    prune,
    resolve_checkpoint,
    trained_config,
    write_state,
)
from distill.config import Recipe, TrainConfig, load_recipe
from distill.data import training_batches
from distill.methods import METHODS
from distill.role_state import check_finite, check_no_pickles, load_critic, load_ema, save_critic, save_ema
from distill.sharding import (
    CRITIC_FILE,
    OPTIMIZER_FILES,
    SCHEDULER_FILES,
    STUDENT_FILE,
    Autocast,
    Role,
    gather_final,
    load_checkpoint,
    reshard,
    save_checkpoint,
    scalar,
    shard_roles,
)
from distill.trackers import TRACKER_MODULES, start_trackers
from distill.validation import Validator
from students.critic import Critic, build_critic
from students.student import build_student
from teachers.wan import WanTeacher

logger = logging.getLogger(__name__)


def accelerator_kwargs(recipe: Recipe) -> dict:
    """What `make_accelerator(**...)` needs from the recipe."""
    return {
        "mixed_precision": recipe.train.mixed_precision,
        "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
    }


def _register_student_hooks(accelerator: Accelerator) -> None:
    """Checkpoint only the student's trainable weights (a LoRA student's base is the teacher's, reloaded anyway)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                state = accelerator.unwrap_model(model).trainable_state_dict()
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in state.items()},
                    str(Path(output_dir) / f"{i}_{STUDENT_WEIGHTS}"),
                )
        weights.clear()  # nothing else: accelerate would write the whole module (teacher base included)

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            path = Path(input_dir) / f"{i}_{STUDENT_WEIGHTS}"
            accelerator.unwrap_model(model).load_trainable_state_dict(load_safetensors(str(path)), where=str(path))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---- building ----------------------------------------------------------------------------------------
def build_algorithm(recipe: Recipe, teacher, student, unwrapped, critic=None, num_processes: int = 1):
    """The method's loss object (`distill.methods.METHODS[method.name].from_recipe`). `student` is the prepared
    (maybe DDP) module; `unwrapped` the `Student`; `critic` the critic's callable (two-player methods);
    `num_processes` fixes the samples per trainer step."""
    return METHODS[recipe.method.name].from_recipe(
        recipe, teacher=teacher, student=student, unwrapped=unwrapped, critic=critic, num_processes=num_processes
    )


def make_optimizer(params: list, tc: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """`train.optimizer` over `params` (parameters, or param groups) at `lr` (None: train.learning_rate)."""
    lr = tc.learning_rate if lr is None else lr
    if tc.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                "train.optimizer: adamw8bit needs bitsandbytes (CUDA only: pip install "
                "'wan-distill[gpu]'); or set train.optimizer: adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)


def _check_accelerator(accelerator: Accelerator, recipe: Recipe) -> None:
    tc = recipe.train
    if accelerator.gradient_accumulation_steps != tc.gradient_accumulation_steps:
        raise ValueError(
            f"train.gradient_accumulation_steps: the Accelerator has {accelerator.gradient_accumulation_steps}, the "
            f"recipe {tc.gradient_accumulation_steps}; build it with make_accelerator(**accelerator_kwargs(recipe))"
        )
    if str(accelerator.mixed_precision) != tc.mixed_precision:
        raise ValueError(
            f"train.mixed_precision: the Accelerator has {accelerator.mixed_precision!r}, the recipe "
            f"{tc.mixed_precision!r}; build it with make_accelerator(**accelerator_kwargs(recipe))"
        )
    check_train_recipe(recipe)


def check_train_recipe(recipe: Recipe) -> None:
    """What `train` refuses in a recipe before loading anything (also run by `--dry-run`)."""
    tc = recipe.train
    if recipe.student is None or recipe.method is None:
        raise ValueError(f"{recipe.source}: train needs a student recipe (with `student` and `method` sections)")
    if METHODS[recipe.method.name].two_player and tc.mixed_precision == "fp16":
        raise ValueError(
            f"train.mixed_precision: fp16 can't train method {recipe.method.name} (accelerate's one "
            "GradScaler would unscale the critic's and the student's optimizers inconsistently); use bf16"
        )
    if tc.sharding == "fsdp":
        refused = {
            "train.mixed_precision: fp16": tc.mixed_precision == "fp16",
            "train.optimizer: adamw8bit": tc.optimizer == "adamw8bit",
            f"teacher.offload: {recipe.teacher.offload}": recipe.teacher.offload != "none",
            f"teacher.quantize: {recipe.teacher.quantize}": recipe.teacher.quantize != "none",
        }
        for what, bad in refused.items():
            if bad:
                raise ValueError(
                    f"{what} can't train with train.sharding: fsdp (FSDP already spreads the weights over the "
                    "processes); use bf16 / adamw / no offload / no quantization, or train.sharding: none"
                )
    missing = [n for n in tc.log_with if importlib.util.find_spec(TRACKER_MODULES[n]) is None]
    if missing:
        raise ValueError(
            f"train.log_with: {missing[0]} is not installed; `pip install {TRACKER_MODULES[missing[0]]}` "
            "or drop it from train.log_with"
        )


def _save_final(
    recipe: Recipe, student, ema, step: int, samples_per_step: int, fp: dict, gathered: tuple | None = None
) -> Path:
    """`final/` (+ `final_ema/`); `gathered`: (weights, EMA weights or None) in `Student.trainable_state_dict`
    layout, assembled from the shards (`train.sharding: fsdp`), written instead of the module's own."""
    final = final_dir(recipe.student_dir())
    if final.exists():
        shutil.rmtree(final)
    student.save_pretrained(final, state=None if gathered is None else gathered[0])
    if ema is not None:
        ema_dir = recipe.student_dir() / FINAL_EMA
        if ema_dir.exists():
            shutil.rmtree(ema_dir)
        if gathered is not None:
            student.save_pretrained(ema_dir, state=gathered[1])
        else:
            params = student.trainable_parameters()
            ema.store(params)
            ema.copy_to(params)
            student.save_pretrained(ema_dir)
            ema.restore(params)
    write_state(final, step, samples_per_step, fp, trained_config(recipe))
    (final / COMPLETE).write_text(json.dumps({"step": step}) + "\n")
    return final


def _lr_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, world: int):
    from diffusers.optimization import get_scheduler

    tc = recipe.train
    return get_scheduler(  # accelerate steps a prepared scheduler once per process: scale like diffusers
        tc.lr_scheduler,
        optimizer,
        num_warmup_steps=tc.lr_warmup_steps * world,
        num_training_steps=tc.max_steps * world,
    )


def _optimization(recipe: Recipe, accelerator: Accelerator, student):
    """(trainable params in fp32, optimizer, LR scheduler, EMA or None); EMA registered for checkpointing."""
    from diffusers.training_utils import EMAModel, cast_training_params

    tc, world = recipe.train, accelerator.num_processes
    if tc.sharding == "none":  # (sharded: cast before sharding, `_shard`)
        cast_training_params(student, torch.float32)  # trainable weights in fp32 under mixed precision
    params = student.trainable_parameters()
    optimizer = make_optimizer(params, recipe.train)
    lr_scheduler = _lr_scheduler(recipe, optimizer, world)
    ema = EMAModel(params, decay=tc.ema_decay) if tc.ema else None
    if ema is not None:  # checkpointed by `_checkpoint` as safetensors (distill.role_state), never pickled
        ema.to(accelerator.device)
    if recipe.student.experts > 1 and accelerator.ddp_handler is None:
        from accelerate.utils import DistributedDataParallelKwargs

        # each sample runs one expert, so DDP must expect parameters without gradients in a step
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    return params, optimizer, lr_scheduler, ema


# ---- the critic (two-player methods) ------------------------------------------------------------------
def _critic_optimization(recipe: Recipe, accelerator: Accelerator, critic: Critic):
    """(critic params in fp32, prepared optimizer, prepared LR scheduler); its weights registered for checkpoints."""
    from diffusers.training_utils import cast_training_params

    if recipe.train.sharding == "none":  # (sharded: cast before sharding, `_shard`)
        cast_training_params(critic, torch.float32)
    params, c = critic.trainable_parameters(), recipe.method.critic_config()
    groups: list = params
    if critic.gan_head is not None and c.gan_learning_rate is not None:  # the new head learns faster than the critic
        head = {id(p) for p in critic.gan_head.parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in head]},
            {"params": list(critic.gan_head.parameters()), "lr": c.gan_learning_rate},
        ]
    optimizer = make_optimizer(groups, recipe.train, c.critic_learning_rate)
    scheduler = _lr_scheduler(recipe, optimizer, accelerator.num_processes)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    return params, optimizer, scheduler  # its weights: `_checkpoint` (distill.role_state)


@contextlib.contextmanager
def _critic_grads_set_aside(params: list[nn.Parameter] | None):
    """Within: `params` (the critic's) start with no gradient; on exit the gradients they had before are back, so a
    generator backward through the critic (DMD2's GAN term) leaves the critic's accumulated gradients as they were.
    None: a no-op."""
    if params is None:
        yield
        return
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _autocast(accelerator: Accelerator, module: nn.Module):
    """`module` called under accelerate's autocast (a prepared model gets it from `prepare`; the critic is not)."""

    def call(x, t, encoder_hidden_states, **kwargs):
        with accelerator.autocast():
            return module(x, t, encoder_hidden_states, **kwargs)

    return call


def _shard(recipe: Recipe, accelerator: Accelerator, teacher, student, critic: Critic | None | bool = True):
    """`train.sharding: fsdp`: build the critic (two-player methods; from the whole teacher, before sharding),
    cast the trainable weights to fp32, shard teacher, student and critic over the processes and move the teacher's
    VAE and text encoder to this process's device. Returns the critic (or None)."""
    from diffusers.training_utils import cast_training_params

    if critic is True:
        critic = make_critic(recipe, teacher)
        if recipe.train.gradient_checkpointing:
            critic.transformer.enable_gradient_checkpointing()
    cast_training_params(student, torch.float32)
    if critic is not None:
        cast_training_params(critic, torch.float32)
    shard_roles(teacher, student, critic, accelerator.device)
    for name in ("vae", "text_encoder"):
        part = getattr(teacher.pipe, name, None)
        if part is not None:
            part.to(accelerator.device)
    teacher.device = accelerator.device
    return critic


# ---- the loop ----------------------------------------------------------------------------------------
def make_critic(recipe: Recipe, teacher) -> Critic:
    """The two-player method's critic (`students.critic.build_critic`) from its `method.<name>` section."""
    c, base = recipe.method.critic_config(), teacher.pipe.transformer
    gan_layer = None if not c.gan_weight else (len(base.blocks) // 2 if c.gan_layer is None else c.gan_layer)
    return build_critic(
        base,
        c.critic,
        lora_rank=c.critic_lora_rank,
        target_modules=recipe.student.lora_target_modules,
        gan_layer=gan_layer,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        key=f"method.{recipe.method.name}",
    )


def train(recipe: Recipe, accelerator: Accelerator | None = None) -> Path:
    """Train `recipe.student` with `recipe.method`; returns `<output_dir>/students/<name>/final/`."""
    if recipe.student is None or recipe.method is None:
        raise ValueError(f"{recipe.source}: train needs a student recipe (with `student` and `method` sections)")
    accelerator = accelerator or make_accelerator(**accelerator_kwargs(recipe))
    _check_accelerator(accelerator, recipe)
    lock = recipe.out / f".train-{recipe.student.name}.lock"
    with exclusive(lock, f"`train` of student {recipe.student.name}", accelerator.is_main_process):
        return _train(recipe, accelerator)


def _train(recipe: Recipe, accelerator: Accelerator) -> Path:
    tc, student_dir = recipe.train, recipe.student_dir()
    world = accelerator.num_processes
    samples_per_step = tc.batch_size * world * tc.gradient_accumulation_steps
    fp = fingerprint(recipe, world)
    resume = resolve_checkpoint(recipe)
    start_step = check_checkpoint(resume, fp)["step"] if resume is not None else 0  # fail fast, before any model
    if resume is not None:
        check_no_pickles(resume)

    sharded, two_player = tc.sharding == "fsdp", METHODS[recipe.method.name].two_player
    if sharded and world < 2:
        raise ValueError(
            "train.sharding: fsdp shards over processes and this run has one; launch it with `accelerate launch "
            "--num_processes N` (N >= 2), or set train.sharding: none"
        )
    set_seed(tc.seed)  # the student's initialisation (LoRA A) is the same on every rank and run
    # sharded: every role is built in host memory, and `shard_roles` moves each process's shards to its device
    teacher = WanTeacher.from_config(recipe.teacher, "cpu" if sharded else accelerator.device)
    student = build_student(recipe.student, teacher.pipe.transformer)
    if tc.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    critic = critic_params = critic_optimizer = critic_scheduler = None
    if sharded:
        critic = _shard(recipe, accelerator, teacher, student, True if two_player else None)
    params, optimizer, lr_scheduler, ema = _optimization(recipe, accelerator, student)
    if sharded:
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        model = Autocast(student, accelerator)
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
        _register_student_hooks(accelerator)
    if two_player:
        if critic is None:
            critic = make_critic(recipe, teacher)  # after prepare(student): see build_critic
            if tc.gradient_checkpointing:
                critic.transformer.enable_gradient_checkpointing()
        critic_params, critic_optimizer, critic_scheduler = _critic_optimization(recipe, accelerator, critic)
    roles = []
    if sharded:
        roles.append(Role(student, optimizer, lr_scheduler, STUDENT_FILE, OPTIMIZER_FILES[0], SCHEDULER_FILES[0]))
        if critic is not None:
            roles.append(
                Role(critic, critic_optimizer, critic_scheduler, CRITIC_FILE, OPTIMIZER_FILES[1], SCHEDULER_FILES[1])
            )
    if resume is not None:
        if sharded:
            load_checkpoint(resume, roles, ema)
        else:
            accelerator.load_state(str(resume))
            if ema is not None:  # the shadow weights are read onto the CPU
                load_ema(ema, resume)
                ema.to(accelerator.device)
            if critic is not None:
                load_critic(critic, resume)
        logger.info("resumed from %s at step %d", resume, start_step)
    algorithm = build_algorithm(
        recipe, teacher, model, student, None if critic is None else _autocast(accelerator, critic), num_processes=world
    )
    batches = training_batches(
        recipe,
        teacher,
        start_step=start_step,
        num_processes=world,
        rank=accelerator.process_index,
        need_trajectory=algorithm.needs_trajectory,  # a method's class default, or its instance's (an option)
    )
    if accelerator.is_main_process:
        student_dir.mkdir(parents=True, exist_ok=True)
    start_trackers(accelerator, recipe)
    validator = Validator(recipe, teacher) if tc.validation_steps else None

    bar = tqdm(
        total=tc.max_steps,
        initial=start_step,
        desc=f"train {recipe.student.name}",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    two_player = critic is not None
    finished = functools.partial(list_checkpoints, student_dir)  # named by a non-finite step's error
    set_aside = critic_params if getattr(algorithm, "generator_touches_critic", False) else None
    for step in range(start_step, tc.max_steps):
        t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        train_generator = not two_player or algorithm.trains_generator(step)
        # Self-Forcing's order (critic_after_generator): the critic's pass follows the generator's update
        critic_after = two_player and train_generator and algorithm.config.critic_after_generator
        held = []  # critic_after: the micro-batches, for the critic's pass

        def critic_backward(batch, step: int = step) -> dict:
            """2-3'. the critic's loss on a micro-batch (fresh draws from its streams) and its backward."""
            critic_loss, critic_logs = algorithm.critic_loss(batch)
            check_finite(critic_loss, "critic loss", step, finished)
            accelerator.backward(critic_loss)
            return critic_logs

        def critic_update(step: int = step) -> None:
            """4'. clip and update the critic once per optimizer step (its prepared optimizer skips the others)."""
            if accelerator.sync_gradients:
                if not sharded:  # (sharded: FSDP reduce-scattered them in backward)
                    all_reduce_grads(accelerator, critic_params)
                norm = accelerator.clip_grad_norm_(critic_params, tc.max_grad_norm or math.inf)
                check_finite(scalar(norm), "critic gradient norm", step, finished)
            critic_optimizer.step()
            critic_scheduler.step()
            critic_optimizer.zero_grad(set_to_none=True)

        for _ in range(tc.gradient_accumulation_steps):
            # 1. the micro-batch: clean latents, text embeddings, one random stream per sample
            batch = next(batches)
            with accelerator.accumulate(model):
                logs = {}
                if train_generator:
                    # 2. the method's (generator's) loss, with its own numbered steps (draws, teacher and student)
                    loss, logs = algorithm.generator_loss(batch) if two_player else algorithm.loss(batch)
                    # 3. backward; accelerate scales by 1/gradient_accumulation_steps and syncs on the last micro-batch
                    # (a GAN term backpropagates through the critic: its gradients are set aside and dropped)
                    check_finite(loss, "generator loss" if two_player else "loss", step, finished)
                    with _critic_grads_set_aside(set_aside):
                        accelerator.backward(loss)
                if two_player and not critic_after:  # the critic on the same micro-batch
                    logs = {**logs, **critic_backward(batch)}
                # 4. clip and update once per optimizer step (the prepared optimizers skip non-sync micro-batches)
                if train_generator:
                    if accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm or math.inf)
                        check_finite(scalar(norm), "gradient norm", step, finished)
                    optimizer.step()
                lr_scheduler.step()  # every step: the generator's LR follows the trainer's step clock
                optimizer.zero_grad(set_to_none=True)
                if two_player and not critic_after:
                    critic_update()
            if critic_after:
                held.append(batch)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / tc.gradient_accumulation_steps
        if held:  # 2-4'. the critic's pass, its rollouts from the updated generator
            if sharded:
                reshard(student)
            for batch in held:
                with accelerator.accumulate(model):
                    logs = critic_backward(batch)
                    critic_update()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / tc.gradient_accumulation_steps
        assert accelerator.sync_gradients, "gradient accumulation out of step with the optimizer steps"
        if sharded:  # the next forward gathers the updated shards (distill.sharding.reshard)
            reshard(student, critic, teacher.pipe.transformer, getattr(teacher.pipe, "transformer_2", None))
        # 5. EMA of the trainable weights (when they moved)
        if ema is not None and train_generator:
            ema.step(params)
        done, step_time = step + 1, time.perf_counter() - t0
        bar.update(1)
        # 6. checkpoint-<step>/ (every rank writes its RNG state; rank 0 the rest, training_state.json last)
        if done % tc.checkpointing_steps == 0 or done == tc.max_steps:
            _checkpoint(
                accelerator,
                student_dir / f"{CHECKPOINT_PREFIX}{done}",
                done,
                samples_per_step,
                fp,
                tc,
                ema,
                critic,
                roles,
            )
        # 7. logs: the algorithm's dict plus lr and step time
        if done % tc.log_every == 0 or done == tc.max_steps:
            values = {k: float(v) for k, v in sums.items()}
            values.update({"lr": lr_scheduler.get_last_lr()[0], "time/step_s": step_time})
            if two_player:
                values["lr/critic"] = critic_scheduler.get_last_lr()[0]
            if torch.cuda.is_available():
                values["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            accelerator.log(values, step=done)
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k.startswith("loss")})
        # 8. validation previews of fixed prompts and noise (main process)
        if validator is not None and (done % tc.validation_steps == 0 or done == tc.max_steps):
            validator(student, done, accelerator, every_rank=sharded)
    bar.close()

    accelerator.wait_for_everyone()
    final = final_dir(student_dir)
    gathered = None
    if sharded:
        reshard(student)
        gathered = gather_final(student, ema, accelerator.is_main_process)
    if accelerator.is_main_process:
        final = _save_final(recipe, student, ema, tc.max_steps, samples_per_step, fp, gathered)
        logger.info("train: wrote %s", final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _checkpoint(
    accelerator: Accelerator,
    path: Path,
    step: int,
    samples_per_step: int,
    fp: dict,
    tc,
    ema=None,
    critic=None,
    roles: list[Role] | None = None,
) -> None:
    """`roles` (sharded runs): every role's state gathered by `distill.sharding`; else accelerate's `save_state`."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)  # a stale folder from an abandoned run at the same step
    accelerator.wait_for_everyone()
    if roles:
        if accelerator.is_main_process:
            path.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_checkpoint(path, roles, ema, accelerator.is_main_process)
    else:
        accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None and not roles:
            save_ema(ema, path)
        if critic is not None and not roles:
            save_critic(critic, path)
        write_state(path, step, samples_per_step, fp)  # last: it marks the checkpoint finished
        prune(path.parent, tc.checkpoints_total_limit)


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m distill.trainer RECIPE.yaml [dotted.key=value ...]`."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m distill.trainer RECIPE.yaml [dotted.key=value ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    recipe = load_recipe(args[0], args[1:])
    train(recipe, make_accelerator(**accelerator_kwargs(recipe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
