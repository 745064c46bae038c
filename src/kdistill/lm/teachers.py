"""The teacher of a language-model distill stage: live, or its top-k read from a cache.

Both are called with the student's input ids (B, T) and the batch's sequence indices
into the training split, and return the keyword arguments of
`kdistill.losses.lm.chunked_divergence` that describe the teacher:

- live: `teacher_hidden` (B, T, H_t), `teacher_head_weight` (V_t, H_t) and
  `teacher_head_bias`; the teacher runs frozen, in eval mode, under
  `torch.inference_mode()`, in its own precision, and the loss builds its logits a
  chunk of tokens at a time (never (B, T, V_t) at once);
- cache: `teacher_topk_ids` and `teacher_topk_logprobs` (B, T, k), read from a
  `kdistill.cache.topk` cache written once by `kdistill.cache.write_teacher_cache`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from kdistill.cache.topk import TopKCache
from kdistill.lm.models import CausalLM
from kdistill.teachers import DTYPES


class LMTeacherSignal(Protocol):
    def __call__(self, input_ids: Tensor, indices: Tensor) -> dict[str, Tensor | None]: ...


class LiveLMTeacher:
    def __init__(self, model: CausalLM, *, precision: str = "fp32") -> None:
        self.model = model.to(DTYPES[precision]).eval().requires_grad_(False)

    def to(self, device: torch.device) -> LiveLMTeacher:
        self.model.to(device)
        return self

    def __call__(self, input_ids: Tensor, indices: Tensor) -> dict[str, Tensor | None]:
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

    def __call__(self, input_ids: Tensor, indices: Tensor) -> dict[str, Tensor | None]:
        ids, logprobs = self.cache.get(indices)  # (B, T, k) each
        return {
            "teacher_topk_ids": ids.to(self.device, non_blocking=True),
            "teacher_topk_logprobs": logprobs.to(self.device, non_blocking=True),
        }
