"""Fully connected classifiers, as in Hinton et al. 2015 §3 (MNIST 784-1200-1200-10)."""

from __future__ import annotations

import math

from torch import nn


def mlp(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: list[int] | tuple[int, ...] = (800, 800),
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Sequential:
    """A multilayer perceptron on flattened inputs.

    `dropout` applies after each hidden layer, `input_dropout` to the input pixels
    (Hinton's teacher used 0.5 and 0.2).
    """
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}; got {activation!r}")
    for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {p}")
    layers: list[nn.Module] = [nn.Flatten()]
    if input_dropout:
        layers.append(nn.Dropout(input_dropout))
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), acts[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
