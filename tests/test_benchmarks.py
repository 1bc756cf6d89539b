"""End-to-end smoke runs of the benchmark scripts at tiny size (slow: `make test-slow`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_experts_benchmark_tiny(tmp_path):
    from benchmarks.results import HEADER
    from teachers.toyworld.build import main as build

    build([str(tmp_path / "init")])  # untrained toy teacher, whatever the repo ships
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/experts.py", "--teacher", str(tmp_path / "init"), "--steps", "2",
         "--prompts", "4", "--eval-prompts", "4", "--out", str(tmp_path / "out"),
         "--results", str(tmp_path / "RESULTS.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON line on stdout
    report = json.loads(lines[0])

    assert report["benchmark"] == "experts"
    assert report["train_steps"] == 2 and report["eval_prompts"] == 4
    assert report["teacher"]["trained"] is None and report["teacher"]["path"] == str(tmp_path / "init")
    assert set(report["teacher"]["accuracy"]) >= {"all", "subject", "clothing", "props", "action", "background"}
    assert set(report["results"]) == {"1", "2", "4"}
    params = {}
    for n, entry in report["results"].items():
        assert set(entry) == {"fidelity_mse", "accuracy", "trainable_params", "jump_mse_per_sigma"}
        assert len(entry["jump_mse_per_sigma"]) == len(report["state_sigmas"]) == 4
        assert math.isfinite(entry["fidelity_mse"]) and entry["fidelity_mse"] > 0
        assert 0.0 <= entry["accuracy"]["all"] <= 1.0
        params[n] = entry["trainable_params"]
    # N LoRA experts of the same rank hold exactly N times the parameters of one
    assert params["2"] == 2 * params["1"] and params["4"] == 4 * params["1"] > 0
    mse = {n: e["fidelity_mse"] for n, e in report["results"].items()}
    assert report["ratio_mse_2_vs_1"] == pytest.approx(mse["2"] / mse["1"], rel=1e-12)
    assert report["ratio_mse_4_vs_1"] == pytest.approx(mse["4"] / mse["1"], rel=1e-12)
    assert report["expert_of_sigma"] == {"1": [0, 0, 0, 0], "2": [0, 0, 1, 1], "4": [0, 1, 2, 3]}
    # each student is trained for its own folder, with its own expert layout
    for n, bounds in report["boundaries"].items():
        meta = json.loads((tmp_path / "out" / "students" / f"experts{n}" / "final" / "student.json").read_text())
        assert meta["config"]["experts"] == int(n) and meta["config"]["expert_boundaries"] == bounds
    assert json.loads((tmp_path / "out" / "students" / "experts4" / "final" / "COMPLETE").read_text())["step"] == 2
    table = (tmp_path / "RESULTS.md").read_text()
    assert table.startswith(HEADER) and table.count("\n") == HEADER.count("\n") + 1  # header + one row
    row = table.splitlines()[-1]
    assert "benchmarks/experts.py" in row and "ratio_mse_4_vs_1" in row and "torch " in row
