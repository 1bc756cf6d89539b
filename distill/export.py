"""Export stage (DESIGN.md §8): write a trained student in the formats of `recipe.export.formats`.

Under `<output_dir>/students/<name>/export/`:
    diffusers/   pytorch_lora_weights.safetensors  (WanPipeline.save_lora_weights; keys
                 `transformer.blocks.0.attn1.to_q.lora_A.weight`); N experts: expert_<i>/ + experts.json
    comfyui/     <name>.safetensors  Wan-native keys `diffusion_model.blocks.0.self_attn.q.lora_down.weight`,
                 `.lora_up.weight`, `.alpha`; N experts: <name>_expert_<i>.safetensors + experts.json
    transformer/ save_pretrained of the (LoRA-fused) student transformer; N experts: expert_<i>/
    pipeline/    a complete WanPipeline folder; 2 experts map to transformer / transformer_2 with
                 boundary_ratio (Wan2.2's layout)
Each folder gets a model card README.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from huggingface_hub import ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import save_file
from tqdm.auto import tqdm

from core.lora import fused_transformer, lora_state_dict
from core.wan_lora import BLOCK_NATIVE, native_name, native_state_dict
from distill.config import Recipe
from students.experts import expert_name
from students.sampling import student_sampling_mode, student_sigmas
from students.student import Student

logger = logging.getLogger(__name__)

LORA_FORMATS = ("diffusers_lora", "comfyui_lora")
EXPERTS_JSON = "experts.json"
_LORA_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.lora_([AB])\.weight$")
_SECRET = re.compile(r"token|secret|password", re.IGNORECASE)


def export_student(
    recipe: Recipe, student: Student, teacher_pipe: WanPipeline, out_dir: Path, eval_report: dict | None = None
) -> dict[str, Path]:
    """Write every format of `recipe.export.formats` under `out_dir`; returns {format: path written}."""
    formats = list(dict.fromkeys(recipe.export.formats))
    _check_formats(formats, student)
    bad = [n for n, p in student.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(
            f"export: {len(bad)} tensor(s) of student {student.cfg.name} are not finite (first: "
            f"{bad[0]}); nothing was exported. Export a finite checkpoint with export.checkpoint, or "
            "retrain"
        )
    out_dir = Path(out_dir)
    writers = {
        "diffusers_lora": export_diffusers_lora,
        "comfyui_lora": export_comfyui_lora,
        "comfyui_model": export_comfyui_model,
        "transformer": export_transformer,
        "pipeline": export_pipeline,
    }
    written = {}
    for fmt in tqdm(formats, desc=f"export {student.cfg.name}", disable=len(formats) < 2):
        # each format is written into a temp folder, marked, then renamed into place: a killed or failed export
        # leaves the previous folder (or none), never half of one
        folder, tmp = out_dir / FORMAT_FOLDERS[fmt], out_dir / f".{FORMAT_FOLDERS[fmt]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            path = Path(writers[fmt](recipe, student, teacher_pipe, tmp))
            (tmp / "README.md").write_text(model_card(recipe, student, fmt, eval_report))
            (tmp / EXPORT_COMPLETE).write_text(json.dumps({"format": fmt, "student": student.cfg.name}) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        written[fmt] = folder / path.relative_to(tmp)
        logger.info("export %s: wrote %s", fmt, written[fmt])
    return written


EXPORT_COMPLETE = "COMPLETE"
"""Written last into each export folder: the folder holds a whole export of its format."""


FORMAT_FOLDERS = {
    "diffusers_lora": "diffusers",
    "comfyui_lora": "comfyui",
    "comfyui_model": "comfyui_model",
    "transformer": "transformer",
    "pipeline": "pipeline",
}


def _check_formats(formats: list[str], student: Student) -> None:
    lora = [f for f in formats if f in LORA_FORMATS]
    if lora and not student.is_lora:
        raise ValueError(
            f"export.formats: {lora} need a LoRA student, but student.kind={student.cfg.kind}; "
            "export it as 'transformer' or 'pipeline' instead"
        )
    if "pipeline" in formats and student.num_experts > 2:
        raise ValueError(
            f"export.formats: 'pipeline' holds at most 2 experts (WanPipeline's transformer / transformer_2), "
            f"but student.experts={student.num_experts}; export 'transformer' or the LoRA formats instead"
        )
    if "comfyui_lora" in formats:
        bad = [m for m in student.cfg.lora_target_modules if m not in BLOCK_NATIVE]
        if bad:
            raise ValueError(
                f"export.formats: comfyui_lora cannot name student.lora_target_modules {bad}; "
                f"supported: {sorted(BLOCK_NATIVE)}"
            )


def _write_experts_json(folder: Path, student: Student, files: list[str]) -> None:
    meta = {
        "boundaries": student.boundaries,
        "experts": files,
        "rule": "expert i serves boundaries[i-1] > sigma >= boundaries[i] (sigma = t/1000; expert 0: highest noise)",
    }
    (folder / EXPERTS_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def _expert_dirs(folder: Path, student: Student) -> list[Path]:
    return [folder] if student.num_experts == 1 else [folder / expert_name(i) for i in range(student.num_experts)]


# ---- formats ----------------------------------------------------------------------------------------------
def export_diffusers_lora(recipe: Recipe, student: Student, teacher_pipe: WanPipeline, folder: Path) -> Path:
    """`pytorch_lora_weights.safetensors` via `WanPipeline.save_lora_weights`, with the adapter's LoraConfig."""
    dirs = _expert_dirs(folder, student)
    for i, d in enumerate(dirs):
        name = student.adapter_names[i]
        layers = {k: v.detach().contiguous() for k, v in lora_state_dict(student.transformer, name).items()}
        WanPipeline.save_lora_weights(
            d,
            transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=student.transformer.peft_config[name].to_dict(),
        )
    if student.num_experts > 1:
        _write_experts_json(folder, student, [f"{d.name}/pytorch_lora_weights.safetensors" for d in dirs])
    return folder


def comfyui_state_dict(lora_sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft keys `blocks.{i}.attn1.to_q.lora_A.weight` → `diffusion_model.blocks.{i}.self_attn.q.lora_down.weight`
    (lora_B → lora_up) plus a scalar `.alpha` per module: the layout diffusers' non-diffusers Wan converter reads."""
    out = {}
    for key, value in lora_sd.items():
        m = _LORA_KEY.match(key)
        native = None if m is None else native_name(f"blocks.{m.group(1)}.{m.group(2)}")
        if m is None or native is None:
            raise ValueError(f"export.formats: comfyui_lora has no Wan-native name for LoRA weight {key!r}")
        ab = m.group(3)
        base = f"diffusion_model.{native}"
        out[f"{base}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = value.detach().contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def _comfyui_files(folder: Path, student: Student, state_dicts: list[dict[str, torch.Tensor]]) -> list[str]:
    """Write one `<name>[_expert_<i>].safetensors` per expert (+ experts.json for several); returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    name = student.cfg.name
    files = (
        [f"{name}.safetensors"]
        if student.num_experts == 1
        else [f"{name}_{expert_name(i)}.safetensors" for i in range(student.num_experts)]
    )
    for fname, sd in zip(files, state_dicts):
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(folder / fname), metadata={"format": "pt"})
    if student.num_experts > 1:
        _write_experts_json(folder, student, files)
    return files


def export_comfyui_lora(recipe: Recipe, student: Student, teacher_pipe: WanPipeline, folder: Path) -> Path:
    sds = [
        comfyui_state_dict(lora_state_dict(student.transformer, adapter), student.cfg.lora_alpha)
        for adapter in student.adapter_names
    ]
    files = _comfyui_files(folder, student, sds)
    if student.num_experts == 1:
        write_workflow(folder, recipe, model_file=comfyui_base_file(recipe), lora_file=files[0])
    return folder / files[0] if student.num_experts == 1 else folder


def export_comfyui_model(recipe: Recipe, student: Student, teacher_pipe: WanPipeline, folder: Path) -> Path:
    """One Wan-native single-file transformer per expert (the original checkpoint's names, no prefix: what
    ComfyUI's `UNETLoader` detects as Wan), plus `workflow_api.json` for a single expert."""
    files = _comfyui_files(folder, student, [native_state_dict(t) for t in student_transformers(student)])
    if student.num_experts == 1:
        write_workflow(folder, recipe, model_file=files[0], lora_file=None)
    return folder / files[0] if student.num_experts == 1 else folder


def comfyui_workflow(recipe: Recipe, model_file: str, lora_file: str | None) -> dict:
    """A ComfyUI API-format prompt (node id -> {class_type, inputs}; links are [node id, output index]) that samples
    the student as it was distilled: ModelSamplingSD3 at the teacher's shift, KSampler `lcm` (x0 then fresh noise)
    or `euler`, scheduler `simple`, the student's steps and cfg, at the teacher's size and length."""
    assert recipe.student is not None
    cfg, teacher = recipe.student, recipe.teacher
    mode = student_sampling_mode(cfg)
    sigmas = student_sigmas(cfg, teacher.shift, teacher.num_inference_steps)
    steps = len(sigmas) if mode == "renoise" else len(sigmas) - 1
    model: list = ["1", 0]
    nodes: dict[str, dict] = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_file, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": COMFY_TEXT_ENCODER, "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": COMFY_VAE}},
    }
    if lora_file is not None:
        nodes["4"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": model, "lora_name": lora_file, "strength_model": 1.0},
        }
        model = ["4", 0]
    nodes.update(
        {
            "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": teacher.shift}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a prompt", "clip": ["2", 0]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": teacher.negative_prompt or "", "clip": ["2", 0]}},
            "8": {
                "class_type": "EmptyHunyuanLatentVideo",
                "inputs": {
                    "width": teacher.width,
                    "height": teacher.height,
                    "length": teacher.num_frames,
                    "batch_size": 1,
                },
            },
            "9": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["5", 0],
                    "seed": 0,
                    "steps": steps,
                    "cfg": cfg.guidance_scale,
                    "sampler_name": "lcm" if mode == "renoise" else "euler",
                    "scheduler": "simple",
                    "positive": ["6", 0],
                    "negative": ["7", 0],
                    "latent_image": ["8", 0],
                    "denoise": 1.0,
                },
            },
            "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["3", 0]}},
            "11": {
                "class_type": "SaveAnimatedWEBP",
                "inputs": {
                    "images": ["10", 0],
                    "filename_prefix": cfg.name,
                    "fps": 16.0,
                    "lossless": False,
                    "quality": 90,
                    "method": "default",
                },
            },
        }
    )
    return nodes


COMFY_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
COMFY_VAE = "wan_2.1_vae.safetensors"
"""File names of Comfy-Org's repackaged Wan2.1 text encoder and VAE (`ComfyUI/models/text_encoders`, `vae`)."""
WORKFLOW_JSON = "workflow_api.json"


def write_workflow(folder: Path, recipe: Recipe, model_file: str, lora_file: str | None) -> None:
    workflow = comfyui_workflow(recipe, model_file, lora_file)
    (folder / WORKFLOW_JSON).write_text(json.dumps(workflow, indent=2) + "\n")


def comfyui_base_file(recipe: Recipe) -> str:
    """The Comfy-Org repackaged file of the teacher's transformer (`ComfyUI/models/diffusion_models`)."""
    name = (recipe.export.base_model or recipe.teacher.pretrained).lower()
    for size, file in (("1.3b", "wan2.1_t2v_1.3B_fp16.safetensors"), ("14b", "wan2.1_t2v_14B_fp16.safetensors")):
        if "wan2.1" in name and "t2v" in name and size in name:
            return file
    return "wan_teacher.safetensors"  # a placeholder: the teacher's transformer in Wan-native names


def student_transformers(student: Student) -> list[WanTransformer3DModel]:
    """One plain transformer per expert (LoRA: a fused copy; pruned / full: the expert itself)."""
    if student.is_lora:
        return [fused_transformer(student.transformer, n) for n in student.adapter_names]
    return list(student.experts)


def export_transformer(recipe: Recipe, student: Student, teacher_pipe: WanPipeline, folder: Path) -> Path:
    dirs = _expert_dirs(folder, student)
    for d, transformer in zip(dirs, student_transformers(student)):
        transformer.save_pretrained(d)
    if student.num_experts > 1:
        _write_experts_json(folder, student, [d.name for d in dirs])
    return folder


def student_scheduler(recipe: Recipe) -> FlowMatchEulerDiscreteScheduler:
    """The Euler flow scheduler at the teacher's shift; stochastic (x0 then fresh noise) for few-step students."""
    assert recipe.student is not None
    return FlowMatchEulerDiscreteScheduler(
        shift=recipe.teacher.shift, stochastic_sampling=student_sampling_mode(recipe.student) == "renoise"
    )


def export_pipeline(recipe: Recipe, student: Student, teacher_pipe: WanPipeline, folder: Path) -> Path:
    """A WanPipeline folder: the teacher's tokenizer, text encoder and VAE with the student transformer(s)."""
    transformers = student_transformers(student)
    pipe = WanPipeline(
        tokenizer=teacher_pipe.tokenizer,
        text_encoder=teacher_pipe.text_encoder,
        vae=teacher_pipe.vae,
        scheduler=student_scheduler(recipe),
        transformer=transformers[0],
        transformer_2=transformers[1] if len(transformers) == 2 else None,
        boundary_ratio=student.boundaries[0] if len(transformers) == 2 else None,
        expand_timesteps=teacher_pipe.config.expand_timesteps,
    )
    pipe.save_pretrained(folder)
    return folder


# ---- model card ---------------------------------------------------------------------------------------------
def _base_model(recipe: Recipe) -> str | None:
    """`export.base_model`, else `teacher.pretrained` when it is a Hub id (a local folder is not a valid card field)."""
    name = recipe.export.base_model or recipe.teacher.pretrained
    if Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def scrub_secrets(obj):
    """A copy of a recipe dict without keys that look like secrets (token, secret, password), at any depth."""
    if isinstance(obj, dict):
        return {k: scrub_secrets(v) for k, v in obj.items() if not _SECRET.search(str(k))}
    if isinstance(obj, list):
        return [scrub_secrets(v) for v in obj]
    return obj


def model_card(recipe: Recipe, student: Student, fmt: str, eval_report: dict | None) -> str:
    """README.md with YAML front matter (library_name, base_model, tags, pipeline_tag), the recipe, eval numbers
    and a usage snippet for `fmt`."""
    cfg = student.cfg
    base = _base_model(recipe)
    tags = ["distillation", *(["lora"] if student.is_lora else []), "text-to-video", "wan", "diffusers"]
    if cfg.experts > 1:
        tags.append("timestep-experts")
    data = ModelCardData(library_name="diffusers", base_model=base, tags=tags, pipeline_tag="text-to-video")
    mode = student_sampling_mode(cfg)
    sigmas = student_sigmas(cfg, recipe.teacher.shift, recipe.teacher.num_inference_steps)
    steps = len(sigmas) if mode == "renoise" else len(sigmas) - 1
    method = recipe.method.name if recipe.method is not None else "?"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {cfg.name}",
        "",
        f"A `{cfg.kind}` student distilled with `{method}` from `{base or recipe.teacher.pretrained}` by the "
        "wan-distill toolkit.",
        f"Sampling: {steps} steps ({mode}: "
        + ("x0 prediction then fresh noise at each step" if mode == "renoise" else "Euler flow steps")
        + f"), guidance_scale {cfg.guidance_scale}, shift {recipe.teacher.shift}; "
        f"σ = {[round(s, 4) for s in sigmas]}.",
    ]
    if cfg.experts > 1:
        lines.append(
            f"Timestep experts: {cfg.experts}, σ boundaries {cfg.expert_boundaries} (expert 0 = highest "
            "noise; σ >= boundary goes to the higher-noise expert, as Wan2.2's boundary_ratio); "
            "see experts.json."
        )
    if mode == "renoise" and steps > 1:
        lines.append(
            "Note: `WanPipeline` places its own timesteps for `num_inference_steps`; the exact σ above "
            "are those of `students.sampling.sample_student` in wan-distill."
        )
    lines += ["", "## Usage", "", _usage(recipe, fmt, base, steps), ""]
    if eval_report:
        lines += [
            "## Evaluation",
            "",
            "```json",
            json.dumps(scrub_secrets(eval_report), indent=2, default=str),
            "```",
            "",
        ]
    lines += [
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(scrub_secrets(recipe.to_dict()), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _usage(recipe: Recipe, fmt: str, base: str | None, steps: int) -> str:
    assert recipe.student is not None
    cfg = recipe.student
    base = base or "<the teacher's WanPipeline folder>"
    call = f'video = pipe("a prompt", num_inference_steps={steps}, guidance_scale={cfg.guidance_scale}).frames[0]'
    stochastic = ", stochastic_sampling=True" if student_sampling_mode(cfg) == "renoise" else ""
    scheduler = [f"pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift={recipe.teacher.shift}{stochastic})"]
    if fmt == "diffusers_lora":
        sub = "" if cfg.experts == 1 else ', subfolder="expert_0"'
        note = [] if cfg.experts == 1 else ["# one adapter per σ interval (expert_0: highest noise), see experts.json"]
        return "\n".join(
            [
                "```python",
                "import torch",
                "from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline",
                "",
                *note,
                f'pipe = WanPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")',
                f'pipe.load_lora_weights("path/to/export/diffusers"{sub})',
                *scheduler,
                call,
                "```",
            ]
        )
    if fmt in ("comfyui_lora", "comfyui_model"):
        sampler = "lcm" if student_sampling_mode(cfg) == "renoise" else "euler"
        where = (
            f"Copy `{cfg.name}*.safetensors` to `ComfyUI/models/loras/` and apply it to the Wan model with a "
            "`LoraLoaderModelOnly` node (strength 1.0)"
            if fmt == "comfyui_lora"
            else f"Copy `{cfg.name}*.safetensors` to `ComfyUI/models/diffusion_models/` and load it with a "
            "`Load Diffusion Model` (UNETLoader) node in place of the Wan model; it keeps Wan's own weight names"
        )
        causal = (
            " This is the causal student's weights as a plain (bidirectional) Wan transformer: ComfyUI samples all "
            "frames at once, not chunk by chunk with a KV cache as the student was trained; stream it with "
            "`students.streaming.stream_video` for the causal behaviour."
            if cfg.spec.causal and fmt == "comfyui_model"
            else ""
        )
        workflow = (
            f" `{WORKFLOW_JSON}` here is a ComfyUI API-format workflow with these settings (queue it with ComfyUI's "
            "`/prompt` endpoint or load it in the UI)."
            if cfg.experts == 1
            else ""
        )
        return (
            where
            + (", one file per expert (high-noise expert_0 first)." if cfg.experts > 1 else ".")
            + f" Sample it as it was trained: a `ModelSamplingSD3` node with shift {recipe.teacher.shift} (ComfyUI's "
            f"Wan default is 8), then a `KSampler` with sampler `{sampler}`, scheduler `simple`, {steps} steps, cfg "
            f"{cfg.guidance_scale}"
            + (
                " (`lcm` takes the x0 prediction and re-noises at each step, as the student was distilled)."
                if sampler == "lcm"
                else "."
            )
            + workflow
            + causal
        )
    if fmt == "transformer":
        sub = "" if cfg.experts == 1 else ', subfolder="expert_0"'
        return "\n".join(
            [
                "```python",
                "import torch",
                "from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel",
                "",
                f'transformer = WanTransformer3DModel.from_pretrained("path/to/export/transformer"{sub}, '
                "torch_dtype=torch.bfloat16)",
                f'pipe = WanPipeline.from_pretrained("{base}", transformer=transformer, torch_dtype=torch.bfloat16)',
                *scheduler,
                call,
                "```",
            ]
        )
    return "\n".join(
        [
            "```python",
            "import torch",
            "from diffusers import WanPipeline",
            "",
            'pipe = WanPipeline.from_pretrained("path/to/export/pipeline", torch_dtype=torch.bfloat16).to("cuda")',
            call,
            "```",
        ]
    )
