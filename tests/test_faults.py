"""Faults and bad input at the CLI: each ends in one line naming the file or key and what to do, exit non-zero, and
nothing half-written (DISTILL_DEBUG=1 gives the traceback instead)."""

from __future__ import annotations

import pytest
import yaml
from test_trainer import write_recipe

from distill import cli
from distill.cli import main


def one_line_error(capsys) -> str:
    """The one `error:` line (progress bars may share stderr, each on its own line)."""
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_recipe_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"output_dir: out\n# caf\xe9\n")
    assert main(["compose", str(path)]) == 2
    err = one_line_error(capsys)
    assert str(path) in err and "not UTF-8" in err


def test_output_dir_that_is_a_file(tmp_path, tiny_pipeline_dir, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder\n")
    recipe = write_recipe(tmp_path / "r.yaml", out, tiny_pipeline_dir)
    assert main(["compose", str(recipe)]) == 2
    assert str(out) in one_line_error(capsys)
    assert out.read_text() == "not a folder\n"


def test_a_damaged_training_state_names_the_file(tmp_path, tiny_pipeline_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    state = tmp_path / "out" / "students" / "s" / "checkpoint-2" / "training_state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"step": 2, "fingerp')  # cut short by a full disk
    assert main(["train", str(recipe), "train.resume_from_checkpoint=latest"]) == 2
    err = one_line_error(capsys)
    assert f"{state}: damaged" in err and "resume from an earlier checkpoint" in err


def test_a_prompts_file_that_is_not_utf8(tmp_path, tiny_pipeline_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\nun cercle \xe9carlate\n")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        student={"kind": "full"},
        method={"name": "dmd"},
        train={"data_source": "prompts", "prompts_file": str(prompts)},
    )
    assert main(["train", str(recipe)]) == 2
    err = one_line_error(capsys)
    assert str(prompts) in err and "not UTF-8" in err
    assert not (tmp_path / "out" / "students").exists()  # failed before any model or folder


@pytest.mark.parametrize("stage, resume", [("train", True), ("compose", False)])
def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path, tiny_pipeline_dir, capsys, monkeypatch, stage, resume):
    def interrupted(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"stage_{stage}", interrupted)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", tiny_pipeline_dir)
    assert main([stage, str(recipe)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"interrupted: `{stage}` stopped") and err.count("\n") == 0
    assert ("train.resume_from_checkpoint=latest" in err) == resume


def test_debug_gives_the_traceback(tmp_path, capsys, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "f"),
                "data": {"vocabulary": "nope.yaml", "num_prompts": 2},
                "teacher": {"pretrained": "x"},
            }
        )
    )
    assert main(["compose", str(path)]) == 2
    assert "nope.yaml" in one_line_error(capsys)
    monkeypatch.setenv("DISTILL_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["compose", str(path)])


def test_a_second_generate_or_train_on_the_same_output_stops_at_once(tmp_path, tiny_pipeline_dir, capsys):
    """While one run holds the output's lock (here: this test), the same stage stops with one line and writes
    nothing; once it is released the stage runs."""
    from core.locking import exclusive

    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        data={"num_prompts": 2, "shard_size": 2, "batch_size": 2},
        train={"max_steps": 1, "ema": False, "gradient_accumulation_steps": 1},
    )
    assert main(["compose", str(recipe)]) == 0
    with exclusive(tmp_path / "out" / ".generate.lock", "test"):
        assert main(["generate", str(recipe)]) == 2
        assert "another `generate` is running on this output" in one_line_error(capsys)
        assert not (tmp_path / "out" / "dataset").exists()
    with exclusive(tmp_path / "out" / ".train-s.lock", "test"):
        assert main(["train", str(recipe)]) == 2
        assert "another `train` of student s is running" in one_line_error(capsys)
        assert not (tmp_path / "out" / "students").exists()
    assert main(["generate", str(recipe)]) == 0


def test_a_teacher_folder_without_its_vae(tmp_path, tiny_pipeline_dir, capsys):
    import shutil

    broken = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, broken)
    shutil.rmtree(broken / "vae")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", broken, data={"num_prompts": 2, "shard_size": 2})
    assert main(["compose", str(recipe)]) == 0
    assert main(["generate", str(recipe)]) == 2
    assert "has no vae/ folder though its model_index.json lists it" in one_line_error(capsys)
    assert not list((tmp_path / "out").glob("dataset/data/*"))


def test_a_hub_id_that_cannot_be_reached(tmp_path, tiny_pipeline_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        data={"num_prompts": 2, "shard_size": 2},
        teacher={"pretrained": "no-such-org/no-such-model"},
    )
    assert main(["compose", str(recipe)]) == 0
    assert main(["generate", str(recipe)]) == 2
    assert "no-such-org/no-such-model" in one_line_error(capsys)


def test_a_full_disk_during_generate_keeps_no_partial_file(tmp_path, tiny_pipeline_dir, capsys, monkeypatch):
    import errno

    import synth_data.generate as generate_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        tiny_pipeline_dir,
        data={"num_prompts": 2, "shard_size": 2, "batch_size": 2},
    )
    assert main(["compose", str(recipe)]) == 0
    monkeypatch.setattr(generate_module, "write_parquet", full)
    assert main(["generate", str(recipe)]) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert not [p for p in (tmp_path / "out" / "dataset").rglob("*") if p.suffix in (".parquet", ".tmp")]
    monkeypatch.undo()
    assert main(["generate", str(recipe)]) == 0  # the rerun completes
