"""The teacher's side of a top-k cache: its top k per position, and the cache job.

`teacher_topk` and `teacher_topk_sampled_tail` turn a causal LM's logits into the k
entries per position a cache stores (`kdistill.cache.topk`); `topk_batches` runs the
teacher over the training sequences a batch at a time; `write_teacher_cache` writes,
finishes (after a killed job) or verifies the cache of a run.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdistill.cache.manifest import MANIFEST, TopKCacheSpec, manifest_or_none
from kdistill.cache.topk import TopKBatch, open_topk_cache, write_topk_cache
from kdistill.errors import CacheError

if TYPE_CHECKING:
    from kdistill.tasks.causal_lm.models import CausalLM


def teacher_topk(logits: Tensor, *, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The k most likely tokens and their log-probabilities log_softmax(z / T), largest first.

    logits: (..., V) in any float dtype. Returns ids (..., k) int64 and logprobs (..., k)
    float32 (float64 for float64 logits). The top k of z and of z / T are the same
    tokens, so only one full-size temporary, for the log-sum-exp, is allocated.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise CacheError(
            f"k must be in [1, {logits.shape[-1]}] for {logits.shape[-1]} logits; got {k}"
        )
    if not temperature > 0:
        raise CacheError(f"temperature must be > 0; got {temperature}")
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    values, ids = logits.topk(k, dim=-1)  # (..., k)
    log_normaliser = torch.logsumexp(logits.to(compute) / temperature, dim=-1, keepdim=True)
    return ids, values.to(compute) / temperature - log_normaliser


def teacher_topk_sampled_tail(
    logits: Tensor,
    *,
    k: int,
    exact: int,
    temperature: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """k entries per position: the `exact` most likely tokens with their log-probabilities,
    and k − exact slots that estimate the rest of the distribution without bias.

    The tail estimate (Anshumann et al. 2025, "Sparse logit sampling: accelerating
    knowledge distillation in LLMs", arXiv:2503.16870, who show top-k targets bias the
    student and sampled ones do not): m = k − exact tokens are drawn with replacement
    from the teacher's distribution over the tokens outside the head, p_v / tail_mass;
    each distinct drawn token v gets probability tail_mass · count_v / m. The expected
    value of that estimate is the teacher's tail, token by token, so the expected
    gradient of the forward KL (q − p) is the full distribution's. Slots left over when
    fewer than m distinct tokens are drawn hold other tokens at log-probability −inf
    (probability 0), so ids stay distinct. The entries sum to 1 (up to rounding): there
    is no tail bucket. This estimate serves the forward KL, whose gradient is linear in
    p; the recipe refuses it for the other divergences (for the reverse KL a token
    never drawn would have probability 0).

    logits: (n, T, V), one row per sequence. The draws of row i come from a generator
    seeded with (seed, i) — pass the sequences' own indices through `seed + i` — so a
    resumed writer samples exactly what an uninterrupted one would. Same dtypes as
    `teacher_topk`.
    """
    if not 1 <= exact < k <= logits.shape[-1]:
        raise CacheError(
            f"a sampled tail needs 1 <= exact < k <= vocabulary ({logits.shape[-1]}); "
            f"got exact={exact}, k={k}"
        )
    if not temperature > 0:
        raise CacheError(f"temperature must be > 0; got {temperature}")
    if logits.dim() != 3:
        raise CacheError(f"logits must be (sequences, positions, vocab); got {tuple(logits.shape)}")
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    samples = k - exact
    ids_out, logprobs_out = [], []
    for row, sequence_logits in enumerate(logits):
        generator = torch.Generator(device=logits.device).manual_seed(seed + row)
        log_p = torch.log_softmax(sequence_logits.to(compute) / temperature, -1)  # (T, V)
        head_logprobs, head_ids = log_p.topk(exact, dim=-1)  # (r, exact)
        tail_p = log_p.exp_().scatter_(1, head_ids, 0.0)  # (r, V), the head zeroed
        tail_mass = tail_p.sum(-1, keepdim=True)  # (r, 1)
        # a row whose tail is all zero (a peaked float16 teacher) draws from a flat
        # distribution instead; its entries then get log(0) = −inf below
        empty = tail_mass[:, 0] <= 0
        if empty.any():
            tail_p[empty] = 1.0
            tail_p[empty] = tail_p[empty].scatter(1, head_ids[empty], 0.0)
        drawn = torch.multinomial(tail_p, samples, replacement=True, generator=generator)
        counts = torch.zeros_like(tail_p).scatter_add_(
            1, drawn, torch.ones_like(drawn, dtype=compute)
        )
        counts.scatter_(1, head_ids, -1.0)  # never pick a head token for a spare slot
        count, tail_ids = counts.topk(samples, dim=-1)  # drawn tokens first, then spares
        tail_logprobs = torch.where(
            count > 0,
            torch.log(tail_mass) + torch.log(count.clamp(min=1) / samples),
            -math.inf,
        )
        ids_out.append(torch.cat([head_ids, tail_ids], dim=-1))
        logprobs_out.append(torch.cat([head_logprobs, tail_logprobs], dim=-1))
    return torch.stack(ids_out), torch.stack(logprobs_out)


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
    manifest = manifest_or_none(folder)
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
