"""kdistill: distill a large trained model into a small one, and measure what it kept.

Python API: `kdistill.api` has one function per `kdistill` command, with the command's
name (the CLI calls these same functions); run, validate and inspect are here too:

    import kdistill
    from kdistill import api
    recipe = kdistill.load_recipe("recipes/mnist_quick.yaml", ["train.epochs=3"])
    results = kdistill.run(recipe, output_dir="runs/quick")
    api.report("runs/quick")

A recipe's `task` (classification, the default, or causal_lm) picks its schema and
its pipeline, through the one table `kdistill.tasks.TASKS`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kdistill import api
from kdistill.api import as_recipe, distill, inspect, load_recipe, run, validate

# plan, evaluate, cache, report and recipes are kdistill.api's: kdistill.plan (and the
# others) name the modules that do the work

__all__ = [
    "__version__",
    "api",
    "as_recipe",
    "distill",
    "inspect",
    "load_recipe",
    "run",
    "validate",
]
