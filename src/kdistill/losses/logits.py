"""Logit distillation losses: pure functions over (batch, classes) logits.

Every loss takes the student's logits first, then the teacher's (and class labels
where the loss needs them); hyperparameters are keyword-only. `reduction` is
"mean" (average over samples), "sum", or "none" (one value per sample, shape (B,)).

The math runs in float32 for half/bfloat16 inputs (so their results come back as
float32) and in float64 for float64 inputs. Gradients flow into both logits:
run the teacher under `torch.no_grad()` or detach its logits to train the student
alone.

A temperature T divides both logits before the softmax. Only the losses whose
papers scale by T² do so (kd_loss, dkd_loss, dist_loss, bce_kd_loss); the plain
divergences do not, so `kd_loss(T) == T² · kl_divergence(T)`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import LossInputError
from kdistill.losses import divergences
from kdistill.losses.divergences import divergence, kl

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class _Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self) -> str:
        left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"


_POSITIVE = _Interval(0.0, math.inf, low_closed=False, high_closed=False)
_NON_NEGATIVE = _Interval(0.0, math.inf, low_closed=True, high_closed=False)
_UNIT = _Interval(0.0, 1.0, low_closed=True, high_closed=True)
_UNIT_OPEN_RIGHT = _Interval(0.0, 1.0, low_closed=True, high_closed=False)


def _range_errors(loss: str, ranges: Mapping[str, tuple[object, _Interval]]) -> list[str]:
    """One message per hyperparameter that is not a real number in its interval."""
    errors = []
    for name, (value, interval) in ranges.items():
        if isinstance(value, Tensor) and value.dim() == 0:  # a learned temperature (CTKD)
            value = float(value.detach())
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or float(value) not in interval
        ):
            errors.append(
                f"The {name!r} parameter of {loss} must be a float in {interval}. "
                f"Got {value!r} instead."
            )
    return errors


# The objective calls a term's loss with the same shapes, dtypes and parameter values at
# every step; once the first call has passed the checks, it skips them (they cost about
# what the loss itself costs on a small batch: BENCHMARKS.md §2).
_CHECK_INPUTS = [True]


@contextlib.contextmanager
def inputs_already_checked() -> Iterator[None]:
    """Skip the input checks of the logit losses inside this block."""
    _CHECK_INPUTS[0] = False
    try:
        yield
    finally:
        _CHECK_INPUTS[0] = True


def _validate(
    loss: str,
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    reduction: str,
    ranges: Mapping[str, tuple[object, _Interval]],
    min_batch: int = 1,
    min_classes: int = 1,
) -> None:
    """Check every input of `loss`; raise one LossInputError listing all problems."""
    if not _CHECK_INPUTS[0]:
        return
    errors = _range_errors(loss, ranges)
    if reduction not in _REDUCTIONS:
        errors.append(
            f"The 'reduction' parameter of {loss} must be one of 'mean', 'sum', 'none'. "
            f"Got {reduction!r} instead."
        )

    tensors = {"student_logits": student_logits}
    if teacher_logits is not None:
        tensors["teacher_logits"] = teacher_logits
    tensor_errors = []
    for name, logits in tensors.items():
        tensor_errors += _logits_errors(loss, name, logits)
    if tensor_errors:  # the shape checks below need 2-D float tensors
        raise LossInputError("\n".join(errors + tensor_errors))

    shape = tuple(student_logits.shape)
    batch, classes = shape
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        errors.append(
            f"{loss}: student_logits has shape {shape} but teacher_logits has shape "
            f"{tuple(teacher_logits.shape)}; both must be (batch, classes) with the same "
            "number of classes."
        )
    if batch == 0:
        errors.append(
            f"{loss}: got an empty batch (student_logits has shape {shape}); a loss over "
            "zero samples is undefined. Skip empty batches before calling the loss."
        )
    elif batch < min_batch:
        errors.append(
            f"{loss} needs a batch of at least {min_batch} samples; got student_logits with "
            f"shape {shape}. Use a larger batch or drop the last incomplete one."
        )
    if classes < min_classes:
        errors.append(
            f"{loss} needs at least {min_classes} classes; got student_logits with shape {shape}."
        )
    if labels is not None:
        errors += _label_errors(loss, labels, batch, classes)
    if errors:
        raise LossInputError("\n".join(errors))


def _logits_errors(loss: str, name: str, logits: Tensor) -> list[str]:
    if not isinstance(logits, Tensor):
        return [f"{loss}: {name} must be a torch.Tensor; got {type(logits).__name__}."]
    if logits.ndim != 2:
        return [
            f"{loss}: {name} must be a 2-D tensor (batch, classes); got shape "
            f"{tuple(logits.shape)}. For sequence logits, flatten the positions to "
            "distill into the batch dimension first."
        ]
    if not logits.is_floating_point():
        return [
            f"{loss}: {name} must be a floating-point tensor; got {logits.dtype}. "
            "Convert it with .float()."
        ]
    return []


def _label_errors(loss: str, labels: Tensor, batch: int, classes: int) -> list[str]:
    if not isinstance(labels, Tensor):
        return [f"{loss}: labels must be a torch.Tensor; got {type(labels).__name__}."]
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return [f"{loss}: labels must be an integer tensor of class indices; got {labels.dtype}."]
    if labels.shape != (batch,):
        return [
            f"{loss}: labels has shape {tuple(labels.shape)} but the logits have batch size "
            f"{batch}; labels must be ({batch},) class indices."
        ]
    out_of_range = (labels < 0) | (labels >= classes)  # (B,)
    if not out_of_range.any():
        return []
    position = int(out_of_range.nonzero()[0, 0])
    value = int(labels[position])
    hint = " There is no ignore index: drop unlabeled rows first." if value < 0 else ""
    return [
        f"{loss}: labels must be class indices in [0, {classes}); got {value} at position "
        f"{position}.{hint}"
    ]


def _as_float(*logits: Tensor) -> list[Tensor]:
    """Cast to one dtype of at least float32: half precision loses exp/log sums."""
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in logits), torch.float32)
    return [x.to(dtype) for x in logits]


def _log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """log softmax(s / T), log softmax(t / T), each (B, C)."""
    student, teacher = _as_float(student_logits, teacher_logits)
    return (
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
    )


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    *,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Hard-label cross-entropy, the supervised term next to a distillation loss.

    CE = −(1 − ε) log p_y − ε/C · Σ_c log p_c, with p = softmax(s) and ε the label
    smoothing (Szegedy et al., CVPR 2016), as in `torch.nn.functional.cross_entropy`.

    Shapes: student_logits (B, C) float, labels (B,) integer in [0, C) (no ignore
    index). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "cross_entropy",
        student_logits,
        labels=labels,
        reduction=reduction,
        ranges={"label_smoothing": (label_smoothing, _UNIT_OPEN_RIGHT)},
    )
    (student,) = _as_float(student_logits)
    per_sample = F.cross_entropy(
        student, labels.long(), label_smoothing=label_smoothing, reduction="none"
    )  # (B,)
    return _reduce(per_sample, reduction)


def soft_target_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross-entropy against the teacher's soft targets (Hinton et al., 2015).

    H(p_t, p_s) = −Σ_c p_t,c log p_s,c with p = softmax(logits / T). It equals
    KL(p_t ‖ p_s) + H(p_t), so it has the same student gradient as the KL but is not
    zero when the student matches. No T² factor: use kd_loss for the scaled form.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "soft_target_cross_entropy",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"temperature": (temperature, _POSITIVE)},
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    per_sample = divergences.cross_entropy(log_p_t, log_p_s)  # (B,)
    return _reduce(per_sample, reduction)


def kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c), p = softmax(logits / T).

    Mean-seeking: the student spreads mass over every class the teacher supports.
    No T² factor (see kd_loss).

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "kl_divergence",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"temperature": (temperature, _POSITIVE)},
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(divergence(log_p_s, log_p_t, "kl"), reduction)


def reverse_kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Reverse KL(p_s ‖ p_t) = Σ_c p_s,c (log p_s,c − log p_t,c), p = softmax(logits / T).

    Mode-seeking, as used by MiniLLM (Gu et al., ICLR 2024). No T² factor.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "reverse_kl_divergence",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"temperature": (temperature, _POSITIVE)},
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(divergence(log_p_s, log_p_t, "reverse_kl"), reduction)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    reduction: Reduction = "mean",
) -> Tensor:
    """Classic knowledge distillation (Hinton, Vinyals & Dean, 2015, arXiv:1503.02531).

    KD = T² · KL(softmax(t / T) ‖ softmax(s / T)). The T² keeps the gradient scale
    independent of T, so the loss can be mixed with a hard-label term.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "kd_loss",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"temperature": (temperature, _POSITIVE)},
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(temperature**2 * divergence(log_p_s, log_p_t, "kl"), reduction)


def jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Generalized Jensen-Shannon divergence (GKD: Agarwal et al., ICLR 2024).

    With m = β·p_t + (1 − β)·p_s and p = softmax(logits / T), for 0 < β < 1:

        JSD_β = β · KL(p_t ‖ m) + (1 − β) · KL(p_s ‖ m)

    and, as in TRL's `generalized_jsd_loss`, the endpoints are defined separately:
    β = 0 is forward KL(p_t ‖ p_s) and β = 1 is reverse KL(p_s ‖ p_t), exactly.
    The interpolated form itself tends to 0 at both ends (JSD_β ≈ β · KL(p_t ‖ p_s)
    as β → 0 and ≈ (1 − β) · KL(p_s ‖ p_t) as β → 1), so the endpoints are the limits
    of JSD_β / β and JSD_β / (1 − β): the loss scale jumps there. β = 0.5 is the
    usual symmetric JSD. No T² factor.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "jsd_loss",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"beta": (beta, _UNIT), "temperature": (temperature, _POSITIVE)},
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(divergence(log_p_s, log_p_t, "jsd", beta=beta), reduction)


def skew_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Skew KL (DistiLLM: Ko et al., ICML 2024, arXiv:2402.03898).

    SKL_α = KL(p_t ‖ α·p_t + (1 − α)·p_s), p = softmax(logits / T). α = 0 is forward
    KL; α = 1 is 0. The official code drops the teacher-entropy constant (same
    student gradient); this returns the true divergence. No T² factor.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "skew_kl_loss",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"alpha": (alpha, _UNIT), "temperature": (temperature, _POSITIVE)},
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(divergence(log_p_s, log_p_t, "skew_kl", alpha=alpha), reduction)


def skew_reverse_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Skew reverse KL (DistiLLM: Ko et al., ICML 2024, arXiv:2402.03898).

    SRKL_α = KL(p_s ‖ α·p_s + (1 − α)·p_t), p = softmax(logits / T). α = 0 is reverse
    KL; α = 1 is 0. No T² factor.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "skew_reverse_kl_loss",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"alpha": (alpha, _UNIT), "temperature": (temperature, _POSITIVE)},
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(divergence(log_p_s, log_p_t, "skew_reverse_kl", alpha=alpha), reduction)


def total_variation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Total variation distance TVD = ½ Σ_c |p_t,c − p_s,c|, p = softmax(logits / T).

    Bounded in [0, 1]; used for distillation by Wen et al. (ACL 2023, f-divergence
    minimization). No T² factor.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "total_variation_loss",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"temperature": (temperature, _POSITIVE)},
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(divergence(log_p_s, log_p_t, "tvd"), reduction)


def logit_mse_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Logit matching (Ba & Caruana, NeurIPS 2014): 1/C · Σ_c (s_c − t_c)² per sample.

    Regresses the raw logits, so there is no temperature; per-sample values are a
    mean over classes (not a sum), which keeps the scale independent of C.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate("logit_mse_loss", student_logits, teacher_logits, reduction=reduction, ranges={})
    student, teacher = _as_float(student_logits, teacher_logits)
    per_sample = (student - teacher).pow(2).mean(dim=-1)  # (B,)
    return _reduce(per_sample, reduction)


def _target_vs_rest_log_probs(scaled_logits: Tensor, target_mask: Tensor) -> Tensor:
    """log [p_target, 1 − p_target] of softmax(scaled_logits): (B, C) -> (B, 2)."""
    log_p = F.log_softmax(scaled_logits, dim=-1)  # (B, C)
    log_target = log_p.masked_fill(~target_mask, -math.inf).logsumexp(dim=-1)  # (B,)
    log_rest = log_p.masked_fill(target_mask, -math.inf).logsumexp(dim=-1)  # (B,)
    return torch.stack([log_target, log_rest], dim=-1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv:2203.08679).

    DKD = α · TCKD + β · NCKD, both at temperature T and scaled by T²:
      TCKD = T² · KL(b_t ‖ b_s), b = [p_target, 1 − p_target] the binary split;
      NCKD = T² · KL(p̂_t ‖ p̂_s), p̂ the softmax over the non-target classes,
             computed as in mdistiller by subtracting 1000 from the target's
             scaled logit.
    With reduction="mean" this equals mdistiller's `dkd_loss`. Its linear warm-up
    (weight min(epoch / 20, 1)) is not part of the loss: express it as a `linear`
    weight schedule on this term.

    Shapes: both logits (B, C) with C ≥ 2, labels (B,) integer in [0, C). Returns a
    scalar, or (B,) for reduction="none".
    """
    _validate(
        "dkd_loss",
        student_logits,
        teacher_logits,
        labels,
        reduction=reduction,
        ranges={
            "alpha": (alpha, _NON_NEGATIVE),
            "beta": (beta, _NON_NEGATIVE),
            "temperature": (temperature, _POSITIVE),
        },
        min_classes=2,
    )
    student, teacher = _as_float(student_logits, teacher_logits)
    target_mask = F.one_hot(labels.long(), student.shape[-1]).bool()  # (B, C)
    z_s, z_t = student / temperature, teacher / temperature  # (B, C)
    tckd = kl(
        _target_vs_rest_log_probs(z_t, target_mask), _target_vs_rest_log_probs(z_s, target_mask)
    )  # (B,)
    # -1000 rather than -inf: the target's probability underflows to 0 while its log
    # stays finite, so 0 · (log p_t − log p_s) is 0 instead of NaN.
    nckd = kl(
        F.log_softmax(z_t - 1000.0 * target_mask, dim=-1),
        F.log_softmax(z_s - 1000.0 * target_mask, dim=-1),
    )  # (B,)
    return _reduce(temperature**2 * (alpha * tckd + beta * nckd), reduction)


def _pearson_distance(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """1 − Pearson correlation of a and b along `dim` (the other dim is kept)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    # eps as in the official code: a constant vector gives correlation 0, not NaN.
    correlation = (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)
    return 1 - correlation


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """DIST, relational distillation (Huang et al., NeurIPS 2022, arXiv:2205.10536).

    With p = softmax(logits / T) and d(x, y) = 1 − Pearson(x, y):
      inter_i = d(p_s[i, :], p_t[i, :])           per sample, over classes;
      intra   = mean_c d(p_s[:, c], p_t[:, c])    per class, over the batch;
      DIST    = T² · (β · mean_i inter_i + γ · intra), as the official code.
    The intra term belongs to the whole batch: reduction="none" returns
    T² · (β · inter_i + γ · intra) for every sample i, i.e. the batch's intra term
    B · intra is spread evenly, so "none".mean() is DIST and "sum" is B · DIST.

    Shapes: both logits (B, C) with B ≥ 2 and C ≥ 2. Returns a scalar, or (B,) for
    reduction="none".
    """
    _validate(
        "dist_loss",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={
            "beta": (beta, _NON_NEGATIVE),
            "gamma": (gamma, _NON_NEGATIVE),
            "temperature": (temperature, _POSITIVE),
        },
        min_batch=2,
        min_classes=2,
    )
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()  # (B, C)
    inter = _pearson_distance(p_s, p_t, dim=1)  # (B,)
    intra = _pearson_distance(p_s, p_t, dim=0).mean()  # ()
    return _reduce(temperature**2 * (beta * inter + gamma * intra), reduction)


def bce_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Multi-label (sigmoid) distillation: per-class binary cross-entropy.

    BCE-KD = T² · Σ_c BCE(σ(t_c / T), σ(s_c / T)), each class an independent binary
    problem, as in multi-label distillation (e.g. Yang et al., ICCV 2023, which uses
    the binary KL: it differs from this by the teacher's binary entropy, a constant).
    So the loss is smallest, not zero, when the student matches the teacher; its
    student gradient is then zero. Computed from logits, so it stays stable.

    Shapes: both logits (B, C). Returns a scalar, or (B,) for reduction="none".
    """
    _validate(
        "bce_kd_loss",
        student_logits,
        teacher_logits,
        reduction=reduction,
        ranges={"temperature": (temperature, _POSITIVE)},
    )
    student, teacher = _as_float(student_logits, teacher_logits)
    per_class = F.binary_cross_entropy_with_logits(
        student / temperature, torch.sigmoid(teacher / temperature), reduction="none"
    )  # (B, C)
    return _reduce(temperature**2 * per_class.sum(dim=-1), reduction)


LOGIT_LOSSES: dict[str, Callable[..., Tensor]] = {
    "cross_entropy": cross_entropy,
    "soft_target_ce": soft_target_cross_entropy,
    "kl": kl_divergence,
    "reverse_kl": reverse_kl_divergence,
    "kd": kd_loss,
    "jsd": jsd_loss,
    "skew_kl": skew_kl_loss,
    "skew_reverse_kl": skew_reverse_kl_loss,
    "tvd": total_variation_loss,
    "logit_mse": logit_mse_loss,
    "dkd": dkd_loss,
    "dist": dist_loss,
    "bce_kd": bce_kd_loss,
}

# Losses whose signature takes `labels`; a test checks this against the signatures.
NEEDS_LABELS: frozenset[str] = frozenset({"cross_entropy", "dkd"})
