"""The translation teacher's top-k cache: for every training pair, the teacher's k most
likely tokens and their log-probabilities (at the distillation temperature) at each
target position, teacher-forced on the reference, in the language models' cache format
(`kdistill.cache.topk`: shards, manifest, crash-safe, refused when stale).

A pair is one cache sequence of data.max_target_length positions: the decoder reads the
reference padded to that length, so every pair has the same shape; positions past a
pair's end hold the teacher's guesses on padding, which the loss never counts. The
spec names the teacher's weights, the tokenizers, a digest of the training pairs and
the length limits, k, the temperature and the tail sampling.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdistill.cache.manifest import TopKCacheSpec
from kdistill.cache.topk import TopKBatch, TopKCache, open_topk_cache, write_topk_cache
from kdistill.cache.topk_teacher import teacher_topk, teacher_topk_sampled_tail
from kdistill.recipe.seq2seq import Seq2SeqRecipe
from kdistill.tasks.seq2seq.data import Pairs, Seq2SeqData, batch, texts_digest
from kdistill.tasks.seq2seq.models import Seq2SeqLM


def cache_spec(recipe: Seq2SeqRecipe, data: Seq2SeqData, teacher_fingerprint: str) -> TopKCacheSpec:
    assert recipe.teacher is not None
    cache = recipe.teacher.cache
    section = data.section
    pairs = hashlib.sha256(
        f"{texts_digest(data.train.text.sources)}/{texts_digest(data.train.text.targets)}/"
        f"{section.max_source_length}/{section.max_target_length}".encode()
    ).hexdigest()
    return TopKCacheSpec(
        teacher=teacher_fingerprint,
        tokenizer=hashlib.sha256(data.tokenizers.key.encode()).hexdigest(),
        dataset=pairs,
        k=cache.top_k,
        temperature=recipe.cache_temperature(),
        seq_len=section.max_target_length,
        num_sequences=len(data.train),
        vocab_size=data.tokenizers.target.get_vocab_size(),
        encoding=cache.encoding,
        tail_samples=cache.tail_samples,
    )


def cache_folder(recipe: Seq2SeqRecipe, run_dir: Path, seed: int) -> Path:
    assert recipe.teacher is not None
    if recipe.teacher.cache.dir is not None:
        return Path(recipe.teacher.cache.dir).expanduser()
    return run_dir / "cache" / f"topk-teacher-seed{seed}"


def _batches(
    teacher: Seq2SeqLM,
    train: Pairs,
    spec: TopKCacheSpec,
    *,
    first: int,
    pad_id: int,
    batch_size: int,
    device: Any,
) -> Iterator[TopKBatch]:
    teacher.eval()
    for start in range(first, len(train), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(train)))
        inputs = batch(train, rows, pad_id=pad_id, start_id=teacher.start_id)
        inputs.pop("labels")
        length = spec.seq_len
        for key in ("decoder_input_ids", "decoder_attention_mask"):
            value = inputs[key]
            room = length - value.shape[1]
            fill = pad_id if key == "decoder_input_ids" else 0
            inputs[key] = torch.cat([value, value.new_full((len(value), room), fill)], 1)
        with torch.inference_mode():
            made = {k: v.to(device) for k, v in inputs.items()}
            logits = teacher(**made)[..., : spec.vocab_size]  # (n, L, V)
            if spec.tail_samples:
                ids, logprobs = teacher_topk_sampled_tail(
                    logits, k=spec.k, exact=spec.k - spec.tail_samples,
                    temperature=spec.temperature, seed=start,
                )  # fmt: skip
            else:
                ids, logprobs = teacher_topk(logits, k=spec.k, temperature=spec.temperature)
        yield start, ids.cpu(), logprobs.cpu()


def write_cache(
    folder: Path,
    spec: TopKCacheSpec,
    teacher: Seq2SeqLM,
    data: Seq2SeqData,
    *,
    batch_size: int,
    shard_sequences: int,
    device: Any,
) -> dict[str, Any]:
    """Write (or finish after a killed job, or verify) the cache; what happened."""
    from kdistill.cache.manifest import MANIFEST, manifest_or_none

    manifest = manifest_or_none(folder)
    if (folder / MANIFEST).exists() and (manifest is None or manifest.get("complete") is True):
        open_topk_cache(folder, expect=spec)  # refuses a stale or damaged cache
        return {"folder": str(folder), "reused": True, "seconds": 0.0}
    started = time.perf_counter()
    teacher = teacher.to(device)
    written = write_topk_cache(
        folder,
        spec,
        lambda first: _batches(
            teacher,
            data.train,
            spec,
            first=first,
            pad_id=data.pad_id,
            batch_size=batch_size,
            device=device,
        ),
        shard_size_sequences=shard_sequences,
        resume=manifest is not None,
    )
    open_topk_cache(folder, expect=spec)
    return {
        "folder": str(folder),
        "reused": False,
        "seconds": round(time.perf_counter() - started, 3),
        "bytes": sum(shard["bytes"] for shard in written["shards"]),
        "bytes_per_token": written["bytes_per_token"],
    }


class CachedSeq2SeqTeacher:
    """The teacher's cached top-k of the training pairs, cut to each batch's targets."""

    def __init__(self, cache: TopKCache, device: Any) -> None:
        self.cache, self.device = cache, device

    def __call__(self, inputs: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor | None]:
        ids, logprobs = self.cache.get(rows)  # (B, L, k)
        length = inputs["decoder_input_ids"].shape[1]
        return {
            "teacher_topk_ids": ids[:, :length].to(self.device, non_blocking=True),
            "teacher_topk_logprobs": logprobs[:, :length].to(self.device, non_blocking=True),
        }
