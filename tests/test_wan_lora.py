"""Third-party Wan LoRA import (`core.wan_lora`): every layout, fused as ComfyUI fuses it, checked by hand and
against diffusers' own loader where diffusers reads the file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.wan_lora import LoraFile, LoraImportError, fuse_lora, native_state_dict
from teachers.tiny import tiny_transformer

# Written out by hand from the original Wan checkpoint's layout (wan/modules/model.py) and diffusers'
# WanTransformer3DModel: the test's own table, not the importer's.
NATIVE_TO_DIFFUSERS = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.1.self_attn.o": "blocks.1.attn1.to_out.0",
    "blocks.0.cross_attn.k": "blocks.0.attn2.to_k",
    "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj",
    "blocks.0.ffn.2": "blocks.0.ffn.net.2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.1


def _lightx2v_file(path, model, rank=4, alpha=2.0):
    """A LightX2V / Kijai-style file: `diffusion_model.` native names, lora_down/up + alpha on linears (head, text
    and time layers included), `.diff` on norms and modulation tables, `.diff_b` on biases."""
    params = dict(model.named_parameters())
    sd, expected = {}, {}
    for i, (native, name) in enumerate(NATIVE_TO_DIFFUSERS.items()):
        w = params[f"{name}.weight"]
        down, up = _rand(rank, w.shape[1], seed=i), _rand(w.shape[0], rank, seed=100 + i)
        sd[f"diffusion_model.{native}.lora_down.weight"] = down
        sd[f"diffusion_model.{native}.lora_up.weight"] = up
        sd[f"diffusion_model.{native}.alpha"] = torch.tensor(alpha)
        expected[f"{name}.weight"] = up @ down * (alpha / rank)
    diffs = {
        "blocks.0.norm3": "blocks.0.norm2.weight",  # Wan's norm3 (cross-attention norm) is diffusers' norm2
        "blocks.1.self_attn.norm_q": "blocks.1.attn1.norm_q.weight",
        "blocks.0.cross_attn.norm_k": "blocks.0.attn2.norm_k.weight",
        "blocks.1.modulation": "blocks.1.scale_shift_table",
        "head.modulation": "scale_shift_table",
    }
    for i, (native, name) in enumerate(diffs.items()):
        sd[f"diffusion_model.{native}.diff"] = expected[name] = _rand(*params[name].shape, seed=200 + i)
    for i, (native, name) in enumerate(
        {"head.head": "proj_out", "blocks.0.self_attn.q": "blocks.0.attn1.to_q"}.items()
    ):
        sd[f"diffusion_model.{native}.diff_b"] = expected[f"{name}.bias"] = _rand(
            *params[f"{name}.bias"].shape, seed=300 + i
        )
    save_file(sd, str(path))
    return expected


def test_lightx2v_layout_fuses_every_key_by_hand(tmp_path):
    model = tiny_transformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _lightx2v_file(tmp_path / "l.safetensors", model)
    n = fuse_lora(model, LoraFile(path=str(tmp_path / "l.safetensors"), scale=0.5))
    assert n == len(expected)
    after = model.state_dict()
    for name, value in after.items():
        want = before[name] + 0.5 * expected[name] if name in expected else before[name]
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)


def test_kohya_names_and_no_alpha_mean_scale_one(tmp_path):
    model = tiny_transformer()
    w = model.blocks[1].attn2.to_v.weight.detach().clone()
    down, up = _rand(3, w.shape[1], seed=1), _rand(w.shape[0], 3, seed=2)
    save_file(
        {
            "lora_unet_blocks_1_cross_attn_v.lora_down.weight": down,
            "lora_unet_blocks_1_cross_attn_v.lora_up.weight": up,
        },
        str(tmp_path / "k.safetensors"),
    )
    fuse_lora(model, LoraFile(path=str(tmp_path / "k.safetensors")))
    torch.testing.assert_close(model.blocks[1].attn2.to_v.weight, w + up @ down, rtol=0, atol=1e-6)


def test_conv_patch_embedding_lora(tmp_path):
    model = tiny_transformer()
    w = model.patch_embedding.weight.detach().clone()  # [out, in, 1, 2, 2]
    down = _rand(2, *w.shape[1:], seed=3)
    up = _rand(w.shape[0], 2, 1, 1, 1, seed=4)
    save_file(
        {
            "diffusion_model.patch_embedding.lora_down.weight": down,
            "diffusion_model.patch_embedding.lora_up.weight": up,
        },
        str(tmp_path / "c.safetensors"),
    )
    fuse_lora(model, LoraFile(path=str(tmp_path / "c.safetensors")))
    want = w + torch.einsum("or,rithw->oithw", up.flatten(1), down)
    torch.testing.assert_close(model.patch_embedding.weight, want, rtol=0, atol=1e-6)


def _peft_file(tmp_path, model, rank, alpha):
    """diffusers' own LoRA layout (WanPipeline.save_lora_weights) with lora_alpha != rank in its metadata."""
    from diffusers import WanPipeline
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["attn1.to_q", "attn2.to_out.0", "ffn.net.2"])
    layers = {}
    for i, name in enumerate(["blocks.0.attn1.to_q", "blocks.1.attn2.to_out.0", "blocks.1.ffn.net.2"]):
        w = model.get_submodule(name).weight
        layers[f"{name}.lora_A.weight"] = _rand(rank, w.shape[1], seed=10 + i)
        layers[f"{name}.lora_B.weight"] = _rand(w.shape[0], rank, seed=20 + i)
    WanPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=cfg.to_dict()
    )
    return tmp_path / "pytorch_lora_weights.safetensors", layers


def test_diffusers_layout_uses_metadata_alpha_like_diffusers(tmp_path, tiny_pipeline_dir):
    """Same fused weights as diffusers' `load_lora_weights` + `fuse_lora` on the pipeline."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    ours = copy.deepcopy(pipe.transformer)
    path, layers = _peft_file(tmp_path, ours, rank=4, alpha=8.0)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == 8.0  # the layout the importer must read
    fuse_lora(ours, LoraFile(path=str(path)))
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    ref = pipe.transformer.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-6, msg=name)
    a, b = layers["blocks.0.attn1.to_q.lora_A.weight"], layers["blocks.0.attn1.to_q.lora_B.weight"]
    base = WanPipeline.from_pretrained(tiny_pipeline_dir).transformer.blocks[0].attn1.to_q.weight
    torch.testing.assert_close(ours.blocks[0].attn1.to_q.weight - base, 2.0 * b @ a, rtol=0, atol=1e-6)  # 8 / 4


def test_comfyui_block_lora_matches_diffusers_converter(tmp_path, tiny_pipeline_dir):
    """Where diffusers' non-diffusers Wan converter reads a file (block linears, alpha), the fused weights agree."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir)
    ours = copy.deepcopy(pipe.transformer)
    sd = {}
    for i, native in enumerate(["blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0"]):
        name = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0"}.get(
            native, "blocks.0.ffn.net.0.proj"
        )
        w = ours.get_submodule(name).weight
        sd[f"diffusion_model.{native}.lora_down.weight"] = _rand(4, w.shape[1], seed=i)
        sd[f"diffusion_model.{native}.lora_up.weight"] = _rand(w.shape[0], 4, seed=50 + i)
        sd[f"diffusion_model.{native}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(tmp_path / "c.safetensors"))
    fuse_lora(ours, LoraFile(path=str(tmp_path / "c.safetensors"), scale=0.7))
    pipe.load_lora_weights(str(tmp_path / "c.safetensors"), adapter_name="c")
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    ref = pipe.transformer.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("sd", "match"),
    [
        (
            {"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(2, 24)},
            "block 7 does not exist: this transformer has 2 blocks",
        ),
        ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 24)}, "its up half is missing"),
        ({"diffusion_model.vace_blocks.0.q.lora_down.weight": torch.zeros(2, 24)}, "vace_blocks.0.q is no layer"),
        (
            {"diffusion_model.blocks.0.self_attn.q.lora_mid.weight": torch.zeros(2, 2)},
            "lora_mid files are not supported",
        ),
        ({"diffusion_model.blocks.0.self_attn.q.hada_w1_a": torch.zeros(2, 2)}, "LoHa, LoKr"),
        (
            {"diffusion_model.blocks.0.norm3.diff": torch.zeros(5)},
            r"gives shape \(5,\), blocks.0.norm2.weight is \(24,\)",
        ),
        ({"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0)}, "an alpha with no lora_down"),
    ],
)
def test_a_key_that_cannot_be_placed_is_named(tmp_path, sd, match):
    model = tiny_transformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraImportError, match=match) as e:
        fuse_lora(model, LoraFile(path=str(tmp_path / "bad.safetensors")))
    assert str(tmp_path / "bad.safetensors") in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-applied


def test_pickles_are_refused(tmp_path):
    (tmp_path / "l.pt").write_bytes(b"")
    with pytest.raises(LoraImportError, match=r"\.safetensors only"):
        fuse_lora(tiny_transformer(), LoraFile(path=str(tmp_path / "l.pt")))


def test_native_state_dict_names_match_wan_checkpoint():
    sd = native_state_dict(tiny_transformer())
    for key in [
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.2.bias",
        "time_projection.1.weight",
        "blocks.0.self_attn.q.weight",
        "blocks.0.self_attn.norm_q.weight",
        "blocks.1.cross_attn.o.bias",
        "blocks.1.norm3.weight",
        "blocks.1.modulation",
        "blocks.0.ffn.2.weight",
        "head.head.weight",
        "head.modulation",
    ]:
        assert key in sd, key
    assert not any("attn1" in k or "condition_embedder" in k or "proj_out" in k for k in sd)


# ---- recipe keys: teacher.lora, student.init_lora ------------------------------------------------------------
def _block_file(path, model, blocks=(0, 1), rank=4, alpha=4.0, diff=False):
    """lora_down/up on `blocks.<b>.self_attn.q` (ComfyUI names); returns {diffusers weight name: ΔW} by hand."""
    sd, expected = {}, {}
    for b in blocks:
        w = model.blocks[b].attn1.to_q.weight
        down, up = _rand(rank, w.shape[1], seed=b), _rand(w.shape[0], rank, seed=10 + b)
        sd[f"diffusion_model.blocks.{b}.self_attn.q.lora_down.weight"] = down
        sd[f"diffusion_model.blocks.{b}.self_attn.q.lora_up.weight"] = up
        sd[f"diffusion_model.blocks.{b}.self_attn.q.alpha"] = torch.tensor(alpha)
        expected[f"blocks.{b}.attn1.to_q.weight"] = up @ down * (alpha / rank)
    if diff:
        sd["diffusion_model.blocks.0.norm3.diff"] = torch.ones(model.blocks[0].norm2.weight.shape)
    save_file(sd, str(path))
    return expected


def test_teacher_lora_key_fuses_into_the_chosen_expert(tmp_path, tiny_two_expert_dir):
    from core.recipe_loader import build
    from teachers.config import TeacherConfig
    from teachers.wan import WanTeacher

    plain = WanTeacher.from_config(TeacherConfig(pretrained=str(tiny_two_expert_dir), dtype="float32")).pipe
    delta = _block_file(tmp_path / "low.safetensors", plain.transformer_2)
    cfg = build(
        TeacherConfig,
        {
            "pretrained": str(tiny_two_expert_dir),
            "dtype": "float32",
            "lora": [{"path": str(tmp_path / "low.safetensors"), "scale": 0.5, "experts": [1]}],
        },
    )
    pipe = WanTeacher.from_config(cfg).pipe
    for name, value in pipe.transformer.state_dict().items():  # the high-noise expert is untouched
        assert torch.equal(value, plain.transformer.state_dict()[name]), name
    for name, value in pipe.transformer_2.state_dict().items():
        want = plain.transformer_2.state_dict()[name] + 0.5 * delta.get(name, 0)
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)
    cfg.lora[0].experts = [2]
    with pytest.raises(LoraImportError, match=r"teacher.lora\[0\].experts: \[2\] out of range"):
        WanTeacher.from_config(cfg)
    with pytest.raises(ValueError, match="quantized"):
        TeacherConfig(pretrained="x", quantize="int8", lora=[LoraFile(path="a.safetensors")])


def test_full_and_pruned_students_start_from_a_lora(tmp_path, tiny_transformer):
    from students.config import StudentConfig
    from students.student import build_student

    teacher_sd = {k: v.clone() for k, v in tiny_transformer.state_dict().items()}
    delta = _block_file(tmp_path / "l.safetensors", tiny_transformer)
    init = [LoraFile(path=str(tmp_path / "l.safetensors"))]
    full = build_student(StudentConfig(name="f", kind="full", init_lora=init), tiny_transformer)
    for name, value in full.experts[0].state_dict().items():
        torch.testing.assert_close(value, teacher_sd[name] + delta.get(name, 0), rtol=0, atol=1e-6, msg=name)
    assert all(torch.equal(v, teacher_sd[k]) for k, v in tiny_transformer.state_dict().items())  # teacher kept
    pruned = build_student(StudentConfig(name="p", kind="pruned", keep_blocks=[1], init_lora=init), tiny_transformer)
    got = pruned.experts[0].blocks[0].attn1.to_q.weight  # the teacher's block 1, with block 1's share of the file
    want = teacher_sd["blocks.1.attn1.to_q.weight"] + delta["blocks.1.attn1.to_q.weight"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_lora_student_starts_its_adapter_from_a_file(tmp_path, tiny_transformer):
    from core.lora import fused_transformer
    from students.config import StudentConfig
    from students.student import build_student

    base = {k: v.clone() for k, v in tiny_transformer.state_dict().items()}
    delta = _block_file(tmp_path / "l.safetensors", tiny_transformer, rank=4, alpha=2.0)
    cfg = dict(name="l", kind="lora", lora_rank=4, lora_alpha=8.0, lora_target_modules=["attn1.to_q"])
    student = build_student(
        StudentConfig(**cfg, init_lora=[LoraFile(path=str(tmp_path / "l.safetensors"), scale=0.5)]),
        copy.deepcopy(tiny_transformer),
    )
    fused = fused_transformer(student.transformer, student.adapter_names[0]).state_dict()
    for name, value in fused.items():
        torch.testing.assert_close(value, base[name] + 0.5 * delta.get(name, 0), rtol=0, atol=1e-6, msg=name)
    with pytest.raises(LoraImportError, match="set student.lora_rank: 4"):
        build_student(
            StudentConfig(**{**cfg, "lora_rank": 8}, init_lora=[LoraFile(path=str(tmp_path / "l.safetensors"))]),
            copy.deepcopy(tiny_transformer),
        )
    _block_file(tmp_path / "d.safetensors", tiny_transformer, diff=True)
    with pytest.raises(LoraImportError, match="norm3.diff: a full-weight change has no place"):
        build_student(
            StudentConfig(**cfg, init_lora=[LoraFile(path=str(tmp_path / "d.safetensors"))]),
            copy.deepcopy(tiny_transformer),
        )


def test_a_changed_lora_file_changes_the_generation_fingerprint(tmp_path, tiny_transformer):
    """Same path, other weights: a dataset rendered with the old file must not take samples of the new one."""
    from synth_data.config import DataConfig
    from synth_data.generate import fingerprint
    from teachers.config import TeacherConfig

    (tmp_path / "p.jsonl").write_text("{}\n")
    _block_file(tmp_path / "l.safetensors", tiny_transformer, alpha=4.0)
    teacher = TeacherConfig(pretrained="x", lora=[LoraFile(path=str(tmp_path / "l.safetensors"))])
    first = fingerprint(DataConfig(vocabulary="toyworld", num_prompts=4), teacher, tmp_path / "p.jsonl", "")
    _block_file(tmp_path / "l.safetensors", tiny_transformer, alpha=2.0)
    second = fingerprint(DataConfig(vocabulary="toyworld", num_prompts=4), teacher, tmp_path / "p.jsonl", "")
    assert first["teacher.lora.sha256"] != second["teacher.lora.sha256"]
    assert {k: v for k, v in first.items() if k != "teacher.lora.sha256"} == {
        k: v for k, v in second.items() if k != "teacher.lora.sha256"
    }
