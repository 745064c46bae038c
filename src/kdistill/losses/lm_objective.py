"""The token-level objective of the tasks that predict tokens (language models,
translation): w_ce · cross-entropy + w_div · one divergence from the teacher, each
weight and the temperature following a schedule, summed over the counted tokens of a
micro-batch and computed from the student's final hidden states a chunk of tokens at a
time (`kdistill.losses.lm_cross_entropy`, `kdistill.losses.lm_chunked`), so no
(B, T, V) float32 logits exist. The task's steps choose the rows, the labels and the
teacher signal; this module only computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdistill.losses.lm_chunked import chunked_divergence
from kdistill.losses.lm_cross_entropy import chunked_cross_entropy
from kdistill.losses.table import LM_DIVERGENCES
from kdistill.recipe.causal_lm import LMLossTerm
from kdistill.schedules import ScheduleOrNumber, schedule_value


@dataclass(frozen=True)
class LMObjective:
    """w_ce · cross-entropy + w_div · divergence (either may be absent)."""

    ce_weight: ScheduleOrNumber | None = None
    divergence: LMLossTerm | None = None

    @classmethod
    def of(cls, terms: list[LMLossTerm]) -> LMObjective:
        ce = next((t.weight for t in terms if t.loss == "cross_entropy"), None)
        return cls(ce, next((t for t in terms if t.is_divergence), None))

    @property
    def needs_teacher(self) -> bool:
        return self.divergence is not None

    def without_cross_entropy(self) -> LMObjective:
        return LMObjective(None, self.divergence)

    def at(self, progress: float) -> tuple[float, float, float]:
        """(w_ce, w_div, temperature) at training progress in [0, 1]."""
        w_ce = schedule_value(self.ce_weight, progress) if self.ce_weight is not None else 0.0
        if self.divergence is None:
            return w_ce, 0.0, 1.0
        w_div = schedule_value(self.divergence.weight, progress)
        temperature = schedule_value(self.divergence.temperature or 1.0, progress)
        return w_ce, w_div, temperature


def step_losses(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    *,
    objective: LMObjective,
    progress: float,
    teacher: dict[str, Tensor | None] | None,
    vocab_size: int,
    chunk_size: int | None,
) -> tuple[Tensor, dict[str, float]]:
    """The micro-batch's summed objective (differentiable) and its summed terms.

    hidden: the student's final hidden states (B, T, H); weight (V, H), bias (V,): its
    output layer, which turns them into logits a chunk of tokens at a time. The loop
    calls this inside the student's forward (`model(..., head_loss=...)`: a language
    model's, a translation model's decoder)."""
    w_ce, w_div, temperature = objective.at(progress)
    if objective.divergence is None:
        ce = chunked_cross_entropy(hidden, weight, bias, labels, chunk_size=chunk_size)
        return w_ce * ce, {"ce": float(ce.detach())}
    assert teacher is not None
    term = objective.divergence
    out = chunked_divergence(
        hidden,
        weight,
        bias,
        labels=labels,
        kind=LM_DIVERGENCES[term.loss],  # type: ignore[arg-type]
        beta=term.params.get("beta", 0.5),
        alpha=term.params.get("alpha", 0.1),
        temperature=temperature,
        vocab_size=vocab_size,
        with_cross_entropy=w_ce > 0,
        chunk_size=chunk_size,
        reduction="sum",
        **teacher,  # type: ignore[arg-type]
    )
    total = w_div * out.divergence
    parts: dict[str, float] = {term.loss: float(out.divergence.detach())}
    if out.cross_entropy is not None:
        total = total + w_ce * out.cross_entropy
        parts["ce"] = float(out.cross_entropy.detach())
    return total, parts
