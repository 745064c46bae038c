"""What `validate` checks in a causal-LM recipe beyond its schema (see
`kdistill.preflight`): data files, model configs and folders, the teacher checkpoint,
and the top-k cache against the vocabulary."""

from __future__ import annotations

from pathlib import Path

from kdistill.preflight import Problems, export_extra_problem, missing_path, weights_problem
from kdistill.recipe.causal_lm import LMModelSpec, LMRecipe


def check_lm_recipe(recipe: LMRecipe, data_dir: str | Path | None = None) -> list[str]:
    """Every problem found, one line each, naming its YAML path."""
    from kdistill.tasks.causal_lm.data import data_files

    problems = Problems()
    data = recipe.data
    if data.corpus is not None:
        problems.attempt(data_files, data.corpus, data_dir, where="data.corpus")
    if data.pairs is not None:
        problems.attempt(data_files, [data.pairs.train], data_dir, where="data.pairs.train")
        if data.pairs.val is not None:
            problems.attempt(data_files, [data.pairs.val], data_dir, where="data.pairs.val")
    tokenizer = data.tokenizer.path
    if tokenizer is not None and "/" in tokenizer.strip("/"):  # a path, not a bare hub id
        problems.add(
            missing_path("data.tokenizer.path", tokenizer, None, "tokenizer file or folder")
        )
    roles = [("teacher", recipe.teacher), ("student", recipe.student)]
    for role, section in roles:
        if section is not None:
            problems.attempt(_model, section.model, f"{role}.model")
    problems.add(export_extra_problem(recipe.stages))
    teacher = recipe.teacher
    if teacher is not None:
        problems.add(weights_problem("teacher.checkpoint", teacher.checkpoint))
        vocab = data.tokenizer.vocab_size
        if (
            "cache" in teacher.model_fields_set
            and vocab is not None
            and teacher.cache.top_k > vocab
        ):
            problems.add(
                f"teacher.cache.top_k: {teacher.cache.top_k} entries per position, more than "
                f"the vocabulary's {vocab} tokens (data.tokenizer.vocab_size); keep top_k "
                "below the vocabulary (64 to 128 is usual)"
            )
    return problems.lines


def _model(spec: LMModelSpec, where: str) -> None:
    from kdistill.models.hf import resolve_model_location
    from kdistill.tasks.causal_lm.models import config_class_of

    if spec.config is not None:
        config_class_of(spec.config, where)
    elif spec.path is not None:
        resolve_model_location(spec.path, where=f"{where}.path")
