"""Append one benchmark result as a row of benchmarks/RESULTS.md (command, machine, figures, ratios)."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmark results

Each row is one run of a script in `benchmarks/` (they print the same JSON). CPU figures are noisy on
shared machines: read the ratios, which compare against a baseline measured in the same run.

| date | command | machine | figures | ratios |
|---|---|---|---|---|
"""


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} / torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} x{torch.get_num_threads()} threads / torch {torch.__version__}"


def append_result(command: str, result: dict, ratio_keys: list[str], path: Path | None = None) -> None:
    """Append `result` as one row of the table at `path` (None: benchmarks/RESULTS.md), writing the header first
    when the file is new. `ratio_keys` go to the ratios column, every other key to the figures column."""
    path = RESULTS if path is None else Path(path)
    if not path.exists():
        path.write_text(HEADER)
    ratios = {k: result[k] for k in ratio_keys if k in result}
    figures = {k: v for k, v in result.items() if k not in ratios}
    row = (
        f"| {datetime.date.today()} | `{command}` | {machine()} | `{json.dumps(figures)}` | `{json.dumps(ratios)}` |\n"
    )
    with path.open("a") as f:
        f.write(row)
