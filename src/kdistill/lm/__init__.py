"""Language-model distillation: recipes with `task: causal_lm`.

    from kdistill.lm import load_lm_recipe, run_lm
    recipe = load_lm_recipe("recipes/shakespeare_gpt_small_from_gpt.yaml", ["seeds=[0]"])
    results = run_lm(recipe, output_dir="runs/shakespeare")
    print(results["gap_recovered"])

`kdistill run / validate / cache / report` dispatch here when the recipe (or the run
folder's recipe.yaml) says `task: causal_lm`.
"""

from __future__ import annotations

from kdistill.lm.models import CausalLM, build_causal_lm
from kdistill.lm.pipeline import cache_lm_teacher, run_lm
from kdistill.lm.recipe import LMRecipe, is_lm_recipe, load_lm_recipe, validate_lm_recipe
from kdistill.lm.report import collect_lm, print_lm_table, write_lm_report
from kdistill.lm.train import LMObjective, chunked_cross_entropy, evaluate_lm, fit_lm

__all__ = [
    "CausalLM",
    "LMObjective",
    "LMRecipe",
    "build_causal_lm",
    "cache_lm_teacher",
    "chunked_cross_entropy",
    "collect_lm",
    "evaluate_lm",
    "fit_lm",
    "is_lm_recipe",
    "load_lm_recipe",
    "print_lm_table",
    "run_lm",
    "validate_lm_recipe",
    "write_lm_report",
]
