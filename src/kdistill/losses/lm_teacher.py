"""The teacher of `chunked_divergence`, in exactly one of three forms: live (its final
hidden states and output layer), dense logits, or a sparse top-k. `_collect_teacher`
checks which form was given and its tensors; `_Teacher` holds it flattened to one row
per position and turns the rows of a chunk into log-probabilities (`_Teacher.chunk`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.lm_checks import _tensor_errors, _topk_shape_errors
from kdistill.losses.lm_math import _dense_teacher_log_probs, _topk_teacher_log_probs


@dataclass(frozen=True)
class _Teacher:
    """The teacher in one of three forms, as flat 2-D detached tensors over all positions."""

    hidden: Tensor | None = None  # (N, H_t)
    weight: Tensor | None = None  # (V_t, H_t)
    bias: Tensor | None = None  # (V_t,)
    logits: Tensor | None = None  # (N, V_t)
    topk_ids: Tensor | None = None  # (N, k)
    topk_logprobs: Tensor | None = None  # (N, k)

    def positional(self) -> list[tuple[str, Tensor]]:
        """The per-position tensors, by argument name."""
        named = {
            "teacher_hidden": self.hidden,
            "teacher_logits": self.logits,
            "teacher_topk_ids": self.topk_ids,
            "teacher_topk_logprobs": self.topk_logprobs,
        }
        return [(name, tensor) for name, tensor in named.items() if tensor is not None]

    def floating(self) -> list[Tensor]:
        """The tensors whose dtype the loss math must keep."""
        tensors = (self.hidden, self.weight, self.logits, self.topk_logprobs)
        return [tensor for tensor in tensors if tensor is not None]

    def flattened(self) -> _Teacher:
        """Per-position tensors as (N, ·), everything detached: the teacher is a constant."""

        def flat(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.detach().reshape(-1, tensor.shape[-1])

        return _Teacher(
            hidden=flat(self.hidden),
            weight=None if self.weight is None else self.weight.detach(),
            bias=None if self.bias is None else self.bias.detach(),
            logits=flat(self.logits),
            topk_ids=flat(self.topk_ids),
            topk_logprobs=flat(self.topk_logprobs),
        )

    def chunk(
        self, rows: Tensor | slice, *, vocab: int, temperature: float, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None]:
        """Prepared log-probabilities (and top-k ids) of the given positions."""

        def take(tensor: Tensor) -> Tensor:
            return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)

        if self.topk_ids is not None and self.topk_logprobs is not None:
            ids = take(self.topk_ids).long()  # (c, k)
            with_tail = ids.shape[1] < vocab
            log_probs = _topk_teacher_log_probs(
                take(self.topk_logprobs), with_tail=with_tail, dtype=dtype
            )
            return log_probs, ids
        if self.logits is not None:
            logits = take(self.logits)  # (c, V_t)
        else:
            assert self.hidden is not None and self.weight is not None
            bias = None if self.bias is None else self.bias[:vocab]
            logits = F.linear(take(self.hidden), self.weight[:vocab], bias)  # (c, V)
        return _dense_teacher_log_probs(
            logits, vocab=vocab, temperature=temperature, dtype=dtype
        ), None


def _collect_teacher(
    loss: str,
    *,
    hidden: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    logits: Tensor | None,
    topk_ids: Tensor | None,
    topk_logprobs: Tensor | None,
) -> tuple[_Teacher, int | None, list[str]]:
    """Check that exactly one teacher form is given; flatten it. -> (teacher, V_t, errors)."""
    forms = {
        "live (teacher_hidden + teacher_head_weight)": hidden is not None or weight is not None,
        "dense (teacher_logits)": logits is not None,
        "sparse (teacher_topk_ids + teacher_topk_logprobs)": topk_ids is not None
        or topk_logprobs is not None,
    }
    given = [name for name, present in forms.items() if present]
    if len(given) != 1:
        got = ", ".join(given) if given else "none"
        return (
            _Teacher(),
            None,
            [f"{loss}: pass the teacher in exactly one form: {'; '.join(forms)}. Got {got}."],
        )
    errors: list[str] = []
    if bias is not None and weight is None:
        errors.append(f"{loss}: teacher_head_bias was given without teacher_head_weight.")
    if given[0].startswith("live"):
        if hidden is None or weight is None:
            missing = "teacher_hidden" if hidden is None else "teacher_head_weight"
            return _Teacher(), None, [*errors, f"{loss}: the live teacher needs {missing} too."]
        errors += _tensor_errors(loss, "teacher_hidden", hidden, ndims=(2, 3), floating=True)
        errors += _tensor_errors(loss, "teacher_head_weight", weight, ndims=(2,), floating=True)
        if bias is not None:
            errors += _tensor_errors(loss, "teacher_head_bias", bias, ndims=(1,), floating=True)
        if errors:
            return _Teacher(), None, errors
        if weight.shape[1] != hidden.shape[-1]:
            errors.append(
                f"{loss}: teacher_head_weight has shape {tuple(weight.shape)} but teacher_hidden "
                f"has width {hidden.shape[-1]}; the head must be (vocabulary, {hidden.shape[-1]})."
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            errors.append(
                f"{loss}: teacher_head_bias has shape {tuple(bias.shape)}; it must be "
                f"({weight.shape[0]},), one value per row of teacher_head_weight."
            )
        teacher = _Teacher(hidden=hidden, weight=weight, bias=bias)
        return teacher, weight.shape[0], errors
    if given[0].startswith("dense"):
        assert logits is not None
        errors += _tensor_errors(loss, "teacher_logits", logits, ndims=(2, 3), floating=True)
        if errors:
            return _Teacher(), None, errors
        return _Teacher(logits=logits), logits.shape[-1], errors
    if topk_ids is None or topk_logprobs is None:
        missing = "teacher_topk_ids" if topk_ids is None else "teacher_topk_logprobs"
        return _Teacher(), None, [*errors, f"{loss}: the sparse teacher needs {missing} too."]
    errors += _tensor_errors(loss, "teacher_topk_ids", topk_ids, ndims=(2, 3), floating=False)
    errors += _tensor_errors(
        loss, "teacher_topk_logprobs", topk_logprobs, ndims=(2, 3), floating=True
    )
    if not errors:
        errors += _topk_shape_errors(loss, topk_ids, topk_logprobs)
    return _Teacher(topk_ids=topk_ids, topk_logprobs=topk_logprobs), None, errors
