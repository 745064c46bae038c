"""The input checks of the token losses (listed in `kdistill.losses.lm_math`).

Each returns the messages of what is wrong, in the scikit-learn template where a
parameter is out of range; the loss collects them all and raises them at once, as one
LossInputError.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from kdistill.losses.divergences import KINDS
from kdistill.losses.logits import _Interval, _range_errors

# A cache written in float16 rounds each log-probability; its top-k mass may exceed 1 by
# that much. More than this means the values are not log-probabilities at all.
_TOPK_MASS_TOLERANCE = 0.01


def _parameter_errors(
    loss: str,
    ranges: dict[str, tuple[object, _Interval]],
    kind: object,
    reduction: object | None = None,
) -> list[str]:
    errors = []
    if kind not in KINDS:
        errors.append(
            f"The 'kind' parameter of {loss} must be one of {', '.join(map(repr, KINDS))}. "
            f"Got {kind!r} instead."
        )
    errors += _range_errors(loss, ranges)
    if reduction is not None and reduction not in ("mean", "sum"):
        hint = (
            " For per-token values use token_divergence on the logits of a few tokens."
            if reduction == "none"
            else ""
        )
        errors.append(
            f"The 'reduction' parameter of {loss} must be 'mean' or 'sum'. "
            f"Got {reduction!r} instead.{hint}"
        )
    return errors


def _tensor_errors(
    loss: str, name: str, value: object, *, ndims: Sequence[int], floating: bool
) -> list[str]:
    """Type, rank and dtype of one tensor argument."""
    if not isinstance(value, Tensor):
        return [f"{loss}: {name} must be a torch.Tensor; got {type(value).__name__}."]
    if value.ndim not in ndims:
        wanted = " or ".join(f"{n}-D" for n in ndims)
        return [f"{loss}: {name} must be {wanted}; got shape {tuple(value.shape)}."]
    if floating and not value.is_floating_point():
        return [
            f"{loss}: {name} must be a floating-point tensor; got {value.dtype}. "
            "Convert it with .float()."
        ]
    if not floating and (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    ):
        return [f"{loss}: {name} must be an integer tensor; got {value.dtype}."]
    return []


def _vocab_errors(
    loss: str, vocab_size: object, student_vocab: int, teacher_vocab: int | None
) -> list[str]:
    """`vocab_size` must fit both heads."""
    if vocab_size is None:
        return []
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, numbers.Integral)
        or vocab_size < 1
    ):
        return [
            f"The 'vocab_size' parameter of {loss} must be a positive int or None. "
            f"Got {vocab_size!r} instead."
        ]
    vocab_size = int(vocab_size)
    errors = []
    if vocab_size > student_vocab:
        errors.append(
            f"{loss}: vocab_size={vocab_size} asks to compare tokens [0, {vocab_size}), but "
            f"the student's output layer has only {student_vocab} rows. Pass the student's "
            "tokenizer size (at most its vocabulary), or resize the student's embeddings "
            "with model.resize_token_embeddings(len(tokenizer))."
        )
    if teacher_vocab is not None and vocab_size > teacher_vocab:
        errors.append(
            f"{loss}: vocab_size={vocab_size} asks to compare tokens [0, {vocab_size}), but "
            f"the teacher's logits cover only {teacher_vocab} tokens. Pass a vocab_size of "
            f"at most {teacher_vocab}, or check that both models use the same tokenizer."
        )
    return errors


def _topk_value_errors(loss: str, topk_ids: Tensor, topk_logprobs: Tensor, vocab: int) -> list[str]:
    """Ids in [0, V), unique per row; log-probabilities whose mass is at most 1."""
    errors: list[str] = []
    if topk_ids.numel() == 0:
        return errors
    out_of_range = (topk_ids < 0) | (topk_ids >= vocab)
    if out_of_range.any():
        row, column = (int(i) for i in out_of_range.nonzero()[0])
        errors.append(
            f"{loss}: teacher_topk_ids must be token ids in [0, {vocab}) (the compared "
            f"vocabulary); got {int(topk_ids[row, column])} at row {row}, column {column}. "
            "Check that the cache was written with this tokenizer, or pass vocab_size."
        )
    ordered = topk_ids.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)  # (N,)
    if repeated.any():
        row = int(repeated.nonzero()[0, 0])
        errors.append(
            f"{loss}: teacher_topk_ids repeats a token id in row {row} "
            f"({topk_ids[row].tolist()[:16]}…); each row must list k distinct tokens, as "
            "torch.topk returns them."
        )
    logprobs = topk_logprobs.to(torch.promote_types(topk_logprobs.dtype, torch.float32))
    if logprobs.isnan().any():
        errors.append(f"{loss}: teacher_topk_logprobs contains NaN.")
    else:
        mass = logprobs.logsumexp(dim=-1).exp()  # (N,)
        if (mass > 1 + _TOPK_MASS_TOLERANCE).any():
            row = int(mass.argmax())
            errors.append(
                f"{loss}: teacher_topk_logprobs must be log-probabilities (log_softmax of the "
                f"teacher's logits at the cache temperature), whose top-k mass is at most 1; "
                f"row {row} has mass {float(mass[row]):.4g}. Were raw logits stored instead?"
            )
    return errors


def _topk_shape_errors(loss: str, topk_ids: Tensor, topk_logprobs: Tensor) -> list[str]:
    errors = []
    if topk_ids.shape != topk_logprobs.shape:
        errors.append(
            f"{loss}: teacher_topk_ids has shape {tuple(topk_ids.shape)} but "
            f"teacher_topk_logprobs has shape {tuple(topk_logprobs.shape)}; they must match."
        )
    elif topk_ids.shape[-1] == 0:
        errors.append(f"{loss}: the teacher's top-k has k = 0; it needs at least one token.")
    return errors
