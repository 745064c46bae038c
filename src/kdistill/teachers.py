"""Teacher signals: a live frozen model, or logits read from a cache on disk.

Both are called with the student's input batch and the batch's indices into the
training split, and return float32 logits (B, C). A live teacher runs in eval mode
under `torch.inference_mode()`, in its own precision; a cached teacher ignores the
inputs and reads rows by index.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LiveTeacher:
    def __init__(self, model: nn.Module, *, precision: str = "fp32") -> None:
        self.dtype = DTYPES[precision]
        self.model = model.to(self.dtype).eval().requires_grad_(False)

    def to(self, device: torch.device) -> LiveTeacher:
        self.model.to(device)
        return self

    def __call__(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(x.to(self.dtype))
        # Leave inference mode: the result is read by the student's autograd graph.
        return logits.float().clone()


class CachedTeacher:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits  # (N_train, C), float16 or float32, memory-mapped

    def to(self, device: torch.device) -> CachedTeacher:
        self.device = device
        return self

    def __call__(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.logits[indices.cpu()].to(x.device, torch.float32)
