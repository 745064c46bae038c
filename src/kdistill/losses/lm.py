"""Token-level distillation losses for causal language models, computed in token chunks.

A language model's logits are (batch × tokens × vocabulary): at 4 × 1,024 tokens and a
50k vocabulary one float32 copy is 0.8 GB, and a divergence over full logits holds
several such tensors for each model. `chunked_divergence` never builds them: it takes
the student's final hidden states and output layer (and the teacher's, or the
teacher's logits or a top-k cache), and walks the counted tokens `chunk_size` at a time.
For each chunk it computes both models' logits, the divergence, and at once the
gradient of the divergence with respect to the chunk's hidden states, the output
weight and bias (the fused approach of Liger-Kernel's linear cross-entropy, Hsu et al.,
2024, arXiv:2410.10989). The backward pass then only scales those stored gradients, so
peak memory grows with chunk_size × vocabulary, not tokens × vocabulary.

Conventions shared by every function here:

- **Distributions.** p is the teacher's distribution (q the student's) over the next
  token, p = softmax(teacher_logits / T), q = softmax(student_logits / T): the
  temperature T divides both logits. No T² factor is applied (multiply the loss by T²
  yourself for Hinton-style scaling), as in `kdistill.losses.logits`.
- **Divergences** (`kind`), per token, on log-probabilities:
    "kl"              forward KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)
    "reverse_kl"      reverse KL(q ‖ p) (MiniLLM: Gu et al., ICLR 2024)
    "jsd"             generalized JSD_β (GKD: Agarwal et al., ICLR 2024, "On-policy
                      distillation of language models: learning from self-generated
                      mistakes"), exactly TRL's `GKDTrainer.generalized_jsd_loss`:
                      m = β·p + (1 − β)·q, JSD_β = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m) for
                      0 < β < 1; β = 0 is forward KL(p ‖ q) and β = 1 is reverse
                      KL(q ‖ p), exactly (the interpolated form itself tends to 0 at both
                      ends, so the loss scale jumps there).
    "skew_kl"         KL(p ‖ α·p + (1 − α)·q) (DistiLLM: Ko et al., ICML 2024,
                      "DistiLLM: towards streamlined distillation for large language
                      models"); α = 0 is forward KL.
    "skew_reverse_kl" KL(q ‖ α·q + (1 − α)·p) (same paper); α = 0 is reverse KL.
    "tvd"             total variation ½ Σ_v |p_v − q_v| (Wen et al., ACL 2023).
  0·log 0 is taken as 0, so a teacher that gives a token probability 0 (a −inf logit,
  an empty top-k tail) contributes nothing there rather than NaN.
- **Alignment.** Hidden states and labels are already aligned: `labels[..., t]` is the
  token that position t predicts. For a causal LM whose hidden states come from
  `input_ids`, pass `hidden[:, :-1]` and `labels = input_ids[:, 1:]` (with −100 where a
  token does not count); the teacher's tensors are sliced the same way as the student's.
- **Masking and normalisation.** Tokens whose label is −100 (padding, the prompt) do not
  count and are never computed. reduction="sum" returns the sum over counted tokens;
  "mean" divides it by their number (0 when there are none, with zero gradients). For
  results that do not depend on how a batch is split over accumulation steps and
  processes, use "sum" and divide by the global number of counted tokens in the
  optimizer step.
- **Vocabularies.** Teacher and student may share a tokenizer but pad their embedding
  matrices to different sizes. Both distributions are then compared over the shared
  range [0, V) with V = min(V_student, V_teacher), or V = `vocab_size` when given (the
  tokenizer's real size, which drops padded rows), each renormalised over it: the
  softmax is taken over the first V logits only. Different tokenizers are not
  detected here; the teacher must use the student's token ids.
- **Precision.** The divergence runs in float32 for half/bfloat16 inputs and in
  float64 for float64 inputs; logits come from each model's own head in that head's
  dtype, then are cast.
- **The teacher is a constant.** Gradients flow into the student's hidden states,
  head weight and bias only, never into the teacher's tensors.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute

from kdistill.errors import LossInputError
from kdistill.losses.divergences import KINDS, Kind
from kdistill.losses.divergences import divergence as _divergence
from kdistill.losses.logits import _POSITIVE, _UNIT, _Interval, _range_errors

IGNORE_INDEX = -100
# chunk_size=None: as many tokens as keep one float32 (chunk × vocabulary) logits tensor
# within 128 MiB (667 tokens at GPT-2's 50,257); a chunk step holds about ten of them.
CHUNK_ELEMENTS = 2**25

# A cache written in float16 rounds each log-probability; its top-k mass may exceed 1 by
# that much. More than this means the values are not log-probabilities at all.
_TOPK_MASS_TOLERANCE = 0.01


class TokenLosses(NamedTuple):
    """What `chunked_divergence` returns; scalars reduced as asked."""

    divergence: Tensor  # () the divergence over counted tokens
    cross_entropy: Tensor | None  # () next-token CE over the same tokens, if asked
    num_tokens: int  # how many tokens counted (labels != -100)


# ----- the math: one place --------------------------------------------------------------


def _collapse_to_buckets(log_q: Tensor, topk_ids: Tensor, *, with_tail: bool) -> Tensor:
    """Student log-probabilities on the teacher's top-k buckets: (N, V), (N, k) -> (N, k[+1]).

    Bucket i < k is token topk_ids[:, i]; the last bucket (when with_tail) is every other
    token, log(1 − Σ_i q_i) computed as a logsumexp over those tokens, so it has no
    cancellation when the top-k mass is close to 1.
    """
    top = log_q.gather(1, topk_ids)  # (N, k)
    if not with_tail:
        return top
    rest = log_q.scatter(1, topk_ids, -math.inf).logsumexp(dim=-1, keepdim=True)  # (N, 1)
    return torch.cat([top, rest], dim=-1)


def _dense_teacher_log_probs(
    teacher_logits: Tensor, *, vocab: int, temperature: float, dtype: torch.dtype
) -> Tensor:
    """log softmax(t[:, :V] / T) in `dtype`: (N, V_t) -> (N, V)."""
    return F.log_softmax(_scaled(teacher_logits[:, :vocab].to(dtype), temperature), dim=-1)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / T, without a copy at T = 1."""
    return logits if temperature == 1 else logits / temperature


def _topk_teacher_log_probs(
    topk_logprobs: Tensor, *, with_tail: bool, dtype: torch.dtype
) -> Tensor:
    """The teacher's buckets [log p_1, …, log p_k, log(1 − Σ_i p_i)]: (N, k) -> (N, k[+1]).

    A tail that rounds to 0 or below (a half-precision cache whose top-k mass rounds to 1
    or above) is floored at the smallest normal number of `dtype`: a softmax teacher
    never has an empty tail, and an exact 0 would make the reverse KL infinite. The
    buckets are then renormalised to sum to 1, a no-op up to rounding for a sound cache.
    """
    top = topk_logprobs.to(dtype)  # (N, k)
    if with_tail:
        top_mass = top.logsumexp(dim=-1, keepdim=True).clamp(max=0.0)  # (N, 1) log Σ p_i
        tail = torch.log(-torch.expm1(top_mass))  # (N, 1) log(1 − Σ p_i)
        tail = tail.clamp(min=math.log(torch.finfo(dtype).tiny))
        top = torch.cat([top, tail], dim=-1)
    return top - top.logsumexp(dim=-1, keepdim=True)


def _token_divergence(
    student_logits: Tensor,
    teacher_log_probs: Tensor,
    topk_ids: Tensor | None,
    *,
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
    vocab: int,
) -> Tensor:
    """Per-token divergence from the student's logits (N, ≥V) and the teacher's prepared
    log-probabilities (dense (N, V) or buckets (N, k[+1]) with topk_ids (N, k)): (N,)."""
    log_q = F.log_softmax(_scaled(student_logits[:, :vocab], temperature), dim=-1)  # (N, V)
    if topk_ids is not None:
        with_tail = teacher_log_probs.shape[-1] > topk_ids.shape[-1]
        log_q = _collapse_to_buckets(log_q, topk_ids, with_tail=with_tail)  # (N, k[+1])
    return _divergence(log_q, teacher_log_probs, kind, beta=beta, alpha=alpha)


def _divergence_sum(
    student_logits: Tensor, teacher_log_probs: Tensor, topk_ids: Tensor | None, **settings
) -> Tensor:
    return _token_divergence(student_logits, teacher_log_probs, topk_ids, **settings).sum()


@functools.cache
def _compiled_divergence_sum() -> Callable[..., Tensor]:
    return torch.compile(_divergence_sum, dynamic=True)


# ----- validation ------------------------------------------------------------------------


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


# ----- per-token functions over 2-D logits ---------------------------------------------------


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
    reverse KL with α, TVD) are in the module docstring; p = softmax(t[:, :V] / T),
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


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32 at least: half precision loses exp/log sums; float64 stays float64."""
    dtypes = [t.dtype for t in tensors if t is not None and t.is_floating_point()]
    return functools.reduce(torch.promote_types, dtypes, torch.float32)


# ----- the chunked loss ----------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Plan:
    """Everything the chunked Function needs besides the differentiable inputs."""

    teacher: _Teacher
    labels: Tensor  # (n,) labels of the counted rows
    index: Tensor | None  # (n,) the counted rows among all N positions; None: all count
    kind: str
    beta: float
    alpha: float
    temperature: float
    vocab: int
    with_cross_entropy: bool
    chunk_size: int
    dtype: torch.dtype  # of the loss math
    compile: bool
    compute_grads: bool  # False under torch.no_grad()


def _is_forward_kl(plan: _Plan) -> bool:
    return plan.kind == "kl" or (plan.kind == "jsd" and plan.beta == 0)


def _forward_kl_and_grad(
    logits: Tensor, teacher_log_probs: Tensor, *, temperature: float, vocab: int
) -> tuple[Tensor, Tensor]:
    """Σ over rows of KL(p ‖ q), q = softmax(logits[:, :V] / T), and its gradient with
    respect to `logits` (c, U), in closed form: (q − p) / T on [0, V), 0 beyond.

    The same numbers as autograd through `_divergence_sum` (a test holds them to it) in
    fewer passes over the (c, V) block and without an autograd graph: forward KL is the
    default divergence, and this block is most of the loss's time at small widths.
    A teacher with zero-probability tokens gives no NaN (0·log 0 = 0).
    """
    log_q = F.log_softmax(_scaled(logits[:, :vocab], temperature), dim=-1)  # (c, V)
    p = teacher_log_probs.exp()  # (c, V)
    # KL = Σ p log p − Σ p log q. Only 0·(−inf) is NaN in the first sum (0·log 0 = 0);
    # a NaN in either model's numbers still reaches the second sum and the result.
    divergence = (p * teacher_log_probs).nansum() - (p * log_q).sum()
    grad = log_q.exp_().sub_(p)  # q − p, in log_q's storage
    if temperature != 1:
        grad.div_(temperature)
    if logits.shape[1] > vocab:  # the CE's extra columns: no divergence gradient
        grad = F.pad(grad, (0, logits.shape[1] - vocab))
    return divergence, grad


class _ChunkedLMLoss(torch.autograd.Function):
    """(counted hidden rows (n, H), head weight (V_s, H), bias (V_s,) | None) ->
    (divergence sum, cross-entropy sum), gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan):
        need_rows, need_weight, need_bias = (
            plan.compute_grads and needed for needed in ctx.needs_input_grad[:3]
        )
        need_any = need_rows or need_weight or need_bias
        outputs = 2 if plan.with_cross_entropy else 1  # slot 0: divergence, slot 1: CE
        # The CE needs the student's whole vocabulary; the divergence only [0, V).
        used = weight.shape[0] if plan.with_cross_entropy else plan.vocab
        head_weight = weight[:used]  # (U, H)
        head_bias = None if bias is None else bias[:used]
        acc = plan.dtype
        n = rows.shape[0]

        def accumulators(like: Tensor | None, needed: bool) -> list[Tensor]:
            """One gradient accumulator per output, for an input that needs a gradient."""
            if like is None or not needed:
                return []
            return [like.new_zeros(like.shape, dtype=acc) for _ in range(outputs)]

        grad_rows = accumulators(rows, need_rows)  # [(n, H)]
        grad_weight = accumulators(weight, need_weight)  # [(V_s, H)]
        grad_bias = accumulators(bias, need_bias)  # [(V_s,)]
        divergence_fn = _compiled_divergence_sum() if plan.compile else _divergence_sum
        sums = torch.zeros(2, dtype=acc, device=rows.device)

        for start in range(0, n, plan.chunk_size):
            stop = min(start + plan.chunk_size, n)
            positions = slice(start, stop) if plan.index is None else plan.index[start:stop]
            hidden = rows[start:stop]  # (c, H)
            teacher_log_probs, topk_ids = plan.teacher.chunk(
                positions, vocab=plan.vocab, temperature=plan.temperature, dtype=acc
            )
            logits = F.linear(hidden, head_weight, head_bias).to(acc)  # (c, U)
            grads = []
            if topk_ids is None and not plan.compile and _is_forward_kl(plan):
                divergence, grad_logits = _forward_kl_and_grad(
                    logits, teacher_log_probs, temperature=plan.temperature, vocab=plan.vocab
                )
                sums[0] += divergence
                if need_any:
                    grads.append(grad_logits)
                del grad_logits
            else:
                with torch.enable_grad():
                    logits.requires_grad_(need_any)
                    divergence = divergence_fn(
                        logits,
                        teacher_log_probs,
                        topk_ids,
                        kind=plan.kind,
                        beta=plan.beta,
                        alpha=plan.alpha,
                        temperature=plan.temperature,
                        vocab=plan.vocab,
                    )
                sums[0] += divergence.detach()
                if need_any:
                    grads.append(torch.autograd.grad(divergence, logits)[0])  # (c, U)
            del divergence, teacher_log_probs
            if plan.with_cross_entropy:
                logits = logits.detach()
                labels = plan.labels[start:stop, None]  # (c, 1)
                log_normaliser = logits.logsumexp(dim=-1, keepdim=True)  # (c, 1)
                sums[1] += (log_normaliser - logits.gather(1, labels)).sum()
                if need_any:
                    # d CE / d logits = softmax(logits) − onehot(label)
                    grad_ce = logits.sub_(log_normaliser).exp_()  # (c, U), reuses logits
                    grad_ce.scatter_add_(1, labels, grad_ce.new_full(labels.shape, -1.0))
                    grads.append(grad_ce)
            del logits
            for slot, grad_logits in enumerate(grads):
                if need_rows:
                    grad_rows[slot][start:stop] = grad_logits.to(weight.dtype) @ head_weight
                if need_weight:
                    grad_weight[slot][:used].addmm_(grad_logits.T, hidden.to(acc))
                if need_bias:
                    grad_bias[slot][:used] += grad_logits.sum(dim=0)
            del grads

        ctx.counts = (len(grad_rows), len(grad_weight), len(grad_bias))
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        # Saved tensors, not ctx attributes: autograd frees them after the backward pass.
        ctx.save_for_backward(*grad_rows, *grad_weight, *grad_bias)
        return sums[0], sums[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_divergence: Tensor, grad_cross_entropy: Tensor):
        scales = (grad_divergence, grad_cross_entropy)
        saved = list(ctx.saved_tensors)
        results: list[Tensor | None] = []
        for count, dtype in zip(ctx.counts, ctx.dtypes):
            stored, saved = saved[:count], saved[count:]
            if not stored:
                results.append(None)
                continue
            total = stored[0] * scales[0]
            for grad, scale in zip(stored[1:], scales[1:]):
                total.addcmul_(grad, scale)
            results.append(total.to(dtype))
        return results[0], results[1], results[2], None


def chunked_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Σ over counted tokens of −log softmax(h Wᵀ + b)[label], in float32.

    The logits of `chunk_size` tokens exist at a time; each chunk's are recomputed in
    the backward pass (activation checkpointing) instead of being kept. Shapes: hidden
    (B, T, H), labels (B, T) with -100 where a token does not count. Returns ().
    """
    rows = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1)  # (N,)
    counted = flat_labels != IGNORE_INDEX
    if not counted.all():
        rows, flat_labels = rows[counted], flat_labels[counted]
    if len(flat_labels) == 0:
        return hidden.sum().float() * 0.0  # zero, with zero gradients
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // head_weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(flat_labels), chunk):
        piece = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + recompute(
                _cross_entropy_sum,
                rows[piece],
                head_weight,
                head_bias,
                flat_labels[piece],
                use_reentrant=False,
            )
        else:
            total = total + _cross_entropy_sum(
                rows[piece], head_weight, head_bias, flat_labels[piece]
            )
    return total


def _cross_entropy_sum(rows: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    logits = F.linear(rows.to(weight.dtype), weight, bias).float()  # (c, V)
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_divergence(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    student_head_bias: Tensor | None = None,
    *,
    labels: Tensor,
    kind: Kind,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_cross_entropy: bool = False,
    chunk_size: int | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    compile: bool = False,
) -> TokenLosses:
    """Token-level divergence (and optionally next-token CE) without full logits in memory.

    Computes, over the tokens whose label is not −100, the divergence of `kind` between
    the teacher's and the student's next-token distributions (formulas, alignment,
    vocabulary range and normalisation: module docstring), with the student's logits
    s = student_hidden @ student_head_weightᵀ + student_head_bias built `chunk_size`
    tokens at a time. Equal, up to float rounding, to `token_divergence` (or
    `topk_token_divergence`) on the full logits of the counted tokens, summed or averaged;
    peak memory is O(chunk_size × V) instead of O(tokens × V). chunk_size=None takes
    CHUNK_ELEMENTS // V_s tokens per chunk (667 at a 50,257 vocabulary), so that one
    float32 chunk of logits stays within 128 MiB; a chunk step holds about ten such
    tensors (fewer for the KLs, more for the mixtures).

    The teacher comes in exactly one of three forms:
      - live: teacher_hidden (same leading shape, its own width H_t) and
        teacher_head_weight (V_t, H_t), optional teacher_head_bias (V_t,);
      - dense logits: teacher_logits (…, V_t), any float dtype (a cache in float16 is
        fine; rows are cast chunk by chunk);
      - sparse: teacher_topk_ids (…, k) and teacher_topk_logprobs (…, k), compared on
        k + 1 buckets as `topk_token_divergence` documents (V = vocab_size or V_s).

    with_cross_entropy=True also returns the student's next-token cross-entropy
    −log softmax(s)[label] at temperature 1 over its whole head (the model's own LM
    loss), from the same logits, so they are computed once. Both outputs take gradients:
    backpropagate any weighted sum of them.

    Gradients are computed in the forward pass (the backward pass scales them), for the
    student's hidden states, head weight and bias only. Under torch.no_grad() no
    gradient work is done. compile=True runs the per-chunk divergence through
    torch.compile (the first call compiles).

    Shapes: student_hidden (B, T, H) or (N, H); labels (B, T) or (N,), integer, −100 or a
    token id in [0, V_s); student_head_weight (V_s, H); student_head_bias (V_s,) or None.
    Returns TokenLosses(divergence, cross_entropy or None, num_tokens): scalars in the
    loss math dtype (float32 for half inputs) reduced by `reduction` ("sum" or "mean").
    """
    loss = "chunked_divergence"
    errors = _parameter_errors(
        loss,
        {"beta": (beta, _UNIT), "alpha": (alpha, _UNIT), "temperature": (temperature, _POSITIVE)},
        kind,
        reduction,
    )
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or chunk_size < 1
    ):
        errors.append(
            f"The 'chunk_size' parameter of {loss} must be a positive int (tokens per chunk) or None. "
            f"Got {chunk_size!r} instead."
        )
    errors += _tensor_errors(loss, "student_hidden", student_hidden, ndims=(2, 3), floating=True)
    errors += _tensor_errors(
        loss, "student_head_weight", student_head_weight, ndims=(2,), floating=True
    )
    if student_head_bias is not None:
        errors += _tensor_errors(
            loss, "student_head_bias", student_head_bias, ndims=(1,), floating=True
        )
    errors += _tensor_errors(loss, "labels", labels, ndims=(1, 2), floating=False)
    teacher, teacher_vocab, teacher_errors = _collect_teacher(
        loss,
        hidden=teacher_hidden,
        weight=teacher_head_weight,
        bias=teacher_head_bias,
        logits=teacher_logits,
        topk_ids=teacher_topk_ids,
        topk_logprobs=teacher_topk_logprobs,
    )
    errors += teacher_errors
    if errors:
        raise LossInputError("\n".join(errors))

    leading = tuple(student_hidden.shape[:-1])
    hidden_size = student_hidden.shape[-1]
    student_vocab = student_head_weight.shape[0]
    if student_head_weight.shape[1] != hidden_size:
        errors.append(
            f"{loss}: student_head_weight has shape {tuple(student_head_weight.shape)} but "
            f"student_hidden has width {hidden_size}; the head must be (vocabulary, {hidden_size}) "
            "(pass model.get_output_embeddings().weight)."
        )
    if student_head_bias is not None and student_head_bias.shape != (student_vocab,):
        errors.append(
            f"{loss}: student_head_bias has shape {tuple(student_head_bias.shape)}; it must be "
            f"({student_vocab},), one value per row of student_head_weight."
        )
    if tuple(labels.shape) != leading:
        errors.append(
            f"{loss}: labels has shape {tuple(labels.shape)} but student_hidden has shape "
            f"{tuple(student_hidden.shape)}; labels must be {leading}, one per position, "
            "already aligned (labels[..., t] is the token position t predicts)."
        )
    for name, tensor in teacher.positional():
        if tuple(tensor.shape[:-1]) != leading:
            errors.append(
                f"{loss}: {name} has shape {tuple(tensor.shape)} but student_hidden has shape "
                f"{tuple(student_hidden.shape)}; the teacher needs the same positions "
                f"{leading}, aligned and sliced like the student's."
            )
    errors += _vocab_errors(loss, vocab_size, student_vocab, teacher_vocab)
    if errors:
        raise LossInputError("\n".join(errors))

    flat_labels = labels.reshape(-1)  # (N,)
    counted = flat_labels != IGNORE_INDEX  # (N,)
    bad = counted & ((flat_labels < 0) | (flat_labels >= student_vocab))
    if bad.any():
        position = int(bad.nonzero()[0, 0])
        errors.append(
            f"{loss}: labels must be {IGNORE_INDEX} (not counted) or token ids in "
            f"[0, {student_vocab}); got {int(flat_labels[position])} at flat position {position}."
        )
    vocab = int(vocab_size or min(student_vocab, teacher_vocab or student_vocab))
    num_tokens = int(counted.sum())
    index = None if num_tokens == counted.numel() else counted.nonzero().squeeze(1)  # (n,)
    if teacher.topk_ids is not None and teacher.topk_logprobs is not None:
        ids = teacher.topk_ids.reshape(-1, teacher.topk_ids.shape[-1])  # (N, k)
        logprobs = teacher.topk_logprobs.reshape(-1, teacher.topk_logprobs.shape[-1])  # (N, k)
        if index is not None:
            ids, logprobs = ids.index_select(0, index), logprobs.index_select(0, index)
        errors += _topk_value_errors(loss, ids, logprobs, vocab)
    if errors:
        raise LossInputError("\n".join(errors))

    flat_hidden = student_hidden.reshape(-1, hidden_size)  # (N, H)
    rows = flat_hidden if index is None else flat_hidden.index_select(0, index)  # (n, H)
    plan = _Plan(
        teacher=teacher.flattened(),
        labels=flat_labels if index is None else flat_labels.index_select(0, index),
        index=index,
        kind=kind,
        beta=float(beta),
        alpha=float(alpha),
        temperature=float(temperature),
        vocab=vocab,
        with_cross_entropy=with_cross_entropy,
        chunk_size=int(chunk_size or max(1, CHUNK_ELEMENTS // max(vocab, student_vocab))),
        dtype=_compute_dtype(student_hidden, student_head_weight, *teacher.floating()),
        compile=compile,
        compute_grads=torch.is_grad_enabled(),
    )
    divergence, cross_entropy = _ChunkedLMLoss.apply(
        rows, student_head_weight, student_head_bias, plan
    )
    if reduction == "mean":
        divergence = divergence / max(num_tokens, 1)
        cross_entropy = cross_entropy / max(num_tokens, 1)
    return TokenLosses(divergence, cross_entropy if with_cross_entropy else None, num_tokens)


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
