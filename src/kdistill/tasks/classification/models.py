"""Building a classification recipe's models for its data: a text model with its
tokenizer, an `hf_student` from the recipe's own (untrained) teacher, the few inputs
of a dry pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdistill.data import DataBundle, TextData
from kdistill.models import build_model
from kdistill.models.hf import weights_follow
from kdistill.recipe import ModelSpec, Recipe
from kdistill.tasks.classification.prune import PRUNED_TEACHER, build_pruned


def make_model(
    data: DataBundle | TextData, spec: ModelSpec, *, where: str, teacher: nn.Module | None = None
) -> nn.Module:
    """A model for this data: text models get their tokenizer (see models/text_build.py);
    `teacher` is the source of an `hf_student` built with `location: teacher` and of a
    `pruned_teacher` (tasks/classification/prune.py)."""
    if spec.name == PRUNED_TEACHER:
        return build_pruned(data, spec, where=where, teacher=teacher)
    if data.is_text:
        from kdistill.models.text_build import build_text_model

        assert isinstance(data, TextData)
        return build_text_model(spec, data, where=where, teacher=teacher)
    return build_model(
        spec, input_shape=data.input_shape, num_classes=data.num_classes, where=where
    )


def sample_inputs(data: DataBundle | TextData, model: nn.Module, device: str | torch.device) -> Any:
    """A few training inputs for `model`, for the dry pass that sizes projectors."""
    rows = torch.arange(min(8, len(data.train)))
    if isinstance(data, TextData):
        return {k: v.to(device) for k, v in data.batch(model, "train", rows).items()}
    return data.to_input(data.train.x[rows]).to(device)


def untrained_teacher_source(
    recipe: Recipe, data: DataBundle | TextData, where: str
) -> nn.Module | None:
    """For a build that only needs shapes (plan, inspect): an untrained teacher for a
    student built from the teacher's layers (`location: teacher`), else None."""
    if where != "student.model" or not recipe.student_from_teacher:
        return None
    assert recipe.teacher is not None
    with weights_follow():
        return make_model(data, recipe.teacher.model, where="teacher.model")
