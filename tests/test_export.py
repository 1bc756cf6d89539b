"""Export: every format is read back by its real client (WanPipeline / load_lora_weights) and must
reproduce the in-memory student."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file

from core.lora import merged_state_dict
from core.recipe_loader import build
from distill.config import Recipe
from distill.export import export_student, model_card
from students.sampling import sample_student, student_sampling_mode, student_sigmas
from students.student import build_student

HUB_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def recipe_for(tmp_path, pipeline_dir, formats, **student):
    return build(
        Recipe,
        {
            "output_dir": str(tmp_path / "out"),
            "data": {"vocabulary": "synth_data/vocab/wan.yaml", "num_prompts": 2},
            "teacher": {"pretrained": str(pipeline_dir), "dtype": "float32", "shift": 3.0, "num_inference_steps": 4},
            "student": {"name": "tiny_student", "kind": "lora", "lora_rank": 4, "lora_alpha": 8.0, **student},
            "method": {"name": "kd"},
            "export": {"formats": formats, "base_model": HUB_ID},
        },
    )


def trained_student(recipe, pipe, seed=0):
    """A student whose LoRA weights (A and B) are random, i.e. far from the zero init."""
    student = build_student(recipe.student, pipe.transformer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return student


def inputs(t, channels=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(t), channels, 2, 4, 4, generator=g)
    return x, torch.tensor(t), torch.randn(len(t), 6, 32, generator=g)


@torch.no_grad()
def run(transformer, x, t, ehs):
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=ehs, return_dict=False)[0]


def front_matter(readme):
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_diffusers_and_comfyui_lora_reproduce_the_student(tmp_path, tiny_pipeline_dir):
    recipe = recipe_for(tmp_path, tiny_pipeline_dir, ["diffusers_lora", "comfyui_lora"])
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    student = trained_student(recipe, pipe)
    out = export_student(recipe, student, pipe, recipe.student_dir() / "export", eval_report={"accuracy": 0.8125})
    x, t, ehs = inputs([900.0, 250.0])
    with torch.no_grad():
        want = student(x, t, ehs)

    # diffusers: keys through WanPipeline.save_lora_weights; a FRESH pipeline's load_lora_weights reproduces v.
    lora_file = out["diffusers_lora"] / "pytorch_lora_weights.safetensors"
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in load_file(lora_file)
    fresh = WanPipeline.from_pretrained(tiny_pipeline_dir)
    fresh.load_lora_weights(out["diffusers_lora"])
    assert (run(fresh.transformer, x, t, ehs) - want).abs().max() <= 1e-5

    # ComfyUI: Wan-native names + alpha, read back through diffusers' non-diffusers Wan converter, then fused.
    comfy = load_file(out["comfyui_lora"])
    assert out["comfyui_lora"].name == "tiny_student.safetensors"
    assert comfy["diffusion_model.blocks.1.cross_attn.o.alpha"].item() == 8.0
    assert comfy["diffusion_model.blocks.0.ffn.0.lora_down.weight"].shape == (4, 24)
    assert comfy["diffusion_model.blocks.0.self_attn.q.lora_up.weight"].shape == (24, 4)
    assert len(comfy) == 2 * 10 * 3  # blocks x modules x (down, up, alpha)
    fresh = WanPipeline.from_pretrained(tiny_pipeline_dir)
    fresh.load_lora_weights(out["comfyui_lora"].parent, weight_name=out["comfyui_lora"].name)
    fresh.fuse_lora()
    fused = {k.replace(".base_layer.", "."): v for k, v in fresh.transformer.state_dict().items() if ".lora_" not in k}
    merged = merged_state_dict(student.transformer, "expert_0")
    assert max((fused[k] - v).abs().max().item() for k, v in merged.items()) <= 1e-5
    assert (run(fresh.transformer, x, t, ehs) - want).abs().max() <= 1e-5

    meta, text = front_matter(out["diffusers_lora"] / "README.md")
    assert meta["library_name"] == "diffusers" and meta["base_model"] == HUB_ID
    assert {"distillation", "lora", "text-to-video"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-to-video"
    assert "load_lora_weights" in text and "0.8125" in text and "lora_rank: 4" in text
    comfy_card = (out["comfyui_lora"].parent / "README.md").read_text()
    assert "LoraLoaderModelOnly" in comfy_card
    assert (
        "`ModelSamplingSD3` node with shift 3.0" in comfy_card and "sampler `euler`, scheduler `simple`" in comfy_card
    )
    # a few-step student that re-noises between its steps samples with ComfyUI's `lcm` (x0, then fresh noise)
    few_step = recipe_for(tmp_path, tiny_pipeline_dir, ["comfyui_lora"], denoising_steps=[1000, 750, 500, 250])
    card = model_card(few_step, student, "comfyui_lora", None)
    assert "sampler `lcm`, scheduler `simple`, 4 steps, cfg 1.0" in card


def test_lora_experts_export_per_expert_and_as_a_wan22_pipeline(tmp_path, tiny_pipeline_dir):
    recipe = recipe_for(
        tmp_path,
        tiny_pipeline_dir,
        ["diffusers_lora", "comfyui_lora", "pipeline"],
        experts=2,
        expert_boundaries=[0.7],
        num_inference_steps=4,
    )
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    student = trained_student(recipe, pipe, seed=2)
    out = export_student(recipe, student, pipe, recipe.student_dir() / "export")

    # One diffusers LoRA per expert; each reproduces the student inside its own σ interval.
    assert json.loads((out["diffusers_lora"] / "experts.json").read_text())["boundaries"] == [0.7]
    for i, t in enumerate([[950.0, 700.0], [699.0, 100.0]]):
        x, tt, ehs = inputs(t)
        fresh = WanPipeline.from_pretrained(tiny_pipeline_dir)
        fresh.load_lora_weights(out["diffusers_lora"] / f"expert_{i}")
        with torch.no_grad():
            assert (run(fresh.transformer, x, tt, ehs) - student(x, tt, ehs)).abs().max() <= 1e-5
    assert sorted(p.name for p in out["comfyui_lora"].glob("*.safetensors")) == [
        "tiny_student_expert_0.safetensors",
        "tiny_student_expert_1.safetensors",
    ]

    # The pipeline folder has Wan2.2's layout and samples exactly like the student (Euler, 4 steps).
    loaded = WanPipeline.from_pretrained(out["pipeline"])
    assert loaded.transformer_2 is not None and loaded.config.boundary_ratio == 0.7
    sigmas = student_sigmas(recipe.student, recipe.teacher.shift, recipe.teacher.num_inference_steps)
    assert student_sampling_mode(recipe.student) == "euler" and len(sigmas) == 5
    assert min(sigmas[:-1]) < 0.7 < max(sigmas[:-1])  # both experts take part
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    ehs = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = loaded(
            prompt_embeds=ehs,
            height=32,
            width=32,
            num_frames=5,
            num_inference_steps=4,
            guidance_scale=1.0,
            latents=noise.clone(),
            output_type="latent",
        ).frames
        want = sample_student(student, ehs, None, noise, sigmas, mode="euler")
    assert (got - want).abs().max() <= 1e-5
    meta, _ = front_matter(out["pipeline"] / "README.md")
    assert "timestep-experts" in meta["tags"]


def test_pruned_student_exports_transformer_and_pipeline(tmp_path, tiny_pipeline_dir):
    recipe = recipe_for(
        tmp_path, tiny_pipeline_dir, ["transformer", "pipeline"], kind="pruned", keep_blocks=[1], denoising_steps=[1000]
    )
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    student = build_student(recipe.student, pipe.transformer)
    with torch.no_grad():
        student.experts[0].proj_out.bias.add_(0.25)
    out = export_student(recipe, student, pipe, recipe.student_dir() / "export")
    x, t, ehs = inputs([800.0])
    reloaded = WanTransformer3DModel.from_pretrained(out["transformer"])
    assert reloaded.config.num_layers == 1
    with torch.no_grad():
        assert (run(reloaded, x, t, ehs) - student(x, t, ehs)).abs().max() <= 1e-6
    meta, _ = front_matter(out["transformer"] / "README.md")
    assert "lora" not in meta["tags"] and "distillation" in meta["tags"]
    # A one-step (renoise) student: the pipeline's stochastic Euler scheduler returns x0 = x - σ·v.
    loaded = WanPipeline.from_pretrained(out["pipeline"])
    assert loaded.scheduler.config.stochastic_sampling
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = loaded(
            prompt_embeds=ehs[:1],
            height=32,
            width=32,
            num_frames=5,
            num_inference_steps=1,
            guidance_scale=1.0,
            latents=noise.clone(),
            output_type="latent",
        ).frames
        want = sample_student(student, ehs[:1], None, noise, student_sigmas(recipe.student, 3.0, 4))
    assert (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"export\.formats.*LoRA student"):
        export_student(
            recipe_for(tmp_path, tiny_pipeline_dir, ["transformer", "comfyui_lora"], kind="pruned", keep_blocks=[1]),
            student,
            pipe,
            tmp_path / "bad",
        )
    assert not (tmp_path / "bad").exists()


def test_pipeline_format_refuses_more_than_two_experts(tmp_path, tiny_pipeline_dir):
    recipe = recipe_for(
        tmp_path, tiny_pipeline_dir, ["diffusers_lora", "pipeline"], experts=3, expert_boundaries=[0.8, 0.4]
    )
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    student = build_student(recipe.student, pipe.transformer)
    with pytest.raises(ValueError, match=r"export\.formats: 'pipeline' holds at most 2 experts"):
        export_student(recipe, student, pipe, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_non_finite_weights_are_never_exported(tmp_path, tiny_pipeline_dir):
    recipe = recipe_for(
        tmp_path, tiny_pipeline_dir, ["transformer"], kind="pruned", keep_blocks=[1], denoising_steps=[1000]
    )
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    student = build_student(recipe.student, pipe.transformer)
    with torch.no_grad():
        student.experts[0].proj_out.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"export: 1 tensor\(s\) of student .* are not finite \(first: .*proj_out"):
        export_student(recipe, student, pipe, tmp_path / "nan_export")
    assert not (tmp_path / "nan_export").exists()


def test_a_failed_export_leaves_the_previous_folder_whole(tmp_path, tiny_pipeline_dir, monkeypatch):
    """Each format is written aside, marked COMPLETE, then renamed into place: a writer that dies half-way (a full
    disk, Ctrl-C) leaves the previous export as it was and no temp folder; a finished one replaces it whole."""
    import distill.export as export_module

    recipe = recipe_for(
        tmp_path, tiny_pipeline_dir, ["transformer"], kind="pruned", keep_blocks=[1], denoising_steps=[1000]
    )
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    student = build_student(recipe.student, pipe.transformer)
    out_dir = tmp_path / "export"
    first = export_student(recipe, student, pipe, out_dir)["transformer"]
    assert json.loads((first / "COMPLETE").read_text()) == {"format": "transformer", "student": recipe.student.name}
    before = {p.relative_to(out_dir): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}

    def dies_half_way(recipe, student, teacher_pipe, folder):
        folder.mkdir(parents=True)
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "export_transformer", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        export_student(recipe, student, pipe, out_dir)
    assert {p.relative_to(out_dir): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["transformer"]


@pytest.mark.parametrize("kind,ti2v", [("pruned", False), ("full", False), ("causal", False), ("causal", True)])
def test_comfyui_model_file_is_wan_native_and_diffusers_single_file_reads_it(
    tmp_path, tiny_pipeline_dir, tiny_ti2v_dir, kind, ti2v
):
    """The single file has the original Wan checkpoint's names with the shapes the transformer's config implies
    (what ComfyUI's model detection reads: 48 input channels for Wan2.2 TI2V-5B), and diffusers' own Wan single-file
    converter rebuilds the student."""
    extra = {"keep_blocks": [1]} if kind == "pruned" else {}
    if ti2v:
        extra["independent_first_frame"] = True
    pipeline_dir = tiny_ti2v_dir if ti2v else tiny_pipeline_dir
    recipe = recipe_for(tmp_path, pipeline_dir, ["comfyui_model"], kind=kind, denoising_steps=[1000], **extra)
    pipe = WanPipeline.from_pretrained(pipeline_dir)
    student = build_student(recipe.student, pipe.transformer)
    with torch.no_grad():
        student.experts[0].proj_out.bias.add_(0.25)
    out = export_student(recipe, student, pipe, recipe.student_dir() / "export")
    path = out["comfyui_model"]
    assert path.name == "tiny_student.safetensors"
    sd = load_file(path)
    c = student.experts[0].config
    dim = c.num_attention_heads * c.attention_head_dim
    assert sd["head.modulation"].shape == (1, 2, dim)
    assert sd["patch_embedding.weight"].shape == (dim, c.in_channels, *c.patch_size)
    assert sd["head.head.weight"].shape == (c.out_channels * c.patch_size[0] * c.patch_size[1] * c.patch_size[2], dim)
    assert sd["blocks.0.ffn.0.weight"].shape == (c.ffn_dim, dim)
    assert sd["text_embedding.0.weight"].shape == (dim, c.text_dim)
    assert sd["blocks.0.modulation"].shape == (1, 6, dim)
    assert len({k.split(".")[1] for k in sd if k.startswith("blocks.")}) == c.num_layers
    assert not any(k.startswith(("diffusion_model.", "model.")) or "attn1" in k for k in sd)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(dict(c)))
    reloaded = WanTransformer3DModel.from_single_file(str(path), config=str(tmp_path / "cfg"), local_files_only=True)
    x, t, ehs = inputs([800.0], channels=c.in_channels)
    plain = WanTransformer3DModel.from_config(dict(c))
    plain.load_state_dict(student.experts[0].state_dict())
    with torch.no_grad():  # the bidirectional transformer the file holds (a causal student's weights, no cache)
        assert (run(reloaded, x, t, ehs) - run(plain, x, t, ehs)).abs().max() <= 1e-6
    card = (path.parent / "README.md").read_text()
    assert "UNETLoader" in card and ("plain (bidirectional)" in card) == (kind == "causal")
    workflow = json.loads((path.parent / "workflow_api.json").read_text())
    assert workflow["1"]["inputs"]["unet_name"] == "tiny_student.safetensors"


def test_comfyui_workflow_samples_the_student_as_distilled(tmp_path, tiny_pipeline_dir):
    """The LoRA workflow: every link points at an existing node's output, and the sampling settings are the
    student's (4 renoise steps -> lcm, shift 3, cfg 1, the teacher's frames and size)."""
    recipe = recipe_for(tmp_path, tiny_pipeline_dir, ["comfyui_lora"], denoising_steps=[1000, 750, 500, 250])
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    out = export_student(recipe, trained_student(recipe, pipe), pipe, recipe.student_dir() / "export")
    workflow = json.loads((out["comfyui_lora"].parent / "workflow_api.json").read_text())
    links = [(v, node) for node in workflow.values() for v in node["inputs"].values() if isinstance(v, list)]
    assert links and all(v[0] in workflow and v[1] == 0 for v, _ in links)
    by_type = {node["class_type"]: node["inputs"] for node in workflow.values()}
    assert by_type["UNETLoader"]["unet_name"] == "wan2.1_t2v_1.3B_fp16.safetensors"  # HUB_ID's repackaged file
    assert by_type["LoraLoaderModelOnly"]["lora_name"] == "tiny_student.safetensors"
    assert by_type["ModelSamplingSD3"]["shift"] == 3.0
    k = by_type["KSampler"]
    assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"]) == (4, 1.0, "lcm", "simple")
    assert workflow[k["model"][0]]["class_type"] == "ModelSamplingSD3"
    assert by_type["EmptyHunyuanLatentVideo"]["length"] == recipe.teacher.num_frames
