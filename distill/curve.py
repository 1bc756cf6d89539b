"""Plot a training run's loss curve from its tensorboard logs (e.g. the toy teacher curve in
docs/results/toyworld_teacher.md).

python -m distill.curve outputs/toyworld_teacher/students/teacher/logs teachers/toyworld/curve.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of `tag` from every event file under `logdir`, sorted by step (resumed runs join)."""
    points = {}
    for f in sorted(logdir.rglob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f))
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            points.update({e.step: e.value for e in ea.Scalars(tag)})
    return sorted(points.items())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logdir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tag", default="loss/flow_matching")
    args = p.parse_args(argv)
    points = read_scalars(args.logdir, args.tag)
    if not points:
        raise SystemExit(f"{args.logdir}: no '{args.tag}' scalars found")
    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values)
    ax.set(xlabel="optimizer step", ylabel=args.tag, yscale="log", title="toy teacher: flow-matching loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print("| step | " + args.tag + " |\n|---:|---:|")
    for s, v in points[:: max(1, len(points) // 12)] + [points[-1]]:
        print(f"| {s} | {v:.4f} |")


if __name__ == "__main__":
    main()
