"""The seam between `fit` and a task: what a task hands `fit` for one stage.

A task (`tasks/<task>/steps.py`) implements `TrainSteps`: the order of the training
rows in an epoch, what a step's loss is divided by (`StepCount`: samples, or counted
tokens over all processes), a micro-batch's summed loss and its unweighted `Terms`,
and the validation score (`Validation`) with its direction. `Placement` is what the
steps read of the Accelerator (`kdistill plan` runs them without one). The seeds a
task derives its randomness from (dropout, data order, augmentation) are defined here
once, so a resumed run draws the same numbers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


def dropout_seed(seed: int, rank: int) -> int:
    """The global torch generator of process `rank` during training (dropout masks)."""
    return seed * 7919 + rank


def order_seed(seed: int, epoch: int) -> int:
    """The generator of an epoch's order of training rows, the same on every process."""
    return seed * 1009 + epoch


def augment_seed(seed: int, rank: int) -> int:
    """The generator of process `rank`'s random input augmentation."""
    return seed * 104729 + rank


# the unweighted terms of a micro-batch's loss, by name: detached 0-dim tensors or floats
Terms = Mapping[str, "torch.Tensor | float"]


@dataclass(frozen=True)
class StepCount:
    """What one optimizer step's loss is divided by: `total`, the samples or counted
    tokens of the whole step (all processes); `local`, this process's part of them, for
    the logged mean."""

    total: int
    local: int


@dataclass(frozen=True)
class Validation:
    """A validation measurement: the score that picks the best epoch, and the fields
    metrics.jsonl records (`val_accuracy`, `val_loss`, ...)."""

    score: float
    fields: dict[str, float]


class TrainSteps(Protocol):
    """What a task hands `fit` for one stage (see kdistill.tasks)."""

    unit: str  # what the loss is counted over: "samples" or "tokens"
    higher_is_better: bool  # of Validation.score
    num_rows: int  # training rows; an epoch is num_rows // batch_size steps

    def epoch_order(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """The epoch's order of training rows (N,), read `batch_size` at a time."""
        ...

    def count(self, rows: torch.Tensor, share: torch.Tensor, step: int) -> StepCount:
        """Start optimizer step `step` (counted from 0 over the whole stage) on the global
        `rows`, of which this process trains on `share`."""
        ...

    def loss(
        self, model: nn.Module, rows: torch.Tensor, *, progress: float
    ) -> tuple[torch.Tensor, Terms]:
        """The summed loss of a micro-batch of rows (differentiable, a 0-dim tensor) and
        its unweighted terms (detached tensors or floats, read only when shown); `model` is
        the prepared (maybe DDP-wrapped) model."""
        ...

    def validate(self, student: nn.Module) -> Validation | None:
        """Measure the student on the validation split; None when there is none."""
        ...

    def epoch_fields(self, units: int, seconds: float) -> dict[str, Any]:
        """The task's fields of an epoch record (throughput, counts), then reset the
        per-epoch counters; units: samples or tokens trained on so far in the stage."""
        ...

    def describe(self, label: str, epochs: int, record: dict[str, Any]) -> str:
        """The log line of a metrics record (an epoch's, or a mid-epoch validation)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume besides the model and optimizer (RNG states, counters)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Placement(Protocol):
    """Where a task's steps run: what they read of the Accelerator (which is one). `kdistill
    plan` runs the same steps on a device of its own without an Accelerator."""

    @property
    def device(self) -> torch.device: ...

    @property
    def process_index(self) -> int: ...

    @property
    def mixed_precision(self) -> str: ...

    def autocast(self) -> contextlib.AbstractContextManager[Any]: ...


def autocast_of(accelerator: Placement) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The forward pass's autocast context: Accelerate's for mixed precision; a plain
    nullcontext in float32, where Accelerate's would only rebuild its state per call."""
    if accelerator.mixed_precision == "no":
        return contextlib.nullcontext
    return accelerator.autocast


def sum_terms(parts: Sequence[Terms]) -> dict[str, float]:
    """The unweighted loss terms of a step: each micro-batch's, summed."""
    terms: dict[str, float] = {}
    for micro in parts:
        for name, value in micro.items():
            terms[name] = terms.get(name, 0.0) + float(value)
    return terms
