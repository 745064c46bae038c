"""Language-model distillation: recipes with `task: causal_lm`.

    from kdistill import load_recipe
    from kdistill.tasks.causal_lm import run_lm
    recipe = load_recipe("recipes/shakespeare_gpt_small_from_gpt.yaml", ["seeds=[0]"])
    results = run_lm(recipe, output_dir="runs/shakespeare")
    print(results["gap_recovered"])

`kdistill run / validate / cache / report` dispatch here when the recipe (or the run
folder's recipe.yaml) says `task: causal_lm`. The names below are imported on first
use, so that the task module (`kdistill.tasks.causal_lm.steps`) may import this package's
modules without importing the pipeline that imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdistill.losses.lm_cross_entropy import chunked_cross_entropy
    from kdistill.recipe.causal_lm import LMRecipe
    from kdistill.tasks.causal_lm.models import CausalLM, build_causal_lm
    from kdistill.tasks.causal_lm.pipeline import run_lm
    from kdistill.tasks.causal_lm.report import collect_lm, print_lm_table, write_lm_report
    from kdistill.tasks.causal_lm.steps import LMObjective, LMSteps, evaluate_lm
    from kdistill.tasks.causal_lm.teacher_cache import cache_lm_teacher

_WHERE = {
    "CausalLM": "kdistill.tasks.causal_lm.models",
    "build_causal_lm": "kdistill.tasks.causal_lm.models",
    "cache_lm_teacher": "kdistill.tasks.causal_lm.teacher_cache",
    "run_lm": "kdistill.tasks.causal_lm.pipeline",
    "LMRecipe": "kdistill.recipe.causal_lm",
    "collect_lm": "kdistill.tasks.causal_lm.report",
    "print_lm_table": "kdistill.tasks.causal_lm.report",
    "write_lm_report": "kdistill.tasks.causal_lm.report",
    "chunked_cross_entropy": "kdistill.losses.lm_cross_entropy",
    "LMObjective": "kdistill.tasks.causal_lm.steps",
    "LMSteps": "kdistill.tasks.causal_lm.steps",
    "evaluate_lm": "kdistill.tasks.causal_lm.steps",
}

__all__ = [
    "CausalLM",
    "LMObjective",
    "LMRecipe",
    "LMSteps",
    "build_causal_lm",
    "cache_lm_teacher",
    "chunked_cross_entropy",
    "collect_lm",
    "evaluate_lm",
    "print_lm_table",
    "run_lm",
    "write_lm_report",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kdistill.tasks.causal_lm' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
