"""kdistill: distill a large trained model into a small one, and measure what it kept.

Python API (the CLI calls these same functions):

    import kdistill
    recipe = kdistill.load_recipe("recipes/mnist_quick.yaml", ["train.epochs=3"])
    results = kdistill.distill(recipe, output_dir="runs/quick")
    print(results["gap_recovered"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read a YAML recipe (a path or a shipped recipe's name), apply overrides, validate.
    A recipe with `task: causal_lm` gives a `kdistill.lm.LMRecipe`."""
    from kdistill.lm.recipe import is_lm_recipe, load_lm_recipe
    from kdistill.recipe import load_recipe as _load
    from kdistill.recipe import read_yaml
    from kdistill.recipes import find_recipe

    found = find_recipe(path)
    if found.is_file() and is_lm_recipe(read_yaml(found)):
        return load_lm_recipe(found, overrides)
    return _load(found, overrides)


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
    """Run a recipe (a Recipe, a dict, or a YAML path) and return its results."""
    from kdistill.pipeline import run
    from kdistill.recipe import Recipe, apply_overrides, validate_recipe

    lm_run = _causal_lm_run(recipe, overrides)
    if lm_run is not None:
        return lm_run(
            output_dir=output_dir,
            data_dir=data_dir,
            resume=resume,
            overwrite=overwrite,
            quiet=quiet,
        )
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
    elif isinstance(recipe, dict):
        recipe = validate_recipe(apply_overrides(recipe, overrides or []), source="recipe dict")
    elif isinstance(recipe, Recipe) and overrides:
        raw = apply_overrides(recipe.model_dump(mode="json"), overrides)
        recipe = validate_recipe(raw, source=f"recipe {recipe.name}")
    return run(
        recipe,
        output_dir=output_dir,
        data_dir=data_dir,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
    )


def _causal_lm_run(recipe: Any, overrides: list[str] | None) -> Any:
    """For a language-model recipe (`task: causal_lm`), kdistill.lm.run_lm bound to it;
    None for any other recipe."""
    import functools

    from kdistill.lm import LMRecipe, is_lm_recipe, run_lm, validate_lm_recipe
    from kdistill.recipe import apply_overrides

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
        overrides = None
    if isinstance(recipe, dict) and is_lm_recipe(recipe):
        recipe = validate_lm_recipe(apply_overrides(recipe, overrides or []), source="recipe dict")
    elif isinstance(recipe, LMRecipe) and overrides:
        raw = apply_overrides(recipe.model_dump(mode="json"), overrides)
        recipe = validate_lm_recipe(raw, source=f"recipe {recipe.name}")
    return functools.partial(run_lm, recipe) if isinstance(recipe, LMRecipe) else None


__all__ = ["__version__", "distill", "load_recipe"]
