"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020): the NCE
objective (`crd_nce_loss`) and the module that holds CRD's embedding heads and memory
banks (`CRDMemory`). A module, not a pure function, because it owns parameters and
buffers; the objective builds it once the feature widths are known.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import LossInputError
from kdistill.losses.features import (
    Reduction,
    _int_errors,
    _reduction_errors,
    _rows,
    _tensor_errors,
)
from kdistill.losses.logits import (
    _POSITIVE,
    _UNIT_OPEN_RIGHT,
    _as_float,
    _range_errors,
    _reduce,
)

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
