"""`push`: the Hub calls it makes (HfApi stubbed, nothing leaves the machine), clear errors, a failed upload
leaving the local dataset byte-identical, and the token never reaching any file or log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

import synth_data.push as push_module
from distill.config import load_recipe
from synth_data.push import PushError, push

TOKEN = "hf_NOTAREALTOKEN_7f3a9c2e"


class FakeHfApi:
    """Records the calls `push` makes; `fail_upload` makes the next upload raise like a network error."""

    instances: list[FakeHfApi] = []
    fail_upload = False

    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.calls: list[tuple[str, tuple, dict]] = []
        FakeHfApi.instances.append(self)

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/datasets/{args[0] if args else kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        if FakeHfApi.fail_upload:
            FakeHfApi.fail_upload = False
            raise ConnectionError("Connection reset by peer")
        return "commit"


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.instances, FakeHfApi.fail_upload = [], False
    monkeypatch.setattr(push_module, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return FakeHfApi


def make_dataset(tmp_path: Path, complete: bool = True, **data) -> Path:
    out = tmp_path / "out"
    ds = out / "dataset"
    (ds / "data").mkdir(parents=True)
    (ds / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 fake shard PAR1")
    (ds / "README.md").write_text("---\nconfigs: []\n---\n# card\n")
    (ds / "generation.json").write_text("{}\n")
    if complete:
        (ds / "COMPLETE").write_text('{"num_examples": 1, "num_shards": 1}\n')
    recipe = {
        "output_dir": str(out),
        "data": {"vocabulary": "v.yaml", "num_prompts": 1, **data},
        "teacher": {"pretrained": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_token_nowhere(folder: Path, caplog) -> None:
    for name, content in snapshot(folder).items():
        assert TOKEN.encode() not in content, name
    assert TOKEN not in caplog.text


def test_push_uploads_the_dataset_folder(tmp_path, fake_hub, caplog):
    recipe = load_recipe(make_dataset(tmp_path, hub_repo_id="me/tiny-synth", hub_private=False))
    with caplog.at_level(logging.DEBUG):
        url = push(recipe.data, recipe.teacher.pretrained, recipe.out)
    assert url == "https://huggingface.co/datasets/me/tiny-synth"
    (api,) = fake_hub.instances
    assert api.init_kwargs == {}  # the token is resolved by huggingface_hub from HF_TOKEN / the login
    (c_name, c_args, c_kwargs), (u_name, _, u_kwargs) = api.calls
    assert (c_name, c_args) == ("create_repo", ("me/tiny-synth",))
    assert c_kwargs == {"repo_type": "dataset", "private": False, "exist_ok": True}
    assert u_name == "upload_folder"
    assert u_kwargs["repo_id"] == "me/tiny-synth" and u_kwargs["repo_type"] == "dataset"
    assert Path(u_kwargs["folder_path"]) == tmp_path / "out" / "dataset"
    assert "token" not in c_kwargs and "token" not in u_kwargs
    assert_token_nowhere(tmp_path, caplog)


def test_failed_upload_leaves_everything_and_can_be_retried(tmp_path, fake_hub, caplog):
    recipe = load_recipe(make_dataset(tmp_path, hub_repo_id="me/tiny-synth"))
    before = snapshot(tmp_path)
    fake_hub.fail_upload = True
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(
            PushError,
            match=r"me/tiny-synth failed \(ConnectionError: "
            r"Connection reset by peer\); the local "
            r"dataset is unchanged",
        ),
    ):
        push(recipe.data, recipe.teacher.pretrained, recipe.out)
    assert snapshot(tmp_path) == before
    assert_token_nowhere(tmp_path, caplog)
    assert push_recipe(recipe) == "https://huggingface.co/datasets/me/tiny-synth"  # retry
    assert fake_hub.instances[-1].calls[0][2]["private"] is True
    assert snapshot(tmp_path) == before


def test_push_needs_a_repo_id_and_a_complete_dataset(tmp_path, fake_hub):
    with pytest.raises(ValueError, match=r"data.hub_repo_id: not set"):
        push_recipe(load_recipe(make_dataset(tmp_path / "a")))
    with pytest.raises(
        ValueError,
        match=r"dataset: not complete \(no COMPLETE marker\); run `python -m distill "
        r"generate",
    ):
        push_recipe(load_recipe(make_dataset(tmp_path / "b", complete=False, hub_repo_id="me/x")))
    assert fake_hub.instances == []  # nothing was contacted


def push_recipe(recipe) -> str:
    return push(recipe.data, recipe.teacher.pretrained, recipe.out)


# ---- through the real client, against a local server that speaks the Hub's upload API -------------------------
@pytest.fixture
def local_hub(monkeypatch):
    from huggingface_hub import constants

    from tests.hub_server import LocalHub

    with LocalHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this server is loopback
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield hub


def _check_requests(hub) -> None:
    posts = [r for r in hub.state.requests if r.method == "POST"]
    assert posts, "nothing reached the server"
    for r in posts:  # every write carries the token in its header, never in a body
        headers = {k.lower(): v for k, v in r.headers.items()}
        assert headers.get("authorization") == f"Bearer {TOKEN}", r.path
    for r in hub.state.requests:
        assert TOKEN.encode() not in r.body and TOKEN not in r.path, r.path


def test_dataset_push_through_huggingface_hub(tmp_path, local_hub, caplog):
    recipe = load_recipe(make_dataset(tmp_path, hub_repo_id="me/tiny-synth"))
    before = snapshot(tmp_path / "out" / "dataset")
    with caplog.at_level(logging.DEBUG):
        url = push_recipe(recipe)
    assert url == f"{local_hub.endpoint}/datasets/me/tiny-synth" or url.endswith("me/tiny-synth")
    assert local_hub.state.repos["me/tiny-synth"] == {"type": "dataset", "private": True}
    (commit,) = local_hub.state.commits
    assert commit["kind"] == "datasets"
    uploaded = commit["files"]
    assert uploaded == {k: v for k, v in before.items()}  # every file of the folder, byte for byte
    _check_requests(local_hub)
    assert_token_nowhere(tmp_path, caplog)


def _exported_student(tmp_path, pipeline_dir, **export):
    from diffusers import WanPipeline

    from core.recipe_loader import build
    from distill.config import Recipe
    from distill.export import export_student
    from students.student import build_student

    recipe = build(
        Recipe,
        {
            "output_dir": str(tmp_path / "out"),
            "data": {"vocabulary": "synth_data/vocab/wan.yaml", "num_prompts": 2},
            "teacher": {"pretrained": str(pipeline_dir), "dtype": "float32", "num_inference_steps": 4},
            "student": {"name": "tiny4", "kind": "lora", "lora_rank": 4, "denoising_steps": [1000, 500]},
            "method": {"name": "trajectory"},
            "export": {"formats": ["diffusers_lora", "comfyui_lora"], "hub_repo_id": "me/tiny4", **export},
        },
    )
    pipe = WanPipeline.from_pretrained(pipeline_dir)
    export_student(recipe, build_student(recipe.student, pipe.transformer), pipe, recipe.student_dir() / "export")
    return recipe


def test_student_push_uploads_the_export_card_and_recipe_in_one_commit(tmp_path, tiny_pipeline_dir, local_hub, caplog):
    from distill.hub import push_student

    recipe = _exported_student(tmp_path, tiny_pipeline_dir, hub_private=False)
    export_dir = recipe.student_dir() / "export"
    before = snapshot(tmp_path / "out")
    local_hub.state.fail_commits = 1
    with caplog.at_level(logging.DEBUG), pytest.raises(PushError, match=r"model repo me/tiny4 failed .*unchanged"):
        push_student(recipe)
    assert snapshot(tmp_path / "out") == before and local_hub.state.commits == []
    with caplog.at_level(logging.DEBUG):
        push_student(recipe)  # the rerun
    assert local_hub.state.repos["me/tiny4"] == {"type": "model", "private": False}
    (commit,) = local_hub.state.commits
    assert commit["kind"] == "models" and "tiny4" in commit["summary"]
    files = commit["files"]
    local = {k: v for k, v in snapshot(export_dir).items() if not k.endswith("COMPLETE")}
    assert {k: files[k] for k in local} == local  # every exported file, byte for byte
    assert set(files) == set(local) | {"README.md", "recipe.yaml"}
    assert files["README.md"] == (export_dir / "diffusers" / "README.md").read_bytes()
    assert files["README.md"].startswith(b"---\n") and b"library_name: diffusers" in files["README.md"]
    assert yaml.safe_load(files["recipe.yaml"])["student"]["name"] == "tiny4"
    _check_requests(local_hub)
    assert_token_nowhere(tmp_path, caplog)


def test_student_push_needs_a_repo_id_and_a_finished_export(tmp_path, tiny_pipeline_dir, local_hub):
    from distill.hub import push_student

    recipe = _exported_student(tmp_path, tiny_pipeline_dir)
    recipe.export.formats = ["diffusers_lora", "transformer"]
    with pytest.raises(ValueError, match=r"export.formats \['transformer'\] not exported"):
        push_student(recipe)
    recipe.export.hub_repo_id = None
    with pytest.raises(ValueError, match=r"export.hub_repo_id: not set"):
        push_student(recipe)
    assert local_hub.state.requests == []
