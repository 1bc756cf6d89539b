"""The table of training methods: `method.name` -> its class. Everything else derives from it: the recipe's
`method` section (one sub-section per method, `distill.config.MethodConfig`), the trainer's one- or two-player loop,
which data a method needs, and how it is built.

A method is one file in `distill/` with one class that has:
- `Config`: a `@dataclass(kw_only=True)`, the recipe's `method.<name>` section;
- `two_player`: True for a critic beside the student (`generator_loss`, `critic_loss`, `trains_generator(step)`,
  and a `critic_config()` section with the critic's keys, as `distill.dmd.DMD.Config`), else one `loss(batch)`;
- `needs_trajectory`: it reads the teacher's stored ODE states; `data_free`: it can train from captions alone;
  `queries_teacher`: its loss runs the teacher while the student's graph is alive;
  `student_kinds`: the student kinds it trains (None: all);
- `from_recipe(recipe, *, teacher, student, unwrapped, critic, num_processes)`: the loss object, from pieces the
  trainer built (teacher, the prepared student, the unwrapped `Student`, the critic's callable).
Adding a method is that file plus one line below.
"""

from __future__ import annotations

from distill.dmd import DMD
from distill.flow_matching import FlowMatching
from distill.kd import KD
from distill.ode_regression import ODERegression
from distill.self_forcing import SelfForcing
from distill.trajectory import Trajectory

METHODS: dict[str, type] = {
    "flow_matching": FlowMatching,
    "kd": KD,
    "trajectory": Trajectory,
    "ode_regression": ODERegression,
    "dmd": DMD,
    "self_forcing": SelfForcing,
}

__all__ = ["METHODS"]
