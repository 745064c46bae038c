"""Model factories named by the bad recipes of this folder (resolved next to the recipe)."""

from torch import nn


def small_mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 8) -> nn.Module:
    inputs = 1
    for size in input_shape:
        inputs *= size
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, num_classes)
    )


def factory_that_raises(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    raise ValueError("the width must be even")
