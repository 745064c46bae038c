"""Token-level distillation losses for causal language models: the conventions they
share, and their per-token math, written once.

The token losses are `token_divergence` and `topk_token_divergence` over 2-D logits
(`kdistill.losses.lm_per_token`), `chunked_divergence` from hidden states and the
output layer, a chunk of tokens at a time (`kdistill.losses.lm_chunked`, its teacher's
forms in `kdistill.losses.lm_teacher`), and `chunked_cross_entropy`
(`kdistill.losses.lm_cross_entropy`); `kdistill.losses.lm_checks` checks their inputs.

Conventions shared by every token loss:

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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.divergences import divergence as _divergence


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


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32 at least: half precision loses exp/log sums; float64 stays float64."""
    dtypes = [t.dtype for t in tensors if t is not None and t.is_floating_point()]
    return functools.reduce(torch.promote_types, dtypes, torch.float32)
