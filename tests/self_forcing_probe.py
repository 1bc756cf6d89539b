"""`accelerate launch tests/self_forcing_probe.py OUT_DIR RECIPE [dotted.key=value ...]`: the trainer, recording per
rank the world size and the exit steps of every causal rollout into OUT_DIR/rank<r>.json
(tests/test_self_forcing.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distill import self_forcing, trainer


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    calls = []
    real = self_forcing.CausalRollout.__call__

    def record(self, batch):
        x0 = real(self, batch)
        calls.append(
            {
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "rank": dist.get_rank() if dist.is_initialized() else 0,
                "indices": list(batch.indices),
                "exit_steps": list(self.last_exit_steps),
                "grad": torch.is_grad_enabled(),
            }
        )
        return x0

    self_forcing.CausalRollout.__call__ = record
    code = trainer.main(argv)
    rank = calls[0]["rank"] if calls else 0
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(calls))
    return code


if __name__ == "__main__":
    sys.exit(main())
