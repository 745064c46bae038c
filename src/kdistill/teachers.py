"""Teacher signals: what a distill stage's loss reads of the teacher, batch by batch.

Every signal is a `TeacherSignal`: called with the student's inputs and the batch's
indices into the training split, it returns what the task's loss reads. A live
teacher runs frozen, in eval mode, under `torch.inference_mode()`, in its own
precision; a cached one ignores the inputs and reads rows by index. `models` names
the live modules, so feature taps can be attached to them (empty for a cache).

Classifiers (`kdistill.tasks.classification.steps`): float32 logits (B, C) for an input batch (a
tensor, or token ids and masks by name):

- live: `LiveTeacher`, one frozen model;
- ensemble: `EnsembleTeacher`, several live ones combined (`combine_members`);
- cached dense: `CachedTeacher`, rows of the logits a `kdistill.cache.dense` cache holds.

Language models (`kdistill.tasks.causal_lm.steps`): for input ids (B, T), the keyword
arguments of `kdistill.losses.lm_chunked.chunked_divergence` that describe the teacher:

- live: `LiveLMTeacher`, `teacher_hidden` (B, T, H_t), `teacher_head_weight` (V_t, H_t)
  and `teacher_head_bias`; the loss builds the teacher's logits a chunk of tokens at a
  time (never (B, T, V_t) at once);
- cached top-k: `CachedLMTeacher`, `teacher_topk_ids` and `teacher_topk_logprobs`
  (B, T, k), read from a `kdistill.cache.topk` cache written once by
  `kdistill.cache.write_teacher_cache`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from kdistill.cache.topk import TopKCache
    from kdistill.tasks.causal_lm.models import CausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Output = TypeVar("Output", covariant=True)
# what a language-model signal returns: chunked_divergence's keyword arguments for the teacher
LMTeacherOutput = dict[str, torch.Tensor | None]


class TeacherSignal(Protocol[Output]):
    """What the task's loss reads of the teacher (`Output`: logits (B, C) for a
    classifier, `chunked_divergence` keyword arguments for a language model), for a batch
    of the student's inputs and the batch's indices into the training split. `models`
    names the live modules (empty for a cache); `to(device)` moves the signal there."""

    models: dict[str, nn.Module]

    def __call__(self, x: Any, indices: torch.Tensor, /) -> Output: ...

    def to(self, device: torch.device) -> TeacherSignal[Output]: ...


class LiveTeacher:
    def __init__(self, model: nn.Module, *, precision: str = "fp32") -> None:
        self.dtype = DTYPES[precision]
        self.model = model.to(self.dtype).eval().requires_grad_(False)
        self.models = {"main": self.model}

    def to(self, device: torch.device) -> LiveTeacher:
        self.model.to(device)
        return self

    def __call__(self, x: Any, indices: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            # token ids and masks are not cast
            logits = self.model(**x) if isinstance(x, Mapping) else self.model(x.to(self.dtype))
        # Leave inference mode: the result is read by the student's autograd graph.
        return logits.float().clone()


class EnsembleTeacher:
    """Several frozen teachers combined into one signal.

    combine "logits": the weighted mean of the members' logits.
    combine "probs": the log of the weighted mean of their probabilities (at
    temperature 1), returned as log-probabilities: a softmax of them gives the
    mixture back, and a loss that divides by a temperature T softens the mixture.

    weights: fixed (one per member, normalised to sum 1), or "confidence": per
    sample, softmax over members of minus each member's prediction entropy (in nats),
    so a member that is sure about a sample counts more for that sample.
    """

    def __init__(
        self,
        members: dict[str, nn.Module],
        *,
        combine: str = "logits",
        weights: list[float] | Literal["equal", "confidence"] = "equal",
        precision: str = "fp32",
    ) -> None:
        self.members = [LiveTeacher(m, precision=precision) for m in members.values()]
        self.models = {name: t.model for name, t in zip(members, self.members)}
        self.combine = combine
        if weights == "equal":
            weights = [1.0] * len(self.members)
        self.fixed = None if weights == "confidence" else torch.tensor(weights) / sum(weights)

    def to(self, device: torch.device) -> EnsembleTeacher:
        for member in self.members:
            member.to(device)
        return self

    def __call__(
        self, x: torch.Tensor | Mapping[str, torch.Tensor], indices: torch.Tensor
    ) -> torch.Tensor:
        logits = torch.stack([member(x, indices) for member in self.members])  # (M, B, C)
        return combine_members(logits, combine=self.combine, weights=self.fixed)


def combine_members(
    logits: torch.Tensor, *, combine: str, weights: torch.Tensor | None
) -> torch.Tensor:
    """(M, B, C) member logits -> (B, C) ensemble logits; weights (M,) or None = confidence."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if weights is None:
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (M, B)
        w = torch.softmax(-entropy, dim=0)
    else:
        w = weights.to(logits.device, torch.float32).view(-1, 1).expand(logits.shape[:2])
    if combine == "logits":
        return (w.unsqueeze(-1) * logits.float()).sum(0)
    # log sum_m w_m p_m, with log w = -inf for zero weights
    return torch.logsumexp(log_probs + torch.log(w).unsqueeze(-1), dim=0)


class CachedTeacher:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits  # (N_train, C), float16 or float32, memory-mapped
        self.device = torch.device("cpu")
        self.models: dict[str, nn.Module] = {}

    def to(self, device: torch.device) -> CachedTeacher:
        self.device = device
        return self

    def __call__(self, x: Any, indices: torch.Tensor) -> torch.Tensor:
        return self.logits[indices.cpu()].to(self.device, torch.float32)


class LiveLMTeacher:
    def __init__(self, model: CausalLM, *, precision: str = "fp32") -> None:
        self.model = model.to(DTYPES[precision]).eval().requires_grad_(False)
        self.models: dict[str, nn.Module] = {"main": self.model}

    def to(self, device: torch.device) -> LiveLMTeacher:
        self.model.to(device)
        return self

    def __call__(self, input_ids: torch.Tensor, indices: torch.Tensor) -> LMTeacherOutput:
        with torch.inference_mode():
            hidden = self.model(input_ids)  # (B, T, H_t)
        return {
            # out of inference mode: the loss reads it inside the student's autograd graph
            "teacher_hidden": hidden.clone(),
            "teacher_head_weight": self.model.head_weight,
            "teacher_head_bias": self.model.head_bias,
        }


class CachedLMTeacher:
    def __init__(self, cache: TopKCache, device: torch.device | str = "cpu") -> None:
        self.cache = cache
        self.device = torch.device(device)
        self.models: dict[str, nn.Module] = {}

    def to(self, device: torch.device) -> CachedLMTeacher:
        self.device = device
        return self

    def __call__(self, input_ids: torch.Tensor, indices: torch.Tensor) -> LMTeacherOutput:
        ids, logprobs = self.cache.get(indices)  # (B, T, k) each
        return {
            "teacher_topk_ids": ids.to(self.device, non_blocking=True),
            "teacher_topk_logprobs": logprobs.to(self.device, non_blocking=True),
        }
