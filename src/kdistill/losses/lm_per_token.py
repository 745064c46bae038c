"""Per-token divergences over 2-D logits, one row per token: `token_divergence` against
the teacher's logits, `topk_token_divergence` against its top-k (as read from an offline
cache). The references `chunked_divergence` equals on the counted tokens; conventions
and formulas in `kdistill.losses.lm_math`.
"""

from __future__ import annotations

from torch import Tensor

from kdistill.errors import LossInputError
from kdistill.losses.divergences import Kind
from kdistill.losses.lm_checks import (
    _parameter_errors,
    _tensor_errors,
    _topk_shape_errors,
    _topk_value_errors,
    _vocab_errors,
)
from kdistill.losses.lm_math import (
    _compute_dtype,
    _dense_teacher_log_probs,
    _token_divergence,
    _topk_teacher_log_probs,
)
from kdistill.losses.logits import _POSITIVE, _UNIT


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: Kind,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token divergence between the teacher's and the student's next-token distributions.

    `kind` and the formulas (forward/reverse KL, JSD_β as in TRL, skew KL and skew
    reverse KL with α, TVD) are in kdistill.losses.lm_math; p = softmax(t[:, :V] / T),
    q = softmax(s[:, :V] / T) over the shared vocabulary [0, V), V = min(V_s, V_t) or
    `vocab_size`. Math in float32 (float64 stays float64); gradients flow into both.

    Shapes: student_logits (N, V_s), teacher_logits (N, V_t), one row per token.
    Returns (N,).
    """
    loss = "token_divergence"
    errors = _parameter_errors(
        loss,
        {"beta": (beta, _UNIT), "alpha": (alpha, _UNIT), "temperature": (temperature, _POSITIVE)},
        kind,
    )
    shape_errors = _tensor_errors(loss, "student_logits", student_logits, ndims=(2,), floating=True)
    shape_errors += _tensor_errors(
        loss, "teacher_logits", teacher_logits, ndims=(2,), floating=True
    )
    if shape_errors:
        raise LossInputError("\n".join(errors + shape_errors))
    if student_logits.shape[0] != teacher_logits.shape[0]:
        errors.append(
            f"{loss}: student_logits has {student_logits.shape[0]} rows but teacher_logits has "
            f"{teacher_logits.shape[0]}; both must hold one row per token, in the same order."
        )
    errors += _vocab_errors(loss, vocab_size, student_logits.shape[1], teacher_logits.shape[1])
    if errors:
        raise LossInputError("\n".join(errors))
    vocab = vocab_size or min(student_logits.shape[1], teacher_logits.shape[1])
    dtype = _compute_dtype(student_logits, teacher_logits)
    teacher_log_probs = _dense_teacher_log_probs(
        teacher_logits, vocab=vocab, temperature=temperature, dtype=dtype
    )
    return _token_divergence(
        student_logits.to(dtype),
        teacher_log_probs,
        None,
        kind=kind,
        beta=beta,
        alpha=alpha,
        temperature=temperature,
        vocab=vocab,
    )


def topk_token_divergence(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    kind: Kind,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token divergence against a sparse (top-k) teacher, as read from an offline cache.

    The teacher gives, per token, k distinct token ids and their log-probabilities
    log p_i, taken at the cache's temperature (they are used as given, so write the cache
    at the temperature you train with; T here scales the student only). Its remaining
    mass 1 − Σ_i p_i is implicit. Both distributions are collapsed onto k + 1 buckets:
    the k tokens, and one bucket for every other token of [0, V):

        p̃ = [p_1, …, p_k, 1 − Σ_i p_i]
        q̃ = [q_1, …, q_k, Σ_{v ∉ top-k} q_v],    q = softmax(s[:, :V] / T)

    The student's tail is a logsumexp over its non-top-k log-probabilities (no
    cancellation in 1 − Σ q_i). The teacher's tail is log(−expm1(log Σ_i p_i)); where it
    rounds to 0 or below (a float16 cache whose top-k mass rounds to 1 or above) it is
    floored at the smallest normal float of the math dtype (≈1e-38 in float32), since a
    softmax teacher never has an empty tail and a 0 would make the reverse KL infinite;
    p̃ is then renormalised to sum to 1 (a no-op up to rounding for a sound cache). The divergence of `kind` is then taken between p̃ and
    q̃. This is exact for the collapsed distributions; for the f-divergences (the KLs,
    JSD, skew KLs, TVD) it is a lower bound on the divergence of the full distributions
    (data processing inequality), reached when the teacher's tail is flat where the
    student's is. When the ids cover all of [0, V) (k = V) there is no tail bucket and
    this equals `token_divergence` on the dense logits.

    Shapes: student_logits (N, V_s); teacher_topk_ids (N, k) integer in [0, V), distinct
    per row; teacher_topk_logprobs (N, k) float. V = `vocab_size` or V_s. Returns (N,).
    """
    loss = "topk_token_divergence"
    errors = _parameter_errors(
        loss,
        {"beta": (beta, _UNIT), "alpha": (alpha, _UNIT), "temperature": (temperature, _POSITIVE)},
        kind,
    )
    shape_errors = _tensor_errors(loss, "student_logits", student_logits, ndims=(2,), floating=True)
    shape_errors += _tensor_errors(
        loss, "teacher_topk_ids", teacher_topk_ids, ndims=(2,), floating=False
    )
    shape_errors += _tensor_errors(
        loss, "teacher_topk_logprobs", teacher_topk_logprobs, ndims=(2,), floating=True
    )
    if shape_errors:
        raise LossInputError("\n".join(errors + shape_errors))
    errors += _topk_shape_errors(loss, teacher_topk_ids, teacher_topk_logprobs)
    if teacher_topk_ids.shape[0] != student_logits.shape[0]:
        errors.append(
            f"{loss}: student_logits has {student_logits.shape[0]} rows but teacher_topk_ids "
            f"has {teacher_topk_ids.shape[0]}; both must hold one row per token."
        )
    errors += _vocab_errors(loss, vocab_size, student_logits.shape[1], None)
    if errors:
        raise LossInputError("\n".join(errors))
    vocab = vocab_size or student_logits.shape[1]
    errors += _topk_value_errors(loss, teacher_topk_ids, teacher_topk_logprobs, vocab)
    if errors:
        raise LossInputError("\n".join(errors))
    dtype = _compute_dtype(student_logits, teacher_topk_logprobs)
    with_tail = teacher_topk_ids.shape[1] < vocab
    teacher_log_probs = _topk_teacher_log_probs(
        teacher_topk_logprobs, with_tail=with_tail, dtype=dtype
    )
    return _token_divergence(
        student_logits.to(dtype),
        teacher_log_probs,
        teacher_topk_ids.long(),
        kind=kind,
        beta=beta,
        alpha=alpha,
        temperature=temperature,
        vocab=vocab,
    )
