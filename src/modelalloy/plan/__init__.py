"""From a config and the input headers to a list of tensor recipes, checking everything first.

- `recipes.py`: the plan as plain data (`Plan`, `TensorRecipe`, `TensorSource`, per-tensor seeds).
- `slices.py`: the config normalised into slices of layers, and the checks that need no tensor.
- `planner.py`: `make_plan`, every output tensor resolved against the input headers.
"""

from modelalloy.plan.planner import make_plan
from modelalloy.plan.recipes import DTYPES, Plan, TensorRecipe, TensorSource, seed_for

__all__ = ["DTYPES", "Plan", "TensorRecipe", "TensorSource", "make_plan", "seed_for"]
