"""The teacher of a language-model distill stage: live, or its top-k read from a cache.

Both are called with the student's input ids (B, T) and the batch's sequence indices
into the training split, and return the keyword arguments of
`kdistill.losses.lm_chunked.chunked_divergence` that describe the teacher:

- live: `teacher_hidden` (B, T, H_t), `teacher_head_weight` (V_t, H_t) and
  `teacher_head_bias`; the teacher runs frozen, in eval mode, under
  `torch.inference_mode()`, in its own precision, and the loss builds its logits a
  chunk of tokens at a time (never (B, T, V_t) at once);
- cache: `teacher_topk_ids` and `teacher_topk_logprobs` (B, T, k), read from a
  `kdistill.lm_cache` top-k cache written once by `write_teacher_cache`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from kdistill.lm.models import CausalLM
from kdistill.lm_cache import (
    MANIFEST,
    TopKBatch,
    TopKCache,
    TopKCacheSpec,
    open_topk_cache,
    teacher_topk,
    teacher_topk_sampled_tail,
    write_topk_cache,
)
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


def topk_batches(
    teacher: CausalLM,
    sequences: Tensor,
    *,
    first: int,
    k: int,
    temperature: float,
    vocab_size: int,
    batch_size: int,
    device: torch.device | str,
    tail_samples: int = 0,
) -> Iterator[TopKBatch]:
    """(start, ids, logprobs) of the teacher's top k over [0, vocab_size) at `temperature`
    (with tail_samples = m > 0: its top k − m and m tokens sampled from the rest,
    `teacher_topk_sampled_tail`), for the sequences from `first` on. Logits exist for
    one batch at a time."""
    teacher.eval()
    for start in range(first, len(sequences), batch_size):
        inputs = sequences[start : start + batch_size, :-1].to(device)  # (n, T)
        with torch.inference_mode():
            logits = teacher.logits(teacher(inputs))[..., :vocab_size]  # (n, T, V)
            if tail_samples:  # draws seeded by sequence index: a resumed job redraws the same
                ids, logprobs = teacher_topk_sampled_tail(
                    logits, k=k, exact=k - tail_samples, temperature=temperature, seed=start
                )
            else:
                ids, logprobs = teacher_topk(logits, k=k, temperature=temperature)
        yield start, ids.cpu(), logprobs.cpu()


def write_teacher_cache(
    folder: Path,
    spec: TopKCacheSpec,
    teacher: CausalLM,
    sequences: Tensor,
    *,
    batch_size: int,
    shard_sequences: int,
    device: torch.device | str,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write (or finish) the top-k cache in `folder` and return what happened.

    A complete cache is only verified (a stale or damaged one is refused by
    `open_topk_cache`); an incomplete one, left by a killed job, continues after its
    last complete shard; overwrite=True deletes the folder first.
    """
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    manifest = _manifest_or_none(folder)
    if (folder / MANIFEST).exists() and (manifest is None or manifest.get("complete") is True):
        open_topk_cache(folder, expect=spec)  # refuses a stale, damaged or unreadable cache
        return {"folder": str(folder), "reused": True, "seconds": 0.0}
    started = time.perf_counter()
    resume = manifest is not None

    def batches(first: int) -> Iterator[TopKBatch]:
        return topk_batches(
            teacher,
            sequences,
            first=first,
            k=spec.k,
            temperature=spec.temperature,
            vocab_size=spec.vocab_size,
            batch_size=batch_size,
            device=device,
            tail_samples=spec.tail_samples,
        )

    written = write_topk_cache(
        folder, spec, batches, shard_size_sequences=shard_sequences, resume=resume
    )
    open_topk_cache(folder, expect=spec)
    return {
        "folder": str(folder),
        "reused": False,
        "resumed": resume,
        "seconds": round(time.perf_counter() - started, 3),
        "bytes": sum(shard["bytes"] for shard in written["shards"]),
        "bytes_per_token": written["bytes_per_token"],
    }


def _manifest_or_none(folder: Path) -> dict[str, Any] | None:
    """The manifest as stored, or None when there is none or it cannot be read."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None
