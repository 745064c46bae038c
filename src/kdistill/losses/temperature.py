"""A temperature the student's optimizer trains against the student (CTKD).

Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023
(arXiv:2211.16231), global temperature: T = low + (high − low)·sigmoid(θ), one
parameter θ. The distillation loss reaches θ through a gradient reversal layer, so one
optimizer step lowers the loss in the student's weights and raises it in θ: the
temperature moves to where the student finds the teacher hardest to match. The
reversal's strength λ follows a curriculum, 0 → `strength` along a half cosine over the
first part of training, so the task starts easy and grows harder.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times −λ backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    return _ReverseGradient.apply(x, strength)


def reversal_strength(progress: float, *, curriculum: float, strength: float) -> float:
    """λ at training progress p in [0, 1]: strength·(1 − cos(π·p/curriculum))/2 while
    p < curriculum, then strength (CTKD's cosine curriculum)."""
    if curriculum <= 0 or progress >= curriculum:
        return strength
    return strength * (1 - math.cos(math.pi * max(progress, 0.0) / curriculum)) / 2


class LearnableTemperature(nn.Module):
    """T = low + (high − low)·sigmoid(θ), trained adversarially (see the module)."""

    def __init__(self, *, low: float, high: float, start: float) -> None:
        super().__init__()
        if not low < start < high:
            raise ValueError(f"start {start} must lie strictly between low {low} and high {high}")
        self.low, self.high = low, high
        fraction = (start - low) / (high - low)
        self.theta = nn.Parameter(torch.tensor(math.log(fraction / (1 - fraction))))

    def forward(self, reversal: float) -> Tensor:
        """T as a 0-d tensor; its gradient reaches θ reversed and scaled by `reversal`."""
        return self.low + (self.high - self.low) * torch.sigmoid(
            reverse_gradient(self.theta, reversal)
        )

    @property
    def value(self) -> float:
        return float(self.low + (self.high - self.low) * torch.sigmoid(self.theta.detach()))
