"""The causal language-model task: recipes with `task: causal_lm`.

    import kdistill
    recipe = kdistill.load_recipe("shakespeare_gpt_small_from_gpt", ["seeds=[0]"])
    results = kdistill.run(recipe, output_dir="runs/shakespeare")
    print(results["gap_recovered"])

- `steps.py`: `LMSteps`, what `fit` calls each step (packed corpus, pairs, seqkd rows,
  on-policy continuations), and the chunked token losses' objective;
- `pipeline.py`: `run_lm` and the stage table (teacher, baseline, seqkd, distill);
- `measure.py`: what a finished stage measures, `kdistill eval` and `inspect`;
- `teacher_cache.py`: the teacher's top-k cache and `kdistill cache`;
- `data.py`, `models.py`, `generate.py`, `seqkd.py`, `report.py`: the corpus as token
  rows, the model wrapper, sampling, the teacher's completions, the results table.

The commands reach this package through `kdistill.tasks.TASKS`. The names below are
imported on first use, so that `steps.py` may import this package's modules without
importing the pipeline that imports it.
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
