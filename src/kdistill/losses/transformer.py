"""Transformer feature losses: hidden states, attention maps, self-attention relations.

For BERT-style encoders distilled token by token, so the teacher and the student
must see the same tokens (one tokenizer, same padding): every input is
(batch, tokens, ·) or (batch, heads, tokens, tokens) with the same batch and
tokens. `attention_mask` is the tokenizer's (B, T) mask, 1 for real tokens and 0
for padding (None: every token is real). Padding never counts: padded positions
(hidden states), padded query rows and padded key columns (attention maps and
relations) contribute exactly 0 and get exactly zero gradient, whatever values
they hold, even NaN. A sequence with no real token contributes 0.

Every loss first computes one value per sequence, a mean over that sequence's
real tokens, then reduces over the batch: `reduction="mean"` averages the B
values, "sum" adds them (the training loop then divides by the global number of
sequences), "none" returns them, shape (B,). Math runs in float32 for half and
bfloat16 inputs (results come back as float32) and in float64 for float64.
Gradients flow into both arguments: detach the teacher's tensors (or run the
teacher under `torch.no_grad()`) to train the student alone.

Where the inputs come from, in a Hugging Face BERT-family model (names checked
with transformers 5.23):

- hidden states: `model(..., output_hidden_states=True).hidden_states`, a tuple of
  L + 1 tensors (B, T, H); index 0 is the embedding output (for `embedding_mse`),
  index i the output of layer i. When the widths differ, map the student's states
  with a learned projector (TinyBERT's W_h, e.g. `nn.Linear(H_s, H_t)`) first.
- attention maps: `model(..., output_attentions=True).attentions`, a tuple of L
  tensors (B, heads, T, T) of *probabilities* (after softmax, padding keys 0).
  HF returns them only with the eager implementation: load or build the model
  with `attn_implementation="eager"` or call `model.set_attn_implementation("eager")`.
  SDPA and flash kernels never materialise the (B, heads, T, T) matrix; with SDPA
  (the default) transformers 5.23 neither raises nor emits a Python warning: it
  logs "`sdpa` attention does not support `output_attentions=True`" once and
  returns `attentions == ()`, so code that indexes it fails later with an
  IndexError. Eager attention holds O(B · heads · T²) memory per layer and is
  slower. In training mode HF applies attention dropout to the returned maps
  (rows no longer sum to 1): set the student's `attention_probs_dropout_prob=0`
  when distilling its maps, or use the MiniLM losses on Q/K/V instead.
- queries, keys, values: forward hooks on the projections
  `encoder.layer.{i}.attention.self.query`, `.key` and `.value` (nn.Linear modules),
  whose outputs are (B, T, H) with head h in columns [h·d, (h + 1)·d), d = H / heads.
  They work with every attention implementation, so the MiniLM losses need no
  eager attention and never see attention dropout.

Which attention loss: `attention_mse` is TinyBERT's regression of the maps;
`attention_kl` compares the same maps as distributions (MiniLM); both need equal
head counts. `minilm_attention_kl` computes MiniLM's distributions from Q and K
itself (the same values as `attention_kl` on eager maps in eval mode when
`num_relation_heads` equals the models' heads), and `minilm_relation_kl`
(MiniLMv2) compares Q-Q, K-K or V-V relations with any number of relation heads,
so the teacher and the student may differ in heads and hidden size.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from kdistill.errors import LossInputError
from kdistill.losses.logits import _REDUCTIONS, Reduction, _as_float, _reduce

_LAYOUTS = {3: "(batch, tokens, hidden)", 4: "(batch, heads, tokens, tokens)"}


# ----- validation -------------------------------------------------------------------------


def _tensor_errors(loss: str, name: str, value: object, ndim: int) -> list[str]:
    if not isinstance(value, Tensor):
        return [f"{loss}: {name} must be a torch.Tensor; got {type(value).__name__}."]
    if value.ndim != ndim:
        return [
            f"{loss}: {name} must be a {ndim}-D tensor {_LAYOUTS[ndim]}; got shape "
            f"{tuple(value.shape)}."
        ]
    if not value.is_floating_point():
        return [
            f"{loss}: {name} must be a floating-point tensor; got {value.dtype}. "
            "Convert it with .float()."
        ]
    return []


def _mask_errors(loss: str, mask: object, batch: int, tokens: int) -> list[str]:
    if mask is None:
        return []
    if not isinstance(mask, Tensor):
        return [
            f"{loss}: attention_mask must be a torch.Tensor or None; got {type(mask).__name__}."
        ]
    if tuple(mask.shape) != (batch, tokens):
        return [
            f"{loss}: attention_mask has shape {tuple(mask.shape)} but the inputs are "
            f"(batch, tokens) = ({batch}, {tokens}); pass the tokenizer's (batch, tokens) mask "
            "of 1 for real tokens and 0 for padding, not the (batch, 1, 1, tokens) additive "
            "mask a model builds from it."
        ]
    if mask.dtype == torch.bool:
        return []
    bad = (mask != 0) & (mask != 1)  # (B, T)
    if not bad.any():
        return []
    row, column = (int(i) for i in bad.nonzero()[0])
    return [
        f"{loss}: attention_mask must hold 1 for real tokens and 0 for padding; got "
        f"{mask[row, column].item()!r} at (batch {row}, token {column})."
    ]


def _relation_head_count_errors(loss: str, num_relation_heads: object) -> list[str]:
    if (
        isinstance(num_relation_heads, bool)
        or not isinstance(num_relation_heads, numbers.Integral)
        or num_relation_heads < 1
    ):
        return [
            f"The 'num_relation_heads' parameter of {loss} must be a positive int. "
            f"Got {num_relation_heads!r} instead."
        ]
    return []


def _relation_width_errors(
    loss: str, tensors: Mapping[str, Tensor], num_relation_heads: int
) -> list[str]:
    widths = {name: int(x.shape[-1]) for name, x in tensors.items()}
    undivided = {name: width for name, width in widths.items() if width % num_relation_heads}
    if not undivided:
        return []
    listed = ", ".join(f"{name} has width {width}" for name, width in undivided.items())
    all_widths = sorted(set(widths.values()))
    common = math.gcd(*all_widths)
    choices = [d for d in range(1, common + 1) if common % d == 0]
    return [
        f"{loss}: num_relation_heads={num_relation_heads} must divide every hidden width, "
        f"but {listed}. Choose a number of relation heads that divides "
        f"{' and '.join(map(str, all_widths))}: one of {choices}."
    ]


def _validate(
    loss: str,
    tensors: Mapping[str, Tensor],
    attention_mask: Tensor | None,
    *,
    reduction: str,
    ndim: Literal[3, 4],
    same_width: bool = False,
    same_shape_pairs: tuple[tuple[str, str], ...] = (),
    num_relation_heads: object = None,
) -> Tensor:
    """Check every input of `loss`, raise one LossInputError listing all problems.

    `tensors` lists the student's inputs first; all share batch and tokens. Returns
    the real-token mask (B, T) as bool.
    """
    errors = []
    if reduction not in _REDUCTIONS:
        errors.append(
            f"The 'reduction' parameter of {loss} must be one of 'mean', 'sum', 'none'. "
            f"Got {reduction!r} instead."
        )
    if num_relation_heads is not None:
        errors += _relation_head_count_errors(loss, num_relation_heads)
    tensor_errors = [e for name, x in tensors.items() for e in _tensor_errors(loss, name, x, ndim)]
    if tensor_errors:  # the shape checks below need floating tensors of the right rank
        raise LossInputError("\n".join(errors + tensor_errors))

    (first_name, first), *others = tensors.items()
    batch, tokens = int(first.shape[0]), int(first.shape[-2])
    if ndim == 4:
        for name, x in tensors.items():
            if x.shape[-1] != x.shape[-2]:
                errors.append(
                    f"{loss}: {name} must be square over tokens (batch, heads, tokens, tokens); "
                    f"got shape {tuple(x.shape)}."
                )
    for name, x in others:
        if x.shape[0] != batch or x.shape[-2] != tokens:
            errors.append(
                f"{loss}: {first_name} has shape {tuple(first.shape)} but {name} has shape "
                f"{tuple(x.shape)}; token-level losses need the teacher and the student to see "
                "the same batch of tokens: use one tokenizer and pad both to the same length."
            )
        elif ndim == 4 and x.shape[1] != first.shape[1]:
            errors.append(
                f"{loss}: {first_name} has {first.shape[1]} heads but {name} has {x.shape[1]} "
                f"(shapes {tuple(first.shape)} and {tuple(x.shape)}); this loss compares head "
                "by head. For different head counts use minilm_attention_kl or "
                "minilm_relation_kl on the Q/K/V projections, whose relation heads are "
                "independent of the models' heads."
            )
        elif same_width and x.shape[-1] != first.shape[-1]:
            errors.append(
                f"{loss}: {first_name} has width {first.shape[-1]} but {name} has width "
                f"{x.shape[-1]} (shapes {tuple(first.shape)} and {tuple(x.shape)}). TinyBERT "
                "maps the student's states with a learned projection W_h first: apply a "
                f"projector such as torch.nn.Linear({first.shape[-1]}, {x.shape[-1]}) to "
                f"{first_name} and pass its output."
            )
    for left, right in same_shape_pairs:
        if tensors[left].shape != tensors[right].shape:
            errors.append(
                f"{loss}: {left} has shape {tuple(tensors[left].shape)} but {right} has shape "
                f"{tuple(tensors[right].shape)}; queries and keys of one model come from the "
                "same layer and must have the same shape."
            )
    if isinstance(num_relation_heads, numbers.Integral) and not _relation_head_count_errors(
        loss, num_relation_heads
    ):
        errors += _relation_width_errors(loss, tensors, int(num_relation_heads))
    if batch == 0 or tokens == 0:
        errors.append(
            f"{loss}: got no tokens ({first_name} has shape {tuple(first.shape)}); a loss over "
            "an empty batch or empty sequences is undefined. Skip such batches before the loss."
        )
    errors += _mask_errors(loss, attention_mask, batch, tokens)
    if errors:
        raise LossInputError("\n".join(errors))
    if attention_mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=first.device)
    return attention_mask.to(first.device) != 0


# bfloat16 rounding moves a row sum by up to ~2e-3; attention dropout (p = 0.1) moves
# rows by ~sqrt(p / (1 - p) / T) ≈ 1.5e-2 at T = 512, and far more on some row of a batch
_ROW_SUM_TOLERANCE = 1e-2


def _check_probability_rows(loss: str, tensors: Mapping[str, Tensor], real: Tensor) -> None:
    """Each real query row of an attention map must be a distribution over the real keys."""
    errors = []
    with torch.no_grad():
        pair = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, T, T)
        for name, attn in tensors.items():
            values = torch.where(pair, attn.float(), 0.0)  # (B, h, T, T)
            row_sums = values.sum(dim=-1)  # (B, h, T)
            bad_rows = real[:, None, :] & ((row_sums - 1).abs() > _ROW_SUM_TOLERANCE)
            if values.min() < 0:
                errors.append(
                    f"{loss}: {name} has negative entries (minimum {values.min().item():.4g}); "
                    "pass attention probabilities (output_attentions=True), not scores."
                )
            elif bad_rows.any():
                b, h, q = (int(i) for i in bad_rows.nonzero()[0])
                errors.append(
                    f"{loss}: every real query row of {name} must sum to 1 over the real keys; "
                    f"the row at (batch {b}, head {h}, query {q}) sums to "
                    f"{row_sums[b, h, q].item():.4g}. Pass softmax probabilities computed with "
                    "this attention_mask and without attention dropout (HF applies dropout to "
                    "the returned maps in training mode: set attention_probs_dropout_prob=0, or "
                    "use minilm_attention_kl on the Q/K projections)."
                )
    if errors:
        raise LossInputError("\n".join(errors))


# ----- shared math ------------------------------------------------------------------------


def _mean_over_real(per_token: Tensor, real: Tensor) -> Tensor:
    """Mean over each sequence's real tokens: (B, ..., T), (B, T) -> (B, ...); 0 if none."""
    real = real.view(real.shape[0], *([1] * (per_token.ndim - 2)), real.shape[1])
    total = torch.where(real, per_token, 0.0).sum(dim=-1)
    return total / real.sum(dim=-1).clamp_min(1)


def _row_kl(p_t: Tensor, log_t: Tensor, log_s: Tensor, real: Tensor) -> Tensor:
    """Per-sequence KL(teacher ‖ student) of attention-like rows over the real keys.

    p_t, log_t, log_s: (B, h, T, T), rows are queries, columns keys; masked keys may
    hold anything (−inf included). Returns (B,): mean over heads and real queries of
    Σ_k∈real p_t (log p_t − log p_s).
    """
    key = real[:, None, None, :]  # (B, 1, 1, T)
    # zero the logs before subtracting: −inf − (−inf) would put NaN in the gradient
    difference = torch.where(key, log_t, 0.0) - torch.where(key, log_s, 0.0)
    per_query = (torch.where(key, p_t, 0.0) * difference).sum(dim=-1)  # (B, h, T)
    return _mean_over_real(per_query, real).mean(dim=-1)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, H) -> (B, heads, T, H / heads), head h = columns [h·d, (h + 1)·d) as in HF."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _relation_log_probs(left: Tensor, right: Tensor, real: Tensor, heads: int) -> Tensor:
    """log softmax(left_h right_hᵀ / √d) over the real keys: (B, T, H) x2 -> (B, heads, T, T)."""
    keep = real[..., None]  # (B, T, 1)
    left = _split_heads(torch.where(keep, left, 0.0), heads)  # (B, h, T, d)
    right = _split_heads(torch.where(keep, right, 0.0), heads)  # (B, h, T, d)
    scores = left @ right.transpose(-1, -2) / math.sqrt(left.shape[-1])  # (B, h, T, T)
    # a sequence without real tokens keeps every key: its (unused) rows stay finite, so no
    # NaN appears even in intermediate gradients (torch.autograd.detect_anomaly stays quiet)
    keys = real | ~real.any(dim=-1, keepdim=True)  # (B, T)
    scores = scores.masked_fill(~keys[:, None, None, :], -math.inf)
    return torch.log_softmax(scores, dim=-1)


def _relation_kl(
    loss: str,
    student: tuple[Tensor, Tensor],
    teacher: tuple[Tensor, Tensor],
    names: tuple[str, ...],
    attention_mask: Tensor | None,
    num_relation_heads: int,
    reduction: str,
) -> Tensor:
    """KL between softmax(left rightᵀ / √d) relations of the teacher and the student."""
    tensors = dict(zip(names, (*student, *teacher)))
    pairs = ((names[0], names[1]), (names[2], names[3])) if len(set(names)) == 4 else ()
    real = _validate(
        loss,
        tensors,
        attention_mask,
        reduction=reduction,
        ndim=3,
        same_shape_pairs=pairs,
        num_relation_heads=num_relation_heads,
    )
    s_left, s_right, t_left, t_right = _as_float(*student, *teacher)
    log_s = _relation_log_probs(s_left, s_right, real, num_relation_heads)
    log_t = _relation_log_probs(t_left, t_right, real, num_relation_heads)
    return _reduce(_row_kl(log_t.exp(), log_t, log_s, real), reduction)


# ----- hidden states ----------------------------------------------------------------------


def _hidden_mse(
    loss: str,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    attention_mask: Tensor | None,
    reduction: str,
) -> Tensor:
    names = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden}
    real = _validate(
        loss, names, attention_mask, reduction=reduction, ndim=3, same_width=True
    )  # (B, T)
    student, teacher = _as_float(student_hidden, teacher_hidden)
    keep = real[..., None]  # (B, T, 1)
    difference = torch.where(keep, student, 0.0) - torch.where(keep, teacher, 0.0)
    per_token = difference.pow(2).mean(dim=-1)  # (B, T)
    return _reduce(_mean_over_real(per_token, real), reduction)


def hidden_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    attention_mask: Tensor | None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Hidden-state MSE of TinyBERT (Jiao et al., 2020, "TinyBERT: Distilling BERT for
    Natural Language Understanding", Findings of EMNLP).

    L_hidn = MSE(H_s W_h, H_t). The learned projection W_h (H_s -> H_t) belongs to the
    caller (a projector module): this function compares equal widths only. Per
    sequence: 1/(n·H) · Σ_{t real} Σ_d (s_{t,d} − t_{t,d})², n the number of real
    tokens, so padding neither counts nor dilutes (TinyBERT's code averages over
    every position, padding included).

    Shapes: student_hidden and teacher_hidden (B, T, H), attention_mask (B, T) or
    None. Returns a scalar, or (B,) for reduction="none".
    """
    return _hidden_mse("hidden_mse", student_hidden, teacher_hidden, attention_mask, reduction)


def embedding_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    attention_mask: Tensor | None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Embedding-layer MSE of TinyBERT (Jiao et al., 2020, "TinyBERT: Distilling BERT
    for Natural Language Understanding", Findings of EMNLP).

    L_embd = MSE(E_s W_e, E_t) on the embedding outputs, `hidden_states[0]` of a HF
    model; W_e is the caller's projector. The same masked MSE as `hidden_mse`: per
    sequence 1/(n·H) · Σ_{t real} Σ_d (s_{t,d} − t_{t,d})².

    Shapes: both (B, T, H), attention_mask (B, T) or None. Returns a scalar, or (B,)
    for reduction="none".
    """
    return _hidden_mse("embedding_mse", student_hidden, teacher_hidden, attention_mask, reduction)


def hidden_cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    attention_mask: Tensor | None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cosine embedding loss of DistilBERT (Sanh, Debut, Chaumond & Wolf, 2019,
    "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter").

    Per token 1 − cos(s_t, t_t), cos = s·t / (max(‖s‖, ε) · max(‖t‖, ε)), ε = 1e-8
    (a zero vector has cosine 0); per sequence the mean over real tokens. DistilBERT
    averages over all real tokens of the batch at once; here each sequence is one
    sample, as in every kdistill loss. Widths must match (DistilBERT's student keeps
    the teacher's width); project first otherwise.

    Shapes: both (B, T, H), attention_mask (B, T) or None. Returns a scalar, or (B,)
    for reduction="none".
    """
    names = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden}
    real = _validate(
        "hidden_cosine", names, attention_mask, reduction=reduction, ndim=3, same_width=True
    )
    student, teacher = _as_float(student_hidden, teacher_hidden)
    keep = real[..., None]  # (B, T, 1)
    student, teacher = torch.where(keep, student, 0.0), torch.where(keep, teacher, 0.0)
    eps_squared = 1e-16
    # clamp the squared norms before the square root: its gradient at 0 is infinite
    norm_s = student.pow(2).sum(dim=-1).clamp_min(eps_squared).sqrt()  # (B, T)
    norm_t = teacher.pow(2).sum(dim=-1).clamp_min(eps_squared).sqrt()  # (B, T)
    cosine = (student * teacher).sum(dim=-1) / (norm_s * norm_t)  # (B, T)
    return _reduce(_mean_over_real(1 - cosine, real), reduction)


# ----- attention maps ---------------------------------------------------------------------


def attention_mse(
    student_attn: Tensor,
    teacher_attn: Tensor,
    attention_mask: Tensor | None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Attention MSE of TinyBERT (Jiao et al., 2020, "TinyBERT: Distilling BERT for
    Natural Language Understanding", Findings of EMNLP).

    L_attn = 1/h · Σ_i MSE(A_i^S, A_i^T) over the h heads. Per sequence:
    1/h · Σ_i 1/n² · Σ_{q real} Σ_{k real} (A^S_{i,q,k} − A^T_{i,q,k})², n the number of
    real tokens: padded query rows and key columns are excluded, not zeroed and
    averaged in (TinyBERT and TextBrewer's att_mse zero them and divide by T², so
    their value depends on how much padding a batch has).

    What A is: HF's `output_attentions` maps are probabilities, so by default this is
    the MSE of attention probabilities, the signal available without extra hooks.
    TinyBERT regresses the pre-softmax scores QKᵀ/√d (which it found to converge
    faster); scores computed from Q/K hooks may be passed as well, since masked
    entries never count. On probabilities the values are small (entries ≈ 1/n), so
    give the term a large weight, or compare the maps as distributions with
    `attention_kl`. Heads must match; see `minilm_relation_kl` otherwise.

    Shapes: both (B, h, T, T), attention_mask (B, T) or None. Returns a scalar, or
    (B,) for reduction="none".
    """
    names = {"student_attn": student_attn, "teacher_attn": teacher_attn}
    real = _validate("attention_mse", names, attention_mask, reduction=reduction, ndim=4)
    student, teacher = _as_float(student_attn, teacher_attn)
    pair = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, T, T)
    difference = torch.where(pair, student, 0.0) - torch.where(pair, teacher, 0.0)
    per_query = difference.pow(2).sum(dim=-1) / real.sum(dim=-1).clamp_min(1)[:, None, None]
    return _reduce(_mean_over_real(per_query, real).mean(dim=-1), reduction)  # (B, h, T) -> (B,)


def attention_kl(
    student_attn: Tensor,
    teacher_attn: Tensor,
    attention_mask: Tensor | None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Self-attention distribution transfer of MiniLM (Wang, Wei, Dong, Bao, Yang & Zhou,
    2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS), on attention probabilities.

    L_AT = 1/(h·n) · Σ_i Σ_{q real} KL(A^T_{i,q} ‖ A^S_{i,q}), the KL over the real keys
    k: Σ_k A^T_{i,q,k} (log A^T_{i,q,k} − log A^S_{i,q,k}). The inputs are HF's
    `output_attentions` maps (eager attention): each real query row must sum to 1 over
    the real keys (checked to 1e-2; attention dropout breaks it). log A^S is taken of
    max(A^S, smallest normal float), so a key where the student's probability
    underflowed to 0 gives a large finite value instead of inf. MiniLM distills the
    last layer only; which layers to pair is the caller's choice. Heads must match;
    `minilm_attention_kl` computes the same from Q and K, and `minilm_relation_kl`
    allows different head counts.

    Shapes: both (B, h, T, T), attention_mask (B, T) or None. Returns a scalar, or
    (B,) for reduction="none".
    """
    names = {"student_attn": student_attn, "teacher_attn": teacher_attn}
    real = _validate("attention_kl", names, attention_mask, reduction=reduction, ndim=4)
    _check_probability_rows("attention_kl", names, real)
    student, teacher = _as_float(student_attn, teacher_attn)
    pair = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, T, T)
    tiny = torch.finfo(student.dtype).tiny
    # padded entries become 1 before the log (log 1 = 0), so garbage there cannot reach it
    log_s = torch.where(pair, student, 1.0).clamp_min(tiny).log()
    log_t = torch.where(pair, teacher, 1.0).clamp_min(tiny).log()
    p_t = torch.where(pair, teacher, 0.0)
    return _reduce(_row_kl(p_t, log_t, log_s, real), reduction)


# ----- MiniLM relations over Q, K, V ------------------------------------------------------


def minilm_attention_kl(
    student_q: Tensor,
    student_k: Tensor,
    teacher_q: Tensor,
    teacher_k: Tensor,
    attention_mask: Tensor | None,
    *,
    num_relation_heads: int,
    reduction: Reduction = "mean",
) -> Tensor:
    """Self-attention distribution transfer of MiniLM (Wang, Wei, Dong, Bao, Yang & Zhou,
    2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS), computed from the Q and K projections.

    Q and K (B, T, H) are split into R = num_relation_heads heads of d = H / R columns;
    A_i = softmax(Q_i K_iᵀ / √d) over the real keys, and
    L_AT = 1/(R·n) · Σ_i Σ_{q real} KL(A^T_{i,q} ‖ A^S_{i,q}). With R equal to the models'
    attention heads, A_i is exactly the model's attention distribution (MiniLM v1,
    which needs equal head counts; then this equals `attention_kl` on eager maps in
    eval mode). Hidden sizes may differ (each side uses its own d). Inputs are the
    outputs of `encoder.layer.{i}.attention.self.query` and `.key` (forward hooks),
    before the model splits them into heads.

    Shapes: student_q, student_k (B, T, H_s); teacher_q, teacher_k (B, T, H_t); R must
    divide H_s and H_t; attention_mask (B, T) or None. Returns a scalar, or (B,) for
    reduction="none".
    """
    return _relation_kl(
        "minilm_attention_kl",
        (student_q, student_k),
        (teacher_q, teacher_k),
        ("student_q", "student_k", "teacher_q", "teacher_k"),
        attention_mask,
        num_relation_heads,
        reduction,
    )


def minilm_relation_kl(
    student_x: Tensor,
    teacher_x: Tensor,
    attention_mask: Tensor | None,
    *,
    num_relation_heads: int,
    reduction: Reduction = "mean",
) -> Tensor:
    """Multi-head self-attention relation distillation of MiniLMv2 (Wang, Bao, Huang,
    Dong & Wei, 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for
    Compressing Pretrained Transformers", Findings of ACL).

    x is one layer's Q, K or V projection output (B, T, H) (forward hook on
    `encoder.layer.{i}.attention.self.query`, `.key` or `.value`), concatenated over
    the attention heads and split into R = num_relation_heads relation heads of
    d_r = H / R columns, independent of the models' attention heads:
      R_i = softmax(x_i x_iᵀ / √d_r) over the real keys, per relation head i;
      L = 1/(R·n) · Σ_i Σ_{q real} KL(R^T_{i,q} ‖ R^S_{i,q}).
    MiniLMv2 sums this over the Q-Q, K-K and V-V relations of one teacher and one
    student layer: call it once per relation. Teacher and student may differ in
    heads and hidden size (R must divide both widths). Memory: two float32
    (B, R, T, T) relation tensors and their gradients.

    Shapes: student_x (B, T, H_s), teacher_x (B, T, H_t), attention_mask (B, T) or
    None. Returns a scalar, or (B,) for reduction="none".
    """
    return _relation_kl(
        "minilm_relation_kl",
        (student_x, student_x),
        (teacher_x, teacher_x),
        ("student_x", "student_x", "teacher_x", "teacher_x"),
        attention_mask,
        num_relation_heads,
        reduction,
    )


def minilm_value_relation_kl(
    student_v: Tensor,
    teacher_v: Tensor,
    attention_mask: Tensor | None,
    *,
    num_relation_heads: int,
    reduction: Reduction = "mean",
) -> Tensor:
    """Value-relation transfer of MiniLM (Wang, Wei, Dong, Bao, Yang & Zhou, 2020,
    "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS).

    VR_i = softmax(V_i V_iᵀ / √d) over the real keys, V (B, T, H) the output of
    `encoder.layer.{i}.attention.self.value` split into R = num_relation_heads heads
    of d = H / R columns; L_VR = 1/(R·n) · Σ_i Σ_{q real} KL(VR^T_{i,q} ‖ VR^S_{i,q}).
    MiniLM v1 uses R = the attention heads of the (last) layer; the math is
    `minilm_relation_kl` on V.

    Shapes: student_v (B, T, H_s), teacher_v (B, T, H_t), attention_mask (B, T) or
    None. Returns a scalar, or (B,) for reduction="none".
    """
    return _relation_kl(
        "minilm_value_relation_kl",
        (student_v, student_v),
        (teacher_v, teacher_v),
        ("student_v", "student_v", "teacher_v", "teacher_v"),
        attention_mask,
        num_relation_heads,
        reduction,
    )


TRANSFORMER_LOSSES: dict[str, Callable[..., Tensor]] = {
    "hidden_mse": hidden_mse,
    "embedding_mse": embedding_mse,
    "hidden_cosine": hidden_cosine,
    "attention_mse": attention_mse,
    "attention_kl": attention_kl,
    "minilm_attention_kl": minilm_attention_kl,
    "minilm_relation_kl": minilm_relation_kl,
    "minilm_value_relation_kl": minilm_value_relation_kl,
}
