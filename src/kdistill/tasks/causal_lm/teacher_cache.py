"""The causal-LM teacher's top-k cache: its settings from the recipe (`cache_spec`), its
folder, the teacher's weights, and `kdistill cache`, which writes (or finishes, or
verifies) it once so every seed's distill stage reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdistill.cache import TopKCacheSpec, write_teacher_cache
from kdistill.checkpoint import load_weights
from kdistill.recipe.causal_lm import (
    LMRecipe,
)
from kdistill.stages import (
    require_teacher,
    resolve_weights,
    run_dir_of,
    trained_teacher,
)
from kdistill.tasks.causal_lm.data import LMData, build_lm_data
from kdistill.tasks.causal_lm.models import (
    check_same_tokenizer,
    model_tokenizer,
    weights_fingerprint,
)


def teacher_checkpoint(recipe: LMRecipe) -> Path | None:
    assert recipe.teacher is not None
    if recipe.teacher.checkpoint is None:
        return None
    return resolve_weights(recipe.teacher.checkpoint)


def cache_spec(recipe: LMRecipe, data: LMData, teacher_fingerprint: str) -> TopKCacheSpec:
    assert recipe.teacher is not None
    return TopKCacheSpec(
        teacher=teacher_fingerprint,
        tokenizer=data.tokenizer_fingerprint,
        dataset=data.fingerprint,
        k=recipe.teacher.cache.top_k,
        temperature=recipe.cache_temperature(),
        seq_len=data.seq_len,
        num_sequences=len(data.train),
        vocab_size=data.vocab_size,
        encoding=recipe.teacher.cache.encoding,
        tail_samples=recipe.teacher.cache.tail_samples,
    )


def cache_folder(recipe: LMRecipe, run_dir: Path, seed: int) -> Path:
    assert recipe.teacher is not None
    if recipe.teacher.cache.dir is not None:
        return Path(recipe.teacher.cache.dir).expanduser()
    return run_dir / "cache" / f"topk-teacher-seed{seed}"


def cache_lm_teacher(
    recipe: LMRecipe,
    *,
    output_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write (or finish, or verify) the trained teacher's top-k cache of the training split.

    The teacher's weights come from teacher.checkpoint, teacher.model.path, or the run
    folder's teacher stage; the tokenizer from the run folder (or data.tokenizer.path).
    A killed job continues from its last complete shard.
    """
    teacher = require_teacher(recipe)
    run_dir = run_dir_of(recipe, output_dir)
    seed = recipe.seeds[0]
    data = build_lm_data(
        recipe.data,
        data_dir=data_dir,
        tokenizer_dir=run_dir / "tokenizer",
        may_train_tokenizer=False,
    )
    torch.manual_seed(seed)
    model = data.build_model(teacher.model, "teacher.model")
    checkpoint = teacher_checkpoint(recipe)
    if checkpoint is None and teacher.model.path is None:
        checkpoint = trained_teacher(run_dir, seed)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    check_same_tokenizer(
        model_tokenizer(teacher.model, checkpoint),
        data.tokenizer,
        where="teacher",
        role="teacher",
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = cache_spec(recipe, data, weights_fingerprint(model))
    return write_teacher_cache(
        cache_folder(recipe, run_dir, seed),
        spec,
        model.to(device),
        data.train,
        batch_size=recipe.train.eval_batch_size,
        shard_sequences=teacher.cache.shard_sequences,
        device=device,
        overwrite=overwrite,
    )
