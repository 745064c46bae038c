"""The classification teacher's logits cache: its folder and `kdistill cache`, which
runs the trained teacher once over the training rows the distill stage reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdistill.cache import open_cache, write_cache
from kdistill.checkpoint import (
    file_sha256,
    load_weights,
)
from kdistill.data import build as build_data
from kdistill.models.hf import weights_follow
from kdistill.recipe import Recipe
from kdistill.stages import (
    require_teacher,
    resolve_weights,
    run_dir_of,
    trained_teacher,
)
from kdistill.tasks.classification.models import make_model


def cache_folder(recipe: Recipe, run_dir: Path, stage: str, seed: int) -> Path:
    """Where a stage's teacher logits are cached: teacher.cache_dir when the recipe names
    one (a cache written by another run), else <run>/cache/<stage>-seed<k>."""
    assert recipe.teacher is not None
    if recipe.teacher.cache_dir is not None:
        return Path(recipe.teacher.cache_dir)
    return run_dir / "cache" / f"{stage}-seed{seed}"


def cache_teacher(
    recipe: Recipe,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the recipe's trained teacher once over the training split and store its logits."""
    teacher = require_teacher(recipe)
    run_dir = run_dir_of(recipe, output_dir)
    seed = recipe.seeds[0]
    weights = (
        resolve_weights(teacher.checkpoint)
        if teacher.checkpoint
        else trained_teacher(run_dir, seed)
    )
    # the rows the distill stage reads: with text, the transfer texts too
    bundle = build_data(recipe.data, data_dir).for_distill()
    folder = cache_folder(recipe, run_dir, "teacher", seed)
    sha = file_sha256(weights)
    if folder.exists() and not overwrite:
        open_cache(folder, teacher_sha256=sha, bundle=bundle)  # refuses a stale one
        return {"folder": str(folder), "reused": True}
    with weights_follow():
        model = make_model(bundle, teacher.model, where="teacher.model")
    load_weights(model, weights)
    manifest = write_cache(
        folder,
        model,
        bundle,
        teacher_sha256=sha,
        dtype=teacher.cache_dtype,
        batch_size=recipe.train.eval_batch_size,
    )
    return {"folder": str(folder), "reused": False, **manifest}
