"""Teacher signals: a live frozen model, an ensemble of them, or logits read from a cache.

Each is called with the student's input batch and the batch's indices into the
training split, and returns float32 logits (B, C). A live teacher runs in eval mode
under `torch.inference_mode()`, in its own precision; a cached teacher ignores the
inputs and reads rows by index. `models` names the live modules, so feature taps can
be attached to them (empty for a cache).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
