"""Shared tiny fixtures: random Wan components built from config (never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

TINY_WORDS = [
    "a",
    "an",
    "the",
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "circle",
    "square",
    "moving",
    "left",
    "right",
    "on",
    "with",
    "background",
    "black",
    "white",
    "blurry",
    "noise",
    "beside",
    "it",
]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A saved tiny random `WanPipeline` folder (Wan2.1 layout)."""
    from teachers.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_wan") / "pipeline"
    tiny_pipeline(TINY_WORDS).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_two_expert_dir(tmp_path_factory):
    """A saved tiny random two-expert `WanPipeline` folder (Wan2.2 A14B layout, boundary_ratio 0.875)."""
    from teachers.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_wan22") / "pipeline"
    tiny_pipeline(TINY_WORDS, two_experts=True).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_ti2v_dir(tmp_path_factory):
    """A saved tiny random TI2V `WanPipeline` folder (Wan2.2 TI2V-5B layout: 48-channel VAE, expand_timesteps)."""
    from teachers.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_ti2v") / "pipeline"
    tiny_pipeline(TINY_WORDS, ti2v=True).save_pretrained(path)
    return path


@pytest.fixture
def tiny_transformer():
    from teachers.tiny import tiny_transformer as build

    return build()
