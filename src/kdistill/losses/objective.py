"""The objective: a weighted sum of loss terms whose weights and temperatures follow schedules.

Each term names a pure loss function from `LOSSES`. What a term reads is decided by
the function's signature: `student_logits` always, `teacher_logits` and `labels`
when the function takes them. The objective returns the *sum* over the
micro-batch; the training loop divides by the global number of samples in the
optimizer step, so the gradient does not depend on how a batch is split across
accumulation steps or processes.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdistill.errors import LossInputError
from kdistill.losses.logits import LOGIT_LOSSES
from kdistill.recipe import LossTerm, as_schedule
from kdistill.schedules import schedule_value

# name -> pure function; the one table of losses a recipe may name.
LOSSES: dict[str, Callable[..., torch.Tensor]] = dict(LOGIT_LOSSES)

# Arguments the objective supplies; everything else keyword-only is a user `param`.
_SUPPLIED = {"student_logits", "teacher_logits", "labels", "temperature", "reduction"}


@functools.cache
def _signature(name: str) -> inspect.Signature:
    return inspect.signature(LOSSES[name])


def takes(name: str, argument: str) -> bool:
    return argument in _signature(name).parameters


def user_params(name: str) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in _signature(name).parameters.items() if k not in _SUPPLIED}


def check_term(term: LossTerm) -> None:
    """Validate one term against its loss function; raises ValueError (pydantic shows it)."""
    if term.loss not in LOSSES:
        hint = difflib.get_close_matches(term.loss, LOSSES, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(
            f"unknown loss {term.loss!r}{suggestion}; available: {', '.join(sorted(LOSSES))}"
        )
    allowed = user_params(term.loss)
    for key in term.params:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            listed = ", ".join(allowed) or "none"
            raise ValueError(
                f"loss {term.loss!r} has no parameter {key!r}{suggestion}; its parameters: {listed}"
            )
    low, high = as_schedule(term.weight).bounds()
    if low < 0 or not math.isfinite(high):
        raise ValueError(
            f"the weight of loss {term.loss!r} must stay in [0, inf) over training; "
            f"its schedule reaches {low if low < 0 else high}"
        )
    if term.temperature is not None:
        if not takes(term.loss, "temperature"):
            raise ValueError(f"loss {term.loss!r} takes no temperature; remove 'temperature'")
        t_low, t_high = as_schedule(term.temperature).bounds()
        if t_low <= 0 or not math.isfinite(t_high):
            raise ValueError(
                f"the temperature of loss {term.loss!r} must stay in (0, inf) over training; "
                f"its schedule reaches {t_low if t_low <= 0 else t_high}"
            )
    # Let the function judge its own parameter values on a tiny input, so the ranges
    # (beta in [0, 1], ...) are stated once, in the loss.
    probe = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]], dtype=torch.float64)
    kwargs = dict(term.params)
    if takes(term.loss, "teacher_logits"):
        kwargs["teacher_logits"] = probe.flip(1)
    if takes(term.loss, "labels"):
        kwargs["labels"] = torch.tensor([0, 2])
    if term.temperature is not None:
        kwargs["temperature"] = as_schedule(term.temperature).start or 1.0
    try:
        LOSSES[term.loss](probe, **kwargs)
    except (LossInputError, TypeError) as exc:
        raise ValueError(str(exc)) from None


@dataclass
class LossInputs:
    """What the objective may read at one step."""

    student_logits: torch.Tensor  # (B, C)
    labels: torch.Tensor | None = None  # (B,)
    teacher_logits: torch.Tensor | None = None  # (B, C)


class Objective:
    """Sum of weighted loss terms. Call with the inputs and the training progress in [0, 1].

    Returns (total, parts): `total` is the weighted sum over the micro-batch (reduction
    "sum"), `parts` the unweighted per-term sums, detached, for logging.
    """

    def __init__(self, terms: list[LossTerm]) -> None:
        if not terms:
            raise LossInputError("an objective needs at least one loss term")
        self.terms = terms
        self.names = self._unique_names(terms)
        # resolved once: __call__ runs every step
        self._weights = [as_schedule(t.weight) for t in terms]
        self._temperatures = [
            None if t.temperature is None else as_schedule(t.temperature) for t in terms
        ]
        self._reads = [(takes(t.loss, "teacher_logits"), takes(t.loss, "labels")) for t in terms]
        self.needs_teacher = any(takes(t.loss, "teacher_logits") for t in terms)
        self.needs_labels = any(takes(t.loss, "labels") for t in terms)

    @staticmethod
    def _unique_names(terms: list[LossTerm]) -> list[str]:
        names: list[str] = []
        for term in terms:
            name, k = term.loss, 2
            while name in names:
                name, k = f"{term.loss}_{k}", k + 1
            names.append(name)
        return names

    def weights(self, progress: float) -> dict[str, float]:
        return {n: schedule_value(w, progress) for n, w in zip(self.names, self._weights)}

    def __call__(
        self, inputs: LossInputs, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for name, term, weight_schedule, temperature, (reads_teacher, reads_labels) in zip(
            self.names, self.terms, self._weights, self._temperatures, self._reads
        ):
            weight = schedule_value(weight_schedule, progress)
            kwargs: dict[str, object] = dict(term.params)
            if reads_teacher:
                if inputs.teacher_logits is None:
                    raise LossInputError(f"loss {term.loss!r} needs a teacher; none was given")
                kwargs["teacher_logits"] = inputs.teacher_logits
            if reads_labels:
                kwargs["labels"] = inputs.labels
            if temperature is not None:
                kwargs["temperature"] = schedule_value(temperature, progress)
            value = LOSSES[term.loss](inputs.student_logits, reduction="sum", **kwargs)
            parts[name] = value.detach()
            if weight != 0.0:
                total = total + weight * value
        return total, parts
