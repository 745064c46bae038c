"""User model factories that test recipes name as `tests.helpers_models:<factory>`."""

from __future__ import annotations

from torch import nn

from kdistill.models.mlp import mlp


def five_class_mlp(
    *, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (16,)
) -> nn.Module:
    """An MLP that ignores the data's class count and always outputs 5 logits."""
    del num_classes  # the bug this factory stands for
    return mlp(input_shape=input_shape, num_classes=5, hidden=hidden)
