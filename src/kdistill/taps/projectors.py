"""Projectors: a learned map that brings a student feature to the teacher feature's
shape where the two differ (FitNets' regressor), with adaptive pooling of the larger
of two feature maps of different spatial sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from kdistill.errors import RecipeError

ProjectorKind = Literal["auto", "linear", "conv1x1", "mlp"]

_KINDS = ("auto", "linear", "conv1x1", "mlp")


class FeatureProjector(nn.Module):
    """Brings a student feature and a teacher feature to one shape.

    forward(student_feature, teacher_feature) -> (student', teacher'): optional adaptive
    average pooling of the larger spatial map (either side), then a learned map of the
    student's feature dimension to the teacher's. Its parameters train with the student.
    """

    def __init__(
        self,
        projection: nn.Module | None,
        student_pool: nn.Module | None = None,
        teacher_pool: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.projection = projection
        self.student_pool = student_pool
        self.teacher_pool = teacher_pool

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> tuple[Tensor, Tensor]:
        if self.student_pool is not None:
            student_feature = self.student_pool(student_feature)
        if self.teacher_pool is not None:
            teacher_feature = self.teacher_pool(teacher_feature)
        if self.projection is not None:
            student_feature = self.projection(student_feature)
        return student_feature, teacher_feature


def make_projector(
    student_shape: Sequence[int],
    teacher_shape: Sequence[int],
    *,
    kind: ProjectorKind = "auto",
    hidden: int | None = None,
    pool: Literal["adaptive"] | None = None,
    student_path: str = "student",
    teacher_path: str = "teacher",
) -> FeatureProjector | None:
    """A FeatureProjector from the student's feature shape to the teacher's, or None.

    Shapes include the batch dimension, which is ignored. Supported features:

        (B, D)        vectors         "linear": nn.Linear(D_s, D_t)
        (B, T, D)     token features  "linear" on the last dim; T must be equal
        (B, C, H, W)  feature maps    "conv1x1": nn.Conv2d(C_s, C_t, 1), a plain 1×1
                                      convolution with bias (the FitNets regressor;
                                      no BatchNorm/ReLU, which some CRD-era code adds)
        any of these                  "mlp": Linear/1×1 conv -> ReLU -> Linear/1×1 conv,
                                      with `hidden` units (default D_t or C_t)

    kind="auto" picks linear or conv1x1 by rank, and returns None when the shapes
    are already equal; an explicit kind always builds its map. Feature maps of
    different spatial sizes need pool="adaptive", which average-pools the larger map
    (student or teacher, per axis) to the smaller. Raises RecipeError, naming both
    paths and shapes, when no projector can bridge the two.
    """
    s, t = tuple(int(n) for n in student_shape), tuple(int(n) for n in teacher_shape)
    _check_parameters(kind, hidden, pool)
    pair = f"student {student_path!r} {s} and teacher {teacher_path!r} {t}"
    rank = len(s)
    if rank != len(t):
        raise RecipeError(
            f"Cannot bridge {pair}: their ranks differ ({rank} vs {len(t)}). Tap layers of the "
            "same kind, or tap a module after pooling (e.g. the avgpool before the classifier) "
            "on the side that has a feature map."
        )
    if rank not in (2, 3, 4):
        if s[1:] == t[1:] and kind == "auto":
            return None
        raise RecipeError(
            f"Cannot bridge {pair}: projectors handle (B, D), (B, T, D) and (B, C, H, W) "
            f"features, not rank {rank}. Tap layers whose features have one of these shapes."
        )
    if rank == 3 and s[1] != t[1]:
        raise RecipeError(
            f"Cannot bridge {pair}: they have different token counts ({s[1]} vs {t[1]}); (B, T, D) "
            "features are matched position by position. Give both models the same tokens and "
            "sequence length, or tap pooled (B, D) features."
        )

    student_pool, teacher_pool = _spatial_pools(s, t, pool, pair)
    d_s, d_t = (s[1], t[1]) if rank == 4 else (s[-1], t[-1])
    if kind == "auto":
        if d_s == d_t:
            if student_pool is None and teacher_pool is None:
                return None
            return FeatureProjector(None, student_pool, teacher_pool)
        kind = "conv1x1" if rank == 4 else "linear"
    projection = _projection(kind, rank, d_s, d_t, hidden=hidden, pair=pair)
    return FeatureProjector(projection, student_pool, teacher_pool)


def _check_parameters(kind: str, hidden: int | None, pool: str | None) -> None:
    """One RecipeError listing every bad `kind`, `hidden` and `pool` of make_projector."""
    errors = []
    if kind not in _KINDS:
        errors.append(
            f"The 'kind' parameter of make_projector must be one of {', '.join(map(repr, _KINDS))}. "
            f"Got {kind!r} instead."
        )
    if hidden is not None and (
        isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1
    ):
        errors.append(
            f"The 'hidden' parameter of make_projector must be a positive int or None. "
            f"Got {hidden!r} instead."
        )
    if pool not in (None, "adaptive"):
        errors.append(
            f"The 'pool' parameter of make_projector must be 'adaptive' or None. Got {pool!r} instead."
        )
    if errors:
        raise RecipeError("\n".join(errors))


def _spatial_pools(
    s: tuple[int, ...], t: tuple[int, ...], pool: str | None, pair: str
) -> tuple[nn.Module | None, nn.Module | None]:
    """(student pool, teacher pool) for two feature maps of different spatial sizes:
    adaptive average pooling of the larger map to the smaller, per axis; None for a
    side that keeps its size, and for features that are not maps."""
    if len(s) != 4 or s[2:] == t[2:]:
        return None, None
    if pool != "adaptive":
        raise RecipeError(
            f"Cannot bridge {pair}: their spatial sizes differ ({s[2]}×{s[3]} vs "
            f"{t[2]}×{t[3]}). Tap a teacher layer with a {s[2]}×{s[3]} map (or a student "
            "layer of the teacher's size), or set pool: adaptive to average-pool the "
            "larger map to the smaller."
        )
    size = (min(s[2], t[2]), min(s[3], t[3]))
    student_pool = nn.AdaptiveAvgPool2d(size) if s[2:] != size else None
    teacher_pool = nn.AdaptiveAvgPool2d(size) if t[2:] != size else None
    return student_pool, teacher_pool


def _projection(
    kind: ProjectorKind, rank: int, d_s: int, d_t: int, *, hidden: int | None, pair: str
) -> nn.Module:
    """The learned map of d_s student features to d_t: nn.Linear on the last dimension
    ("linear"), a 1×1 nn.Conv2d on the channels of a feature map ("conv1x1"), or two
    of these with a ReLU between ("mlp", `hidden` wide, default d_t)."""
    if kind == "conv1x1" and rank != 4:
        raise RecipeError(
            f"A conv1x1 projector needs (B, C, H, W) feature maps, but {pair} are rank {rank}; "
            "use kind: linear (or auto)."
        )
    if kind == "linear" and rank == 4:
        raise RecipeError(
            f"A linear projector reads (B, D) or (B, T, D) features, but {pair} are feature "
            "maps; use kind: conv1x1 (or auto)."
        )

    def layer(n_in: int, n_out: int) -> nn.Module:
        return nn.Conv2d(n_in, n_out, kernel_size=1) if rank == 4 else nn.Linear(n_in, n_out)

    if kind == "mlp":
        width = hidden or d_t
        return nn.Sequential(layer(d_s, width), nn.ReLU(), layer(width, d_t))
    return layer(d_s, d_t)
