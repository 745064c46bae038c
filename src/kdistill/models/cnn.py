"""Small convolutional classifiers."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeCun et al. 1998, with ReLU and max pooling; any image size via a 5x5 adaptive pool."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, width: int = 1) -> None:
        super().__init__()
        channels = input_shape[0] if len(input_shape) == 3 else 1
        c1, c2 = 6 * width, 16 * width
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 25, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet5(*, input_shape: tuple[int, ...], num_classes: int, width: int = 1) -> LeNet5:
    if len(input_shape) != 3:
        raise ValueError(f"lenet5 needs image inputs (C, H, W); the data gives {input_shape}")
    return LeNet5(input_shape=input_shape, num_classes=num_classes, width=width)
