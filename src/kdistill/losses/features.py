"""Feature and relational distillation losses over intermediate features.

Every loss takes the student's feature first, then the teacher's; hyperparameters
are keyword-only with the papers' defaults. Features come from forward hooks
(taps); where a loss compares features element by element (hint) the caller has
already projected the student's feature to the teacher's shape. The relational
losses (similarity, rkd_distance, rkd_angle, pkt, cc) compare sample-to-sample
relations, so student and teacher may have different widths: their non-batch
dimensions are flattened to one vector per sample.

Reductions. The training loop sums a loss over micro-batches and divides by the
global number of samples, so every loss states what one sample contributes:

* per-sample losses (hint, attention, nst, CRD): "none" gives the (B,) values,
  "mean" their average, "sum" their sum;
* batch-relational losses (similarity, rkd_distance, rkd_angle, pkt, cc) are
  defined on the batch as a whole: "mean" is the paper's value for the batch,
  "sum" is B · mean (so sum / B is again the paper's value), and "none" raises
  LossInputError, because no sample has a loss of its own. Their value depends on
  which samples share a batch: split a batch into micro-batches and the relations
  are taken within each micro-batch only.

The math runs in float32 for half/bfloat16 inputs (their results come back as
float32) and in float64 for float64 inputs. Gradients flow into both features:
detach the teacher's feature to train the student alone.

CRD (contrastive representation distillation) needs state, a memory bank over
the whole dataset, so it is a module, `CRDMemory`, with its math in the pure
function `crd_nce_loss`; both live in `kdistill.losses.crd`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import LossInputError
from kdistill.losses.logits import (
    _NON_NEGATIVE,
    _POSITIVE,
    _as_float,
    _Interval,
    _range_errors,
    _reduce,
)

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")

# Which dimensions of the two features must agree, besides the batch.
_Match = Literal["shape", "spatial", "none"]


def _int_errors(loss: str, name: str, value: object, low: int) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        return [
            f"The {name!r} parameter of {loss} must be an int in [{low}, inf). "
            f"Got {value!r} instead."
        ]
    return []


def _reduction_errors(loss: str, reduction: object, *, relational: bool) -> list[str]:
    if reduction not in _REDUCTIONS:
        return [
            f"The 'reduction' parameter of {loss} must be one of 'mean', 'sum', 'none'. "
            f"Got {reduction!r} instead."
        ]
    if relational and reduction == "none":
        return [
            f"{loss} is defined on the batch as a whole (it compares every pair of samples), "
            "so no sample has a loss of its own and reduction='none' is undefined. Use "
            "'mean' (the paper's value for the batch) or 'sum' (B · mean, which the training "
            "loop divides by the number of samples)."
        ]
    return []


def _tensor_errors(loss: str, name: str, feature: object, *, maps: bool) -> list[str]:
    if not isinstance(feature, Tensor):
        return [f"{loss}: {name} must be a torch.Tensor; got {type(feature).__name__}."]
    if maps and feature.ndim != 4:
        return [
            f"{loss}: {name} must be a 4-D feature map (batch, channels, height, width); got "
            f"shape {tuple(feature.shape)}. Tap a convolutional layer's output."
        ]
    if not maps and feature.ndim < 2:
        return [
            f"{loss}: {name} must have a batch dimension and at least one feature dimension "
            f"(batch, ...); got shape {tuple(feature.shape)}."
        ]
    if not feature.is_floating_point():
        return [
            f"{loss}: {name} must be a floating-point tensor; got {feature.dtype}. "
            "Convert it with .float()."
        ]
    return []


def _validate(
    loss: str,
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    reduction: str,
    match: _Match,
    maps: bool = False,
    relational: bool = False,
    min_batch: int = 1,
    ranges: Mapping[str, tuple[object, _Interval]] | None = None,
    errors: Sequence[str] = (),
) -> None:
    """Check every input of `loss`; raise one LossInputError listing all problems."""
    problems = list(errors) + _range_errors(loss, ranges or {})
    problems += _reduction_errors(loss, reduction, relational=relational)
    tensor_problems = _tensor_errors(loss, "student_feature", student_feature, maps=maps)
    tensor_problems += _tensor_errors(loss, "teacher_feature", teacher_feature, maps=maps)
    if tensor_problems:  # the shape checks below need float tensors of the right rank
        raise LossInputError("\n".join(problems + tensor_problems))

    s_shape, t_shape = tuple(student_feature.shape), tuple(teacher_feature.shape)
    batch = s_shape[0]
    if t_shape[0] != batch:
        problems.append(
            f"{loss}: student_feature has batch size {batch} (shape {s_shape}) but "
            f"teacher_feature has batch size {t_shape[0]} (shape {t_shape}); both must hold "
            "the same samples in the same order."
        )
    elif match == "shape" and s_shape != t_shape:
        problems.append(
            f"{loss} compares features element by element, but student_feature has shape "
            f"{s_shape} and teacher_feature has shape {t_shape}. Add a projector that maps "
            "the student's feature to the teacher's shape, or tap layers of equal shape."
        )
    elif match == "spatial" and s_shape[2:] != t_shape[2:]:
        problems.append(
            f"{loss} compares spatial positions, so both feature maps need the same height "
            f"and width; got student_feature {s_shape} and teacher_feature {t_shape} "
            f"(spatial sizes {s_shape[2:]} and {t_shape[2:]}). Tap layers with equal spatial "
            "size (channel counts may differ), or pool the larger map in a projector."
        )
    if batch == 0:
        problems.append(
            f"{loss}: got an empty batch (student_feature has shape {s_shape}); a loss over "
            "zero samples is undefined. Skip empty batches before calling the loss."
        )
    elif batch < min_batch:
        problems.append(
            f"{loss} compares samples within the batch and needs at least {min_batch} "
            f"samples; got student_feature with shape {s_shape}. Use a larger batch or drop "
            "the last incomplete one."
        )
    if problems:
        raise LossInputError("\n".join(problems))


def _rows(feature: Tensor) -> Tensor:
    """(B, ...) -> (B, D): one flat vector per sample."""
    return feature.reshape(feature.shape[0], -1)


def _reduce_batch(value: Tensor, batch: int, reduction: str) -> Tensor:
    """A batch-relational loss: "mean" is the batch's value, "sum" is B times it."""
    return value * batch if reduction == "sum" else value


def hint_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets").

    hint_i = 1/n · Σ_k (s_ik − t_ik)², the mean squared error over the n elements of
    sample i's (projected) student feature s_i and teacher feature t_i. The mean over
    the batch equals `F.mse_loss(s, t)` (RepDistiller's HintLoss). The paper's
    regressor is the caller's projector.

    Shapes: both features (B, ...) with equal shapes. Returns a scalar, or (B,) for
    reduction="none".
    """
    _validate("hint_loss", student_feature, teacher_feature, reduction=reduction, match="shape")
    student, teacher = _as_float(student_feature, teacher_feature)
    per_sample = _rows(student - teacher).pow(2).mean(dim=1)  # (B,)
    return _reduce(per_sample, reduction)


def _attention_map(feature: Tensor, p: float) -> Tensor:
    """(B, C, H, W) -> (B, H·W): mean over channels of |f|^p, L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    p: float = 2.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to
    Attention").

    The spatial attention map of a feature map f (C, H, W) is a = vec(mean_c |f_c|^p),
    normalised to unit L2 norm: â = a / max(‖a‖₂, 1e-12). Per sample

        AT_i = 1/(H·W) · ‖â_s,i − â_t,i‖₂²,

    so the mean over the batch equals the authors' code `(at(s) − at(t)).pow(2).mean()`.
    (The paper writes the unsquared norm ‖·‖₂ weighted by β/2; its code, and
    RepDistiller, use this squared mean: β/2 = 500 per layer in the authors' code,
    weight 1000 in RepDistiller.) Channel counts may differ; height and width must
    match (no implicit pooling).

    Shapes: both features (B, C, H, W), C may differ. Returns a scalar, or (B,) for
    reduction="none".
    """
    _validate(
        "attention_loss",
        student_feature,
        teacher_feature,
        reduction=reduction,
        match="spatial",
        maps=True,
        ranges={"p": (p, _POSITIVE)},
    )
    student, teacher = _as_float(student_feature, teacher_feature)
    difference = _attention_map(student, p) - _attention_map(teacher, p)  # (B, H·W)
    return _reduce(difference.pow(2).mean(dim=1), reduction)


def _row_normalised_gram(feature: Tensor) -> Tensor:
    """(B, ...) -> (B, B): G = F Fᵀ with each row scaled to unit L2 norm."""
    rows = _rows(feature)  # (B, D)
    return F.normalize(rows @ rows.T, dim=1)


def similarity_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge
    Distillation").

    With F the (B, D) flattened features, G = F Fᵀ and G̃ = G with each row divided by
    its L2 norm (eps 1e-12):

        SP = 1/B² · ‖G̃_s − G̃_t‖_F²

    exactly as the paper (Eq. 4) and RepDistiller; the paper weights it by γ = 3000.
    Batch-relational: "sum" = B · SP, "none" is undefined. Invariant to an orthogonal
    change of basis of either feature and to scaling a whole feature by a constant
    (not to scaling single samples).

    Shapes: (B, ...) each, widths may differ, B ≥ 2. Returns a scalar.
    """
    _validate(
        "similarity_loss",
        student_feature,
        teacher_feature,
        reduction=reduction,
        match="none",
        relational=True,
        min_batch=2,
    )
    student, teacher = _as_float(student_feature, teacher_feature)
    batch = student.shape[0]
    difference = _row_normalised_gram(student) - _row_normalised_gram(teacher)  # (B, B)
    return _reduce_batch(difference.pow(2).sum() / batch**2, batch, reduction)


def _normalised_distances(feature: Tensor) -> Tensor:
    """(B, ...) -> (B, B): Euclidean distances divided by their mean over pairs i ≠ j."""
    rows = _rows(feature)
    # Distances ignore translation; centring first keeps ‖x‖² + ‖y‖² − 2xy from
    # cancelling catastrophically in float32 when the features share a large offset.
    rows = rows - rows.mean(dim=0, keepdim=True)  # (B, D)
    batch = rows.shape[0]
    squared_norms = rows.pow(2).sum(dim=1)  # (B,)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2 * rows @ rows.T  # (B, B)
    diagonal = torch.eye(batch, dtype=torch.bool, device=rows.device)
    # clamp as in the official code: equal samples get distance 1e-6 with a finite gradient
    distances = torch.where(diagonal, 0.0, squared.clamp(min=1e-12).sqrt())  # (B, B)
    mean_distance = distances.sum() / (batch * (batch - 1))
    return distances / mean_distance


def rkd_distance_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """RKD distance loss (Park, Kim, Lu & Cho, CVPR 2019, "Relational Knowledge
    Distillation").

    ψ_D(x_i, x_j) = ‖x_i − x_j‖₂ / μ, with μ the mean distance over the pairs i ≠ j
    of the batch (computed separately for student and teacher). Then

        RKD-D = 1/B² · Σ_{i,j} huber(ψ_D(s_i, s_j) − ψ_D(t_i, t_j)),

    huber = smooth L1 with δ = 1. The average runs over all B² entries, diagonal
    (always 0) included, as in the official code (`F.smooth_l1_loss` on the B × B
    matrices), which is what the paper's weight 25 was tuned with. Invariant to
    translation, rotation and scaling of either feature. Batch-relational: "sum" =
    B · RKD-D, "none" is undefined.

    Shapes: (B, ...) each, widths may differ, B ≥ 2. Returns a scalar.
    """
    _validate(
        "rkd_distance_loss",
        student_feature,
        teacher_feature,
        reduction=reduction,
        match="none",
        relational=True,
        min_batch=2,
    )
    student, teacher = _as_float(student_feature, teacher_feature)
    value = F.smooth_l1_loss(
        _normalised_distances(student), _normalised_distances(teacher), beta=1.0
    )
    return _reduce_batch(value, student.shape[0], reduction)


def _angles(feature: Tensor) -> Tensor:
    """(B, ...) -> (B, B, B): cos[a, b, c] = cosine of the angle at x_a between x_b and x_c.

    From the Gram matrix G = X Xᵀ of the centred rows (angles do not change under
    translation; centring keeps G's entries near the distances, so little cancels):
    ⟨x_b − x_a, x_c − x_a⟩ = G_bc − G_ab − G_ac + G_aa and ‖x_b − x_a‖² = G_bb − 2 G_ab + G_aa.
    That costs B²·D + B³ instead of the B³·D of normalising the (B, B, D) differences
    (RepDistiller's code), and holds no (B, B, D) tensor: about 40× faster at B = 128,
    D = 2,048. A zero difference (b = a) gives direction 0, as F.normalize does.
    """
    rows = _rows(feature)
    rows = rows - rows.mean(dim=0, keepdim=True)
    gram = rows @ rows.T  # (B, B)
    own = gram.diagonal()  # (B,) ‖x_a‖²
    dots = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + own[:, None, None]
    squared = (own[None, :] - 2 * gram + own[:, None]).clamp_min(0)  # (B, B) ‖x_b − x_a‖²
    apart = squared > 0
    # no sqrt at 0 (its gradient is infinite there, even where the result is masked)
    norms = torch.where(apart, squared, torch.ones_like(squared)).sqrt()
    inverse = torch.where(apart, 1 / norms.clamp_min(1e-12), torch.zeros_like(norms))
    return dots * inverse[:, :, None] * inverse[:, None, :]


def rkd_angle_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """RKD angle loss (Park, Kim, Lu & Cho, CVPR 2019, "Relational Knowledge Distillation").

    ψ_A(x_a, x_b, x_c) = ⟨e_ab, e_ac⟩ with e_ab = (x_b − x_a) / ‖x_b − x_a‖₂, the cosine
    of the angle at x_a. Then

        RKD-A = 1/B³ · Σ_{a,b,c} huber(ψ_A(s_a, s_b, s_c) − ψ_A(t_a, t_b, t_c)),

    huber = smooth L1 with δ = 1, averaged over all B³ triplets as in the official code;
    degenerate ones (b = a or c = a, where e is the zero vector after F.normalize)
    are 0 for both models and only dilute the mean. The paper weights it by 50.
    Invariant to translation, rotation and scaling. Memory: (B, B, B) angles per
    feature, computed from the (B, B) Gram matrix (see `_angles`). Batch-relational: "sum" = B · RKD-A, "none" is
    undefined.

    Shapes: (B, ...) each, widths may differ, B ≥ 3. Returns a scalar.
    """
    _validate(
        "rkd_angle_loss",
        student_feature,
        teacher_feature,
        reduction=reduction,
        match="none",
        relational=True,
        min_batch=3,
    )
    student, teacher = _as_float(student_feature, teacher_feature)
    value = F.smooth_l1_loss(_angles(student), _angles(teacher), beta=1.0)
    return _reduce_batch(value, student.shape[0], reduction)


_PKT_EPS = 1e-7  # the authors' eps, used in the norm and inside the log


def _pkt_probabilities(feature: Tensor) -> Tensor:
    """(B, ...) -> (B, B): row i is the conditional distribution p(j | i) of the batch."""
    rows = _rows(feature)
    rows = rows / (rows.norm(dim=1, keepdim=True) + _PKT_EPS)  # (B, D)
    kernel = (rows @ rows.T + 1) / 2  # cosine similarity mapped to [0, 1]
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep
    Representations with Probabilistic Knowledge Transfer").

    With x̂_i = x_i / (‖x_i‖₂ + ε), the cosine kernel K_ij = (x̂_iᵀ x̂_j + 1) / 2 and the
    conditional probabilities p_ij = K_ij / Σ_k K_ik (student) and q_ij likewise for
    the teacher:

        PKT = 1/B² · Σ_{i,j} q_ij · log((q_ij + ε) / (p_ij + ε)),   ε = 1e-7,

    as the authors' `cosine_similarity_loss` (the diagonal i = j is kept, and the
    average runs over all B² entries; RepDistiller weights it by 30000). Unlike their
    code, NaN features are not silently zeroed. Invariant to scaling single samples.
    Batch-relational: "sum" = B · PKT, "none" is undefined.

    Shapes: (B, ...) each, widths may differ, B ≥ 2. Returns a scalar.
    """
    _validate(
        "pkt_loss",
        student_feature,
        teacher_feature,
        reduction=reduction,
        match="none",
        relational=True,
        min_batch=2,
    )
    student, teacher = _as_float(student_feature, teacher_feature)
    p, q = _pkt_probabilities(student), _pkt_probabilities(teacher)  # (B, B)
    value = (q * torch.log((q + _PKT_EPS) / (p + _PKT_EPS))).mean()
    return _reduce_batch(value, student.shape[0], reduction)


def _polynomial_kernel_mean(a: Tensor, b: Tensor, degree: int, constant: float) -> Tensor:
    """Mean over channel pairs of (aᵀb + c)^d: (B, C_a, N), (B, C_b, N) -> (B,)."""
    return (a @ b.transpose(1, 2) + constant).pow(degree).mean(dim=(1, 2))


def nst_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    degree: int = 2,
    constant: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Neuron selectivity transfer (Huang & Wang, 2017, arXiv:1707.01219, "Like What You
    Like: Knowledge Distill via Neuron Selectivity Transfer").

    Each channel's map over the H·W positions is one sample of a distribution,
    normalised to unit L2 norm: ŝ_i = vec(s_i) / ‖vec(s_i)‖₂ for the C_s student
    channels, t̂_j likewise for the C_t teacher channels. With the polynomial kernel
    k(x, y) = (xᵀy + c)^d (paper: d = 2, c = 0), the squared MMD per sample is

        NST = 1/C_s² Σ_{i,i'} k(ŝ_i, ŝ_i') + 1/C_t² Σ_{j,j'} k(t̂_j, t̂_j')
              − 2/(C_s C_t) Σ_{i,j} k(ŝ_i, t̂_j),

    the full loss of RepDistiller's NSTLoss (which weights it by 50). Invariant to
    permuting or rescaling channels. Height and width must match.

    Shapes: both features (B, C, H, W), C may differ. Returns a scalar, or (B,) for
    reduction="none".
    """
    errors = _int_errors("nst_loss", "degree", degree, 1)
    _validate(
        "nst_loss",
        student_feature,
        teacher_feature,
        reduction=reduction,
        match="spatial",
        maps=True,
        ranges={"constant": (constant, _NON_NEGATIVE)},
        errors=errors,
    )
    student, teacher = _as_float(student_feature, teacher_feature)
    s = F.normalize(student.flatten(2), dim=2)  # (B, C_s, H·W)
    t = F.normalize(teacher.flatten(2), dim=2)  # (B, C_t, H·W)
    per_sample = (
        _polynomial_kernel_mean(s, s, degree, constant)
        + _polynomial_kernel_mean(t, t, degree, constant)
        - 2 * _polynomial_kernel_mean(s, t, degree, constant)
    )  # (B,)
    return _reduce(per_sample, reduction)


def _correlation_matrix(feature: Tensor, gamma: float, order: int, kernel: str) -> Tensor:
    """(B, ...) -> (B, B) Gaussian-RBF correlations of the L2-normalised features."""
    rows = F.normalize(_rows(feature), dim=1)
    cosine = rows @ rows.T  # (B, B); ‖x_i − x_j‖² = 2 − 2·cosine for unit vectors
    if kernel == "rbf":
        return torch.exp(-2 * gamma * (1 - cosine))
    correlation = torch.zeros_like(cosine)
    for p in range(order + 1):
        correlation = correlation + (
            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cosine.pow(p)
        )
    return correlation


def cc_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    gamma: float = 0.4,
    order: int = 2,
    kernel: Literal["taylor", "rbf"] = "taylor",
    reduction: Reduction = "mean",
) -> Tensor:
    """Correlation congruence (Peng et al., ICCV 2019, "Correlation Congruence for
    Knowledge Distillation").

    The features are L2-normalised per sample; the correlation matrix is the Gaussian
    RBF kernel k(x_i, x_j) = exp(−γ‖x_i − x_j‖²) = exp(−2γ) · exp(2γ x_iᵀx_j), either
    exactly (kernel="rbf") or by its P-th order Taylor expansion as in the paper
    (kernel="taylor", P = `order`):

        k(x_i, x_j) ≈ Σ_{p=0}^{P} exp(−2γ) (2γ)^p / p! · (x_iᵀ x_j)^p,

        CC = 1/B² · ‖C_s − C_t‖_F².

    γ = 0.4 and P = 2 are the defaults of the widely used reimplementation
    (Knowledge-Distillation-Zoo). The correlations compare samples, so widths may
    differ. Batch-relational: "sum" = B · CC, "none" is undefined.

    Shapes: (B, ...) each, widths may differ, B ≥ 2. Returns a scalar.
    """
    errors = _int_errors("cc_loss", "order", order, 1)
    if kernel not in ("taylor", "rbf"):
        errors.append(
            f"The 'kernel' parameter of cc_loss must be one of 'taylor', 'rbf'. "
            f"Got {kernel!r} instead."
        )
    _validate(
        "cc_loss",
        student_feature,
        teacher_feature,
        reduction=reduction,
        match="none",
        relational=True,
        min_batch=2,
        ranges={"gamma": (gamma, _POSITIVE)},
        errors=errors,
    )
    student, teacher = _as_float(student_feature, teacher_feature)
    difference = _correlation_matrix(student, gamma, order, kernel) - _correlation_matrix(
        teacher, gamma, order, kernel
    )  # (B, B)
    return _reduce_batch(difference.pow(2).mean(), student.shape[0], reduction)


FEATURE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "hint": hint_loss,
    "attention": attention_loss,
    "similarity": similarity_loss,
    "rkd_distance": rkd_distance_loss,
    "rkd_angle": rkd_angle_loss,
    "pkt": pkt_loss,
    "nst": nst_loss,
    "cc": cc_loss,
}

# Losses defined on the batch as a whole: no reduction="none", "sum" = B · mean.
BATCH_RELATIONAL: frozenset[str] = frozenset(
    {"similarity", "rkd_distance", "rkd_angle", "pkt", "cc"}
)
