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
function `crd_nce_loss`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import LossInputError
from kdistill.losses.logits import (
    _NON_NEGATIVE,
    _POSITIVE,
    _UNIT_OPEN_RIGHT,
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


# ----- CRD ---------------------------------------------------------------------------------

_NCE_EPS = 1e-7  # as in RepDistiller's ContrastLoss


def crd_memory_bytes(n_data: int, feat_dim: int) -> int:
    """Bytes of CRD's two float32 memory banks: 2 × n_data × feat_dim × 4."""
    return 2 * n_data * feat_dim * 4


def crd_nce_loss(
    positive_scores: Tensor,
    negative_scores: Tensor,
    *,
    n_data: int,
    normalizer: float | Tensor,
    temperature: float = 0.07,
    reduction: Reduction = "mean",
) -> Tensor:
    """The NCE objective of CRD (Tian, Krishnan & Isola, ICLR 2020, "Contrastive
    Representation Distillation", Eq. 18), one side (student or teacher anchor).

    Scores are inner products of unit embeddings: s_i⁺ with the positive (the same
    sample in the other model's memory) and s_ik⁻ with K negatives. With
    P = exp(s / τ) / Z, noise density 1/N (N = n_data) and ε = 1e-7:

        NCE_i = −log(P_i⁺ / (P_i⁺ + K/N + ε)) − Σ_k log((K/N) / (P_ik⁻ + K/N + ε)),

    which is RepDistiller's ContrastLoss per sample (its value is the batch mean).
    Computed in log space, so P underflowing at a small τ gives no log(0).

    Shapes: positive_scores (B,), negative_scores (B, K); normalizer Z > 0 (a float or
    a 0-d tensor). Returns a scalar, or (B,) for reduction="none".
    """
    errors = _int_errors("crd_nce_loss", "n_data", n_data, 1)
    errors += _range_errors("crd_nce_loss", {"temperature": (temperature, _POSITIVE)})
    if isinstance(normalizer, Tensor):
        if normalizer.ndim != 0:
            errors.append(
                f"crd_nce_loss: normalizer must be a number or a 0-d tensor; got shape "
                f"{tuple(normalizer.shape)}."
            )
    else:
        errors += _range_errors("crd_nce_loss", {"normalizer": (normalizer, _POSITIVE)})
    errors += _reduction_errors("crd_nce_loss", reduction, relational=False)
    for name, scores, ndim in (
        ("positive_scores", positive_scores, 1),
        ("negative_scores", negative_scores, 2),
    ):
        if not isinstance(scores, Tensor) or scores.ndim != ndim or not scores.is_floating_point():
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            errors.append(
                f"crd_nce_loss: {name} must be a {ndim}-D floating-point tensor; got {shape}"
                + (f" of {scores.dtype}" if isinstance(scores, Tensor) else "")
                + "."
            )
    if not errors:
        batch, negatives = negative_scores.shape
        if positive_scores.shape[0] != batch:
            errors.append(
                f"crd_nce_loss: positive_scores has shape {tuple(positive_scores.shape)} but "
                f"negative_scores has shape {tuple(negative_scores.shape)}; they must be (B,) "
                "and (B, K) for the same B."
            )
        if negatives == 0 or batch == 0:
            errors.append(
                f"crd_nce_loss needs at least one sample and one negative; got "
                f"negative_scores of shape {tuple(negative_scores.shape)}."
            )
    if errors:
        raise LossInputError("\n".join(errors))

    positive, negative = _as_float(positive_scores, negative_scores)
    log_z = torch.as_tensor(normalizer, dtype=positive.dtype, device=positive.device).log()
    k = negative.shape[1]
    noise = k / n_data  # K · P_noise
    log_noise, log_noise_eps = math.log(noise), math.log(noise + _NCE_EPS)
    log_p_positive = positive / temperature - log_z  # (B,)
    log_p_negative = negative / temperature - log_z  # (B, K)
    # log(a / (P + c)) = log a − logaddexp(log P, log c)
    log_c = positive.new_tensor(log_noise_eps)
    log_h_positive = log_p_positive - torch.logaddexp(log_p_positive, log_c)  # (B,)
    log_not_h_negative = log_noise - torch.logaddexp(log_p_negative, log_c)  # (B, K)
    per_sample = -(log_h_positive + log_not_h_negative.sum(dim=1))  # (B,)
    return _reduce(per_sample, reduction)


class CRDMemory(nn.Module):
    """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020,
    "Contrastive Representation Distillation"), the stateful part, following the
    authors' RepDistiller code (CRDLoss + ContrastMemory).

    Holds:
    * two embedding heads, linear + L2 normalisation: student_dim → feat_dim and
      teacher_dim → feat_dim (trainable: give their parameters to the optimizer);
    * two memory banks `student_memory` and `teacher_memory`, (n_data, feat_dim)
      float32 buffers of unit rows, one per training sample. Memory: 2 × n_data ×
      feat_dim × 4 bytes (`crd_memory_bytes`), e.g. 51.2 MB for CIFAR-100's 50,000
      images at feat_dim 128, 1.31 GB for ImageNet's 1.28 M. Each step also gathers
      B × (K + 1) rows from each bank: 2 × B × (K + 1) × feat_dim × 4 bytes, 1.07 GB
      at B = 64, K = 16384, as in the original;
    * the normalisers Z (buffers `z_student`, `z_teacher`, −1 until set).

    One forward, for embeddings v_s, v_t of the batch and its dataset indices y:
    1. draw K negatives per sample, uniformly with replacement from the n_data − 1
       other samples (RepDistiller draws uniformly from all n_data, positive
       included); or take `negative_indices` as given;
    2. score v_s against the teacher memory at [y, negatives] and v_t against the
       student memory: inner products, (B, 1 + K) each;
    3. set each Z once, on the first forward, to Z = N · mean(exp(score / τ)) over
       that batch's scores, and keep it fixed (detached) afterwards, as their code;
    4. loss_i = NCE(student side)_i + NCE(teacher side)_i (`crd_nce_loss`);
    5. in training mode only, update the memory rows of y with momentum m:
       row ← normalise(m · row + (1 − m) · v), student and teacher bank each. In eval
       mode the memory is read, never written.

    Reductions are per sample: "mean" equals RepDistiller's CRDLoss, "sum" the total,
    "none" (B,) values. `indices` are positions in the training dataset the memory was
    sized for (0 ≤ y < n_data); with duplicate indices in one batch, which update
    wins is unspecified. Randomness: the memory initialisation, the head
    initialisation and the negatives come from `generator` when given (any device;
    a generator on the memory's device saves a copy per step), otherwise from the
    global RNG, so `torch.manual_seed` makes runs repeat. The generator's state is
    not part of `state_dict`. Under several processes each keeps its own memory.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        *,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        errors: list[str] = []
        for name, value, low in (
            ("student_dim", student_dim, 1),
            ("teacher_dim", teacher_dim, 1),
            ("n_data", n_data, 2),
            ("feat_dim", feat_dim, 1),
            ("num_negatives", num_negatives, 1),
        ):
            errors += _int_errors("CRDMemory", name, value, low)
        errors += _range_errors(
            "CRDMemory",
            {"temperature": (temperature, _POSITIVE), "momentum": (momentum, _UNIT_OPEN_RIGHT)},
        )
        if not errors and num_negatives > n_data - 1:
            errors.append(
                f"CRDMemory: the dataset has n_data={n_data} samples, so each sample has only "
                f"{n_data - 1} others to draw negatives from, but num_negatives={num_negatives}. "
                f"Lower num_negatives to at most {n_data - 1} (the paper uses 16384 for "
                "CIFAR-100's 50,000 training images), or check that n_data is the size of the "
                "training dataset."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            errors.append(
                f"CRDMemory: generator must be a torch.Generator or None; got "
                f"{type(generator).__name__}."
            )
        if errors:
            raise LossInputError("\n".join(errors))

        self.n_data = n_data
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.momentum = momentum
        self.generator = generator
        self.embed_student = nn.Linear(student_dim, feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, feat_dim)
        self.register_buffer("student_memory", self._initial_memory())
        self.register_buffer("teacher_memory", self._initial_memory())
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        if generator is not None:
            for head in (self.embed_student, self.embed_teacher):
                self._reset_linear(head)

    student_memory: Tensor
    teacher_memory: Tensor
    z_student: Tensor
    z_teacher: Tensor

    def _initial_memory(self) -> Tensor:
        """Uniform in ±√(3 / feat_dim) as RepDistiller (unit norm on average), then made
        exactly unit norm."""
        device = self.generator.device if self.generator is not None else None
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        memory = torch.rand(self.n_data, self.feat_dim, generator=self.generator, device=device)
        return F.normalize(memory.mul_(2 * bound).sub_(bound), dim=1).cpu()

    def _reset_linear(self, linear: nn.Linear) -> None:
        """nn.Linear's default initialisation, drawn from self.generator."""
        assert self.generator is not None
        device = self.generator.device
        weight = torch.empty_like(linear.weight, device=device)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=self.generator)
        bound = 1 / math.sqrt(linear.in_features)
        bias = torch.empty_like(linear.bias, device=device)
        nn.init.uniform_(bias, -bound, bound, generator=self.generator)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)

    @property
    def memory_bytes(self) -> int:
        return self.student_memory.nbytes + self.teacher_memory.nbytes

    def extra_repr(self) -> str:
        return (
            f"n_data={self.n_data}, feat_dim={self.feat_dim}, "
            f"num_negatives={self.num_negatives}, temperature={self.temperature}, "
            f"momentum={self.momentum}, memory={self.memory_bytes / 1e6:.1f} MB"
        )

    def sample_negatives(self, indices: Tensor) -> Tensor:
        """(B,) dataset indices -> (B, K) negatives, uniform over the other n_data − 1."""
        device = self.generator.device if self.generator is not None else indices.device
        draws = torch.randint(
            0,
            self.n_data - 1,
            (indices.shape[0], self.num_negatives),
            generator=self.generator,
            device=device,
        ).to(indices.device)
        return draws + (draws >= indices[:, None]).long()  # skip the positive itself

    def _embed(self, head: nn.Linear, feature: Tensor) -> Tensor:
        dtype = self.student_memory.dtype
        rows = _rows(feature).to(head.weight.dtype)
        return F.normalize(head(rows).to(dtype), dim=1)  # (B, feat_dim), unit rows

    def _normalizer(self, z: Tensor, scores: Tensor) -> Tensor:
        """Z, estimated from the first batch's scores and then kept (no host sync)."""
        with torch.no_grad():
            estimate = (scores / self.temperature).exp().mean() * self.n_data
            z.copy_(torch.where(z > 0, z, estimate))
        return z.clone()

    def _check_inputs(
        self,
        student_feature: Tensor,
        teacher_feature: Tensor,
        indices: Tensor,
        negative_indices: Tensor | None,
        reduction: str,
    ) -> None:
        errors = _reduction_errors("CRDMemory", reduction, relational=False)
        features = {"student_feature": student_feature, "teacher_feature": teacher_feature}
        for name, feature in features.items():
            errors += _tensor_errors("CRDMemory", name, feature, maps=False)
        if errors:
            raise LossInputError("\n".join(errors))
        batch = student_feature.shape[0]
        for name, feature, width in (
            ("student_feature", student_feature, self.embed_student.in_features),
            ("teacher_feature", teacher_feature, self.embed_teacher.in_features),
        ):
            if feature.shape[0] != batch:
                errors.append(
                    f"CRDMemory: student_feature has batch size {batch} but {name} has shape "
                    f"{tuple(feature.shape)}; both must hold the same samples."
                )
            elif _rows(feature).shape[1] != width:
                errors.append(
                    f"CRDMemory: {name} has shape {tuple(feature.shape)}, i.e. "
                    f"{_rows(feature).shape[1]} values per sample, but its embedding head was "
                    f"built for {width}. Build CRDMemory with the tapped layer's flattened width."
                )
        if batch == 0:
            errors.append("CRDMemory: got an empty batch; skip empty batches.")
        errors += self._index_errors("indices", indices, batch, ndim=1)
        if negative_indices is not None:
            errors += self._index_errors("negative_indices", negative_indices, batch, ndim=2)
        if errors:
            raise LossInputError("\n".join(errors))

    def _index_errors(self, name: str, index: object, batch: int, *, ndim: int) -> list[str]:
        if not isinstance(index, Tensor):
            return [f"CRDMemory: {name} must be a torch.Tensor; got {type(index).__name__}."]
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            return [
                f"CRDMemory: {name} must be an integer tensor of dataset indices; "
                f"got {index.dtype}."
            ]
        expected = "(B,), one dataset index per sample" if ndim == 1 else "(B, K), K ≥ 1"
        if index.ndim != ndim or index.shape[0] != batch or index.numel() == 0:
            return [
                f"CRDMemory: {name} must have shape {expected}, with B = {batch} the batch "
                f"size of the features; got {tuple(index.shape)}."
            ]
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= self.n_data:
            return [
                f"CRDMemory: {name} must be dataset indices in [0, {self.n_data}); got values in "
                f"[{low}, {high}]. Pass each sample's position in the training dataset the "
                "memory was built for (n_data)."
            ]
        return []

    def forward(
        self,
        student_feature: Tensor,
        teacher_feature: Tensor,
        indices: Tensor,
        *,
        negative_indices: Tensor | None = None,
        reduction: Reduction = "mean",
    ) -> Tensor:
        """CRD loss of a batch: (B, ...) student and teacher features, (B,) dataset indices,
        optionally (B, K) negative indices. Returns a scalar, or (B,) for "none"."""
        self._check_inputs(student_feature, teacher_feature, indices, negative_indices, reduction)
        device = self.student_memory.device
        indices = indices.to(device=device, dtype=torch.long)
        if negative_indices is None:
            negative_indices = self.sample_negatives(indices)
        v_s = self._embed(self.embed_student, student_feature)  # (B, d)
        v_t = self._embed(self.embed_teacher, teacher_feature)  # (B, d)
        negative_indices = negative_indices.to(device=device, dtype=torch.long)
        rows = torch.cat([indices[:, None], negative_indices], dim=1)  # (B, 1 + K)
        # Each model's embedding is scored against the other model's memory.
        scores_s = (self.teacher_memory[rows] @ v_s[:, :, None]).squeeze(2)  # (B, 1 + K)
        scores_t = (self.student_memory[rows] @ v_t[:, :, None]).squeeze(2)  # (B, 1 + K)
        per_sample = self._side_loss(scores_s, self.z_student) + self._side_loss(
            scores_t, self.z_teacher
        )  # (B,)
        if self.training:
            self._update_memory(self.student_memory, indices, v_s)
            self._update_memory(self.teacher_memory, indices, v_t)
        return _reduce(per_sample, reduction)

    def _side_loss(self, scores: Tensor, z: Tensor) -> Tensor:
        """(B, 1 + K) scores, positive first -> (B,) NCE values of one side."""
        return crd_nce_loss(
            scores[:, 0],
            scores[:, 1:],
            n_data=self.n_data,
            normalizer=self._normalizer(z, scores),
            temperature=self.temperature,
            reduction="none",
        )

    @torch.no_grad()
    def _update_memory(self, memory: Tensor, indices: Tensor, embedding: Tensor) -> None:
        mixed = self.momentum * memory[indices] + (1 - self.momentum) * embedding
        memory.index_copy_(0, indices, F.normalize(mixed, dim=1).to(memory.dtype))
