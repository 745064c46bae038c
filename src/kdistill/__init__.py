"""kdistill: distill a large trained model into a small one, and measure what it kept.

Python API (the CLI calls these same functions):

    import kdistill
    recipe = kdistill.load_recipe("recipes/mnist_quick.yaml", ["train.epochs=3"])
    results = kdistill.distill(recipe, output_dir="runs/quick")
    print(results["gap_recovered"])

A recipe's `task` (classification, the default, or causal_lm) picks its schema and
its pipeline, through the one table `kdistill.tasks.TASKS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read a YAML recipe (a path or a shipped recipe's name), apply overrides, validate
    it with its task's schema (`kdistill.recipe.Recipe`, `kdistill.recipe.causal_lm.LMRecipe`,
    ...)."""
    from kdistill.recipe import load_recipe as load_file
    from kdistill.recipes import find_recipe

    return load_file(find_recipe(path), overrides)


def as_recipe(recipe: Any, overrides: list[str] | None = None) -> Any:
    """A validated recipe from a recipe object, a dict or a YAML path, with overrides."""
    from pydantic import BaseModel

    from kdistill.recipe import apply_overrides, validate_recipe

    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    if isinstance(recipe, dict):
        return validate_recipe(apply_overrides(recipe, overrides or []), source="recipe dict")
    if isinstance(recipe, BaseModel) and overrides:
        raw = apply_overrides(recipe.model_dump(mode="json"), overrides)
        return validate_recipe(raw, source=f"recipe {getattr(recipe, 'name', '')}")
    return recipe


def distill(
    recipe: Any,
    *,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run a recipe (a recipe object, a dict, or a YAML path) and return its results."""
    from kdistill.tasks import task_of_recipe

    recipe = as_recipe(recipe, overrides)
    return task_of_recipe(recipe).function("run")(
        recipe,
        output_dir=output_dir,
        data_dir=data_dir,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
    )


__all__ = ["__version__", "as_recipe", "distill", "load_recipe"]
