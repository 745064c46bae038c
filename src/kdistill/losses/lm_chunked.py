"""`chunked_divergence`: token-level distillation losses for causal language models,
computed in token chunks.

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

Conventions (distributions, alignment, masking, vocabularies, precision) and the
divergences' formulas: `kdistill.losses.lm_math`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import LossInputError
from kdistill.losses.divergences import Kind
from kdistill.losses.lm_checks import (
    _parameter_errors,
    _tensor_errors,
    _topk_value_errors,
    _vocab_errors,
)
from kdistill.losses.lm_math import (
    _compiled_divergence_sum,
    _compute_dtype,
    _divergence_sum,
    _scaled,
)
from kdistill.losses.lm_teacher import _collect_teacher, _Teacher
from kdistill.losses.logits import _POSITIVE, _UNIT

IGNORE_INDEX = -100
# chunk_size=None: as many tokens as keep one float32 (chunk × vocabulary) logits tensor
# within 128 MiB (667 tokens at GPT-2's 50,257); a chunk step holds about ten of them.
CHUNK_ELEMENTS = 2**25


class TokenLosses(NamedTuple):
    """What `chunked_divergence` returns; scalars reduced as asked."""

    divergence: Tensor  # () the divergence over counted tokens
    cross_entropy: Tensor | None  # () next-token CE over the same tokens, if asked
    num_tokens: int  # how many tokens counted (labels != -100)


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
    vocabulary range and normalisation: kdistill.losses.lm_math), with the student's logits
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
