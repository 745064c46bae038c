"""Offline top-k teacher cache for language-model distillation.

The teacher runs once over the packed training sequences. For every position it
keeps the k most likely next tokens and their log-probabilities at the
distillation temperature, log_softmax(z / T), and the probability mass of all
other tokens (the tail). Training then reads these instead of running the teacher.

Which k entries (TopKCacheSpec.tail_samples; recipe key teacher.cache.tail_samples):
    0 (the default)  the k most likely tokens; the loss adds one bucket for the rest.
                     The student then learns nothing about how the teacher spreads its
                     tail, which for a teacher that keeps much mass outside its top k
                     is most of the signal (BENCHMARKS.md §7).
    m > 0            the k − m most likely tokens exactly, and m tokens drawn from the
                     teacher's distribution over the other tokens, each distinct one at
                     tail_mass · count / m (`teacher_topk_sampled_tail`, after
                     Anshumann et al. 2025): an unbiased estimate of the whole
                     distribution, so the forward-KL gradient is right on average.
                     The entries sum to 1; unused slots hold other tokens at −inf.

Folder layout:
    manifest.json               the spec (teacher, tokenizer, dataset, k, temperature,
                                seq_len, num_sequences, vocab_size, tail_samples when
                                > 0), the encoding and
                                one entry per shard: file, sequence range, bytes, sha256
    shard-0000000000.bin        sequences [0, shard_size)
    shard-0000000256.bin        ...

A shard of n sequences of T positions is little-endian arrays back to back, of a
fixed size per position, so a sequence is read in place from a memory map. Two
encodings (TopKCacheSpec.encoding; recipe key teacher.cache.encoding):

exact (the default):
    tail_mass  (n, T)     float32   1 - sum of the top-k probabilities, computed in
                                    float64 from the log-probs as given (before rounding)
    logprobs   (n, T, k)  float16   the top-k log-probabilities, in the order given
    ids        (n, T, k)  uint8, uint16 or 3-byte uint24: the narrowest that holds
                                    vocab_size - 1

compact (entries sorted by log-prob, largest first, ids kept aligned):
    tail_mass  (n, T)     float32   as above, from the exact log-probs
    exact      (n, T, e)  float16   the log-probs of ranks 0 .. e-1, e = min(3, k)
    low        (n, T)     float16   rank k-1: max(log p_{k-1}, log p_{e-1} - 20), so the
                                    quantised range spans at most 20 nats (absent if k <= e)
    knots      (n, T, m)  uint8     ranks r_1 < ... < r_m (m = min(ceil(k/4), k-e-1)):
                                    code c is the value high - c/255 (high - low), with
                                    high the stored log p_{e-1}
    ids        (n, T, ceil(k b / 8)) uint8: the k ids at b = ceil(log2 vocab_size) bits
                                    each, id j in bits [j b, (j+1) b) of the row
    The knots are every rank from e on, then spaced geometrically up to k-1 (sorted
    log-probs are rough at single ranks, where consecutive gaps are random, and
    smooth over many ranks). The ranks between two stored ranks ("anchors") are
    interpolated linearly in log(rank + 1). The reader then renormalises: it adds
    one constant to all k log-probs so that their probabilities sum to 1 - tail_mass
    (so the tail bucket a loss rebuilds from them, 1 - sum p, is the stored one) and
    clamps them at 0. Each shard is checked against the layout in the manifest.

Size per token: exact 4 + k (2 + id bytes); compact 4 + 2e + 2 + m + ceil(k b / 8),
see `topk_bytes_per_token`. Against 100,514 B for dense float16 logits of a
50,257-token vocabulary:

    k     vocab    exact  compact
    64    2,048    260    116
    64    50,257   260    156
    128   2,048    516    220
    128   50,257   516    300    (DistillKit: ~300 B at k = 128)

The ids are most of a compact cache (256 of 300 B at k = 128, vocabulary 50,257):
the log-probs of 128 entries take 40 B, about 2.5 bits each.

Precision, exact: float16 rounds log p to a relative 2^-11, so each stored
probability is within a factor exp(±2^-11 · |log p|) of the teacher's and the summed
absolute error over the top k is at most about 2^-11 · sum_j p_j |log p_j| (≈ 3e-4
on typical distributions).

Precision, compact: ranks 0 .. e-1 as exact. A rank r between anchors a < r < b has
log p_b <= log p_r <= log p_a (the entries are sorted), and its decoded value lies in
the same bracket widened by the code rounding δ <= (high - low)/510 <= 0.04 nats
(plus the float16 rounding of high and low), so before renormalising
|p̂_r - p_r| <= p_a e^δ - p_b e^-δ; anchors are within a factor e^±δ. Renormalising
moves at most as much mass as the decoding error, so it at most doubles the summed
error. Values more than 20 nats below rank e-1 (including -inf) decode as about
log p_{e-1} - 20 (together < k e^-20 p_{e-1}). Measured by
benchmarks/cache_encoding.py, per position, the sum over the top k of |p̂ - p| on
average (worst) and KL(exact top-k and tail buckets ‖ decoded) on average:

    distribution                          k     compact                   exact
    GPT-2 teacher of shakespeare_gpt_     128   4.9e-3 (1.1e-2), 5.9e-5   5.5e-4, 3.5e-7
      small_from_gpt, vocab 2,048, T = 1  64    6.4e-3 (2.3e-2), 1.4e-4   4.4e-4, 2.6e-7
    logits ~ N(0, 3²), vocab 50,257       128   3.5e-3 (5.5e-3), 3.9e-5   4.5e-4, 2.7e-7
                                          64    4.8e-3 (8.9e-3), 9.6e-5   3.6e-4, 2.1e-7

So compact moves about 0.5% of the probability, ten times what float16 rounding
does. Most of it is the interpolation (single ranks are rough): 16-bit knot codes
would only remove a tenth of it. Other layouts of the same 40 B at k = 128 measured
worse on the shakespeare teacher: 8 exact ranks and fewer knots 6e-3; a least-squares
polynomial in the rank (float32 coefficients, DistillKit's approach without its
residuals) 1.4e-2 at best; a per-position affine range with 1-bit codes (all that
fits) 0.3. Decoding takes 2 to 4 µs per token on one CPU core (numpy).

Crash safety: each shard is written to `<name>.tmp`, fsynced, renamed, and only
then recorded in the manifest (rewritten atomically). A killed job leaves at
worst a stray .tmp file and unrecorded sequences; `TopKCacheWriter(...,
resume=True)` verifies the recorded shards and continues after the last one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from kdistill.checkpoint import atomic_write_json, file_sha256
from kdistill.errors import CacheError

FORMAT = "kdistill-topk-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOGPROB_DTYPE = "float16"
TAIL_DTYPE = "float32"
_ID_DTYPES = {1: "uint8", 2: "uint16", 3: "uint24"}
_MAX_VOCAB = 1 << 24
ENCODINGS = ("exact", "compact")
# compact: ranks kept in float16, knot code width, widest quantised range (nats)
COMPACT_EXACT_RANKS = 3
COMPACT_CODE_LEVELS = 255
COMPACT_CLIP_NATS = 20.0
_FLOAT16_LOWEST = float(np.finfo(np.float16).min)
# log-probs a little above 0 or top-k masses a little above 1 are float rounding
_LOGPROB_SLACK = 1e-4
_MASS_SLACK = 1e-3

TopKBatch = tuple[int, Tensor, Tensor]  # (first sequence index, ids (n, T, k), logprobs (n, T, k))


@dataclass(frozen=True)
class TopKCacheSpec:
    """What a top-k cache holds; the reader refuses a cache whose spec differs.

    teacher: fingerprint of the teacher (e.g. sha256 of its weights).
    tokenizer: `tokenizer_fingerprint` of the tokenizer shared by teacher and student.
    dataset: `dataset_fingerprint` of the packed sequences the teacher read.
    k: entries kept per position. temperature: T in log_softmax(z / T).
    seq_len: positions per sequence. num_sequences: sequences in the dataset.
    vocab_size: the teacher's output size; ids are below it.
    encoding: "exact" (float16 log-probs, byte-aligned ids) or "compact" (ids at
    ceil(log2 vocab_size) bits, most log-probs as 8-bit knots); see the module docstring.
    tail_samples: 0 keeps the k most likely tokens (the rest is one implicit tail
    bucket); m > 0 keeps the k − m most likely exactly and fills m entries with tokens
    sampled from the rest of the distribution (`teacher_topk_sampled_tail`).
    """

    teacher: str
    tokenizer: str
    dataset: str
    k: int
    temperature: float
    seq_len: int
    num_sequences: int
    vocab_size: int
    encoding: Literal["exact", "compact"] = "exact"
    tail_samples: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be a non-empty string, got {getattr(self, name)!r}"
            for name in ("teacher", "tokenizer", "dataset")
            if not isinstance(getattr(self, name), str) or not getattr(self, name)
        ]
        for name in ("k", "seq_len", "num_sequences", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.vocab_size, int) and self.vocab_size > _MAX_VOCAB:
            problems.append(
                f"vocab_size must be at most 2^24 = {_MAX_VOCAB}, got {self.vocab_size}"
            )
        if (
            isinstance(self.k, int)
            and isinstance(self.vocab_size, int)
            and self.k > self.vocab_size
        ):
            problems.append(f"k ({self.k}) cannot exceed vocab_size ({self.vocab_size})")
        temperature = self.temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            problems.append(f"temperature must be a finite number > 0, got {temperature!r}")
        if self.encoding not in ENCODINGS:
            problems.append(f"encoding must be one of {list(ENCODINGS)}, got {self.encoding!r}")
        samples = self.tail_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            problems.append(f"tail_samples must be an integer >= 0, got {samples!r}")
        elif isinstance(self.k, int) and samples >= self.k:
            problems.append(
                f"tail_samples ({samples}) must be below k ({self.k}): at least one entry "
                "holds the teacher's most likely token exactly"
            )
        if problems:
            raise CacheError("invalid top-k cache spec: " + "; ".join(problems))

    @property
    def id_bytes(self) -> int:
        return 1 if self.vocab_size <= 1 << 8 else 2 if self.vocab_size <= 1 << 16 else 3


def bytes_per_token(manifest: dict[str, Any]) -> int:
    """Bytes the cache described by `manifest` stores per token (per position)."""
    encoding = manifest["encoding"]
    if encoding.get("name", "exact") == "compact":
        return topk_bytes_per_token(manifest["k"], manifest["vocab_size"], "compact")
    id_bytes = {name: size for size, name in _ID_DTYPES.items()}[encoding["ids"]]
    return _bytes_per_token(manifest["k"], id_bytes)


def topk_bytes_per_token(k: int, vocab_size: int, encoding: str = "exact") -> int:
    """Bytes per token (per position) of a top-k cache in `encoding` ("exact" or
    "compact"), e.g. 516 and 300 at k = 128 over 50,257 tokens."""
    if encoding == "compact":
        return _compact_layout(k, vocab_size).bytes_per_token
    if encoding != "exact":
        raise CacheError(f"encoding must be one of {list(ENCODINGS)}; got {encoding!r}")
    id_bytes = 1 if vocab_size <= 1 << 8 else 2 if vocab_size <= 1 << 16 else 3
    return _bytes_per_token(k, id_bytes)


def dense_bytes_per_token(vocab_size: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes per token of a dense cache of all `vocab_size` logits in `dtype`."""
    return vocab_size * torch.empty((), dtype=dtype).element_size()


def _bytes_per_token(k: int, id_bytes: int) -> int:
    return 4 + k * (2 + id_bytes)


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


# ----------------------------------------------------------------------------- writer


class TopKCacheWriter:
    """Writes a top-k cache shard by shard; `resume=True` continues a killed job.

    Give batches in sequence order with `add(start, ids, logprobs)`; sequences
    before `next_sequence` (already stored) are skipped, so after a resume the
    teacher can start at `next_sequence` or replay from 0. The compact encoding
    sorts each position's entries by log-prob (largest first) before storing them. Every
    `shard_size_sequences` sequences become one shard on disk; `close()` (or
    leaving a `with` block) writes the rest and returns the manifest.
    """

    def __init__(
        self,
        folder: str | Path,
        spec: TopKCacheSpec,
        *,
        shard_size_sequences: int = 256,
        resume: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if (
            isinstance(shard_size_sequences, bool)
            or not isinstance(shard_size_sequences, int)
            or shard_size_sequences < 1
        ):
            raise CacheError(
                f"shard_size_sequences must be a positive integer; got {shard_size_sequences!r}"
            )
        self.folder = Path(folder)
        self.spec = spec
        self.shard_size_sequences = shard_size_sequences
        self._buffer: list[tuple[np.ndarray, ...]] = []
        self._buffered = 0
        self._closed = False
        if (self.folder / MANIFEST).exists():
            if not resume:
                raise CacheError(
                    f"{self.folder} already holds a top-k cache; pass resume=True to continue "
                    "it, or delete the folder to build it afresh"
                )
            self.manifest = self._resumed_manifest()
        else:
            self._prepare_empty_folder()
            self.manifest = new_manifest(spec)
        self.manifest["shard_size_sequences"] = shard_size_sequences
        if extra is not None:
            self.manifest["extra"] = extra
        self._save_manifest()

    @property
    def next_sequence(self) -> int:
        """The first sequence not yet given to `add` (stored or buffered)."""
        return self.manifest["sequences_written"] + self._buffered

    def add(self, start: int, ids: Tensor, logprobs: Tensor) -> None:
        """Store the top-k ids (n, T, k) and log-probs (n, T, k) of sequences start .. start+n-1."""
        if self._closed:
            raise CacheError(f"the top-k cache writer for {self.folder} is closed")
        spec = self.spec
        ids, logprobs = ids.detach().cpu(), logprobs.detach().cpu()
        expected = f"(n, seq_len={spec.seq_len}, k={spec.k})"
        problems = []
        if ids.dim() != 3 or ids.shape[1:] != (spec.seq_len, spec.k):
            problems.append(f"ids have shape {tuple(ids.shape)}, expected {expected}")
        if logprobs.shape != ids.shape:
            problems.append(
                f"logprobs have shape {tuple(logprobs.shape)}, expected ids' shape {tuple(ids.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            problems.append(f"ids must be an integer tensor, got {ids.dtype}")
        if not logprobs.dtype.is_floating_point:
            problems.append(f"logprobs must be a float tensor, got {logprobs.dtype}")
        if start > self.next_sequence:
            problems.append(
                f"the batch starts at sequence {start} but the cache continues at "
                f"{self.next_sequence}; give batches in order without gaps"
            )
        if problems:
            raise CacheError(
                f"cannot add a batch to the top-k cache {self.folder}: " + "; ".join(problems)
            )
        skip = self.next_sequence - start  # rows already stored (a replay after resume)
        ids, logprobs = ids[max(skip, 0) :], logprobs[max(skip, 0) :]
        start = max(start, self.next_sequence)
        if len(ids) == 0:
            return
        if start + len(ids) > spec.num_sequences:
            raise CacheError(
                f"the batch covers sequences {start} .. {start + len(ids) - 1}, but the dataset "
                f"has {spec.num_sequences} sequences (0 .. {spec.num_sequences - 1})"
            )
        self._check_values(start, ids, logprobs)
        logprobs64 = logprobs.double()
        tail = (1 - logprobs64.exp().sum(-1)).clamp(0, 1).numpy().astype("<f4")  # (n, T)
        if spec.encoding == "compact":
            logprobs64, order = logprobs64.sort(dim=-1, descending=True, stable=True)
            ids = ids.long().gather(-1, order)
            layout = _compact_layout(spec.k, spec.vocab_size)
            arrays = (tail, *_encode_compact(logprobs64.numpy(), ids.numpy(), layout))
        else:
            arrays = (
                tail,
                logprobs64.numpy().astype("<f2"),
                _encode_ids(ids.numpy(), spec.id_bytes),
            )
        self._buffer.append(arrays)
        self._buffered += len(ids)
        while self._buffered >= self.shard_size_sequences:
            self._flush(self.shard_size_sequences)

    def close(self) -> dict[str, Any]:
        """Write the buffered sequences as a last shard; returns the manifest. A cache closed
        before all `num_sequences` were added stays incomplete (resume it later)."""
        if not self._closed:
            if self._buffered:
                self._flush(self._buffered)
            self._closed = True
        return self.manifest

    def __enter__(self) -> TopKCacheWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # the buffered sequences are valid even when the teacher failed

    # -- internals

    def _check_values(self, start: int, ids: Tensor, logprobs: Tensor) -> None:
        spec, problems = self.spec, []
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= spec.vocab_size:
            bad = low if low < 0 else high
            problems.append(f"token id {bad} is outside [0, {spec.vocab_size}) (vocab_size)")
        if torch.isnan(logprobs).any():
            problems.append("logprobs contain NaN")
        elif logprobs.max() > _LOGPROB_SLACK:
            problems.append(f"logprobs reach {float(logprobs.max()):.4g} > 0")
        else:
            mass = logprobs.double().exp().sum(-1)  # (n, T)
            if mass.max() > 1 + _MASS_SLACK:
                row, position = (int(i) for i in divmod(int(mass.argmax()), spec.seq_len))
                problems.append(
                    f"the top-k probabilities of sequence {start + row}, position {position} "
                    f"sum to {float(mass.max()):.4g} > 1"
                )
        if problems:
            raise CacheError(
                f"cannot add sequences {start} .. {start + len(ids) - 1} to the top-k cache "
                f"{self.folder}: {'; '.join(problems)}. Pass the teacher's log-probabilities "
                "log_softmax(logits / T) of its top k tokens (see teacher_topk), not raw logits"
            )

    def _flush(self, count: int) -> None:
        arrays = [np.concatenate(parts) for parts in zip(*self._buffer)]
        start = self.manifest["sequences_written"]
        self._write_shard(start, [array[:count] for array in arrays])
        rest = len(arrays[0]) - count
        self._buffer = [tuple(array[count:] for array in arrays)] if rest else []
        self._buffered = rest

    def _write_shard(self, start: int, arrays: list[np.ndarray]) -> None:
        stop = start + len(arrays[0])
        name = f"shard-{start:010d}.bin"
        final = self.folder / name
        tmp = final.with_name(name + ".tmp")
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            for array in arrays:
                data = np.ascontiguousarray(array).tobytes()
                digest.update(data)
                f.write(data)
                size += len(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_folder(self.folder)
        self.manifest["shards"].append(
            {
                "file": name,
                "start": start,
                "stop": stop,
                "bytes": size,
                "sha256": digest.hexdigest(),
            }
        )
        self.manifest["sequences_written"] = stop
        self.manifest["complete"] = stop == self.spec.num_sequences
        self._save_manifest()

    def _save_manifest(self) -> None:
        atomic_write_json(self.folder / MANIFEST, self.manifest)

    def _prepare_empty_folder(self) -> None:
        """Create the folder, or clear what a job killed before its first manifest left."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entries = list(self.folder.iterdir())
        foreign = [p.name for p in entries if not _is_cache_file(p.name)]
        if foreign:
            raise CacheError(
                f"{self.folder} is not empty and holds no top-k cache manifest (found "
                f"{sorted(foreign)[:5]}); give an empty or new folder for the cache"
            )
        for path in entries:
            path.unlink()

    def _resumed_manifest(self) -> dict[str, Any]:
        manifest = _read_manifest(self.folder)
        mismatches = _spec_mismatches(manifest, self.spec)
        if mismatches:
            raise CacheError(
                f"cannot resume the top-k cache {self.folder}: it was started with other "
                f"settings ({'; '.join(mismatches)}). Delete the folder to build it afresh"
            )
        # keep the recorded shards up to the first one that is missing or damaged
        kept, next_start = [], 0
        for shard in manifest["shards"]:
            if shard["start"] != next_start or _shard_problem(
                self.folder, shard, self.spec, full=True
            ):
                break
            kept.append(shard)
            next_start = shard["stop"]
        keep_files = {shard["file"] for shard in kept} | {MANIFEST}
        for path in self.folder.iterdir():
            if path.name not in keep_files and _is_cache_file(path.name):
                path.unlink()
        manifest["shards"] = kept
        manifest["sequences_written"] = next_start
        manifest["complete"] = next_start == self.spec.num_sequences
        return manifest


def write_topk_cache(
    folder: str | Path,
    spec: TopKCacheSpec,
    batches: Callable[[int], Iterable[TopKBatch]] | Iterable[TopKBatch],
    *,
    shard_size_sequences: int = 256,
    resume: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a whole cache; returns the manifest.

    batches: (start, ids (n, T, k), logprobs (n, T, k)) in sequence order, or a
    function of the first sequence still missing that yields them from there, so a
    resumed job does not run the teacher on sequences already stored.
    """
    with TopKCacheWriter(
        folder, spec, shard_size_sequences=shard_size_sequences, resume=resume, extra=extra
    ) as writer:
        source = batches(writer.next_sequence) if callable(batches) else batches
        for start, ids, logprobs in source:
            writer.add(start, ids, logprobs)
    return writer.manifest


# ----------------------------------------------------------------------------- reader


class TopKCache:
    """A verified top-k cache, read through memory maps (pages load on demand)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], spec: TopKCacheSpec) -> None:
        self.folder = folder
        self.manifest = manifest
        self.spec = spec
        self._starts = np.array([s["start"] for s in manifest["shards"]], dtype=np.int64)
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.spec.num_sequences

    def get(self, sequence_indices: Sequence[int] | Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """ids (n, T, k) int64 and logprobs (n, T, k) float32 of the given sequences (in
        either encoding; compact entries come largest first, decoded and renormalised)."""
        index, shard_of = self._locate(sequence_indices)
        n, spec = len(index), self.spec
        ids = np.empty((n, spec.seq_len, spec.k), dtype=np.int64)
        logprobs = np.empty((n, spec.seq_len, spec.k), dtype=np.float32)
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            local = index[rows] - self._starts[shard]
            arrays = self._arrays(int(shard))
            if spec.encoding == "compact":
                ids[rows], logprobs[rows] = _decode_compact(
                    {name: array[local] for name, array in arrays.items()},
                    _compact_layout(spec.k, spec.vocab_size),
                )
            else:
                logprobs[rows] = arrays["logprobs"][local]
                ids[rows] = _decode_ids(arrays["ids"][local], spec.id_bytes)
        return torch.from_numpy(ids), torch.from_numpy(logprobs)

    def tail_mass(self, sequence_indices: Sequence[int] | Tensor | np.ndarray) -> Tensor:
        """(n, T) float32: the probability the teacher gives all tokens outside its top k."""
        index, shard_of = self._locate(sequence_indices)
        tail = np.empty((len(index), self.spec.seq_len), dtype=np.float32)
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            tail[rows] = self._arrays(int(shard))["tail_mass"][index[rows] - self._starts[shard]]
        return torch.from_numpy(tail)

    def __getstate__(self) -> dict[str, Any]:
        # memory maps would be pickled as copies of the data (DataLoader workers); reopen instead
        return {**self.__dict__, "_maps": {}}

    def _locate(
        self, sequence_indices: Sequence[int] | Tensor | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(sequence_indices, Tensor):
            sequence_indices = sequence_indices.cpu().numpy()
        index = np.asarray(sequence_indices).reshape(-1)
        if index.size and not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"sequence indices must be integers; got {index.dtype}")
        index = index.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            bad = int(index.min()) if index.min() < 0 else int(index.max())
            raise IndexError(f"sequence {bad} is outside the cache's [0, {len(self)})")
        return index, np.searchsorted(self._starts, index, side="right") - 1

    def _arrays(self, shard: int) -> dict[str, np.ndarray]:
        """The shard's arrays by name (see `_shard_arrays`), memory-mapped."""
        if shard not in self._maps:
            entry = self.manifest["shards"][shard]
            n, spec = entry["stop"] - entry["start"], self.spec
            path = self.folder / entry["file"]
            maps: dict[str, np.ndarray] = {}
            offset = 0
            for name, dtype, per_position in _shard_arrays(spec):
                shape = (n, spec.seq_len, *per_position)
                maps[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
                offset += math.prod(shape) * np.dtype(dtype).itemsize
            self._maps[shard] = maps
        return self._maps[shard]


def open_topk_cache(
    folder: str | Path, *, expect: TopKCacheSpec, verify: Literal["size", "full"] = "full"
) -> TopKCache:
    """Open a top-k cache after checking that it is the one this run needs.

    Refuses (CacheError) a cache whose spec differs from `expect` (every differing
    field is named), one that holds fewer sequences than the dataset (the job
    stopped early: resume it), and a shard that is missing or has the wrong size.
    verify="full" also checks every shard's sha256, reading the whole cache once
    (about 1 s per GB); "size" only looks at file sizes, for caches too large to
    read in full at every start.
    """
    folder = Path(folder)
    if verify not in ("size", "full"):
        raise CacheError(f"verify must be 'size' or 'full'; got {verify!r}")
    manifest = _read_manifest(folder)
    rebuild = f"Delete {folder} (or re-run `kdistill cache`) to rebuild it"
    mismatches = _spec_mismatches(manifest, expect)
    if mismatches:
        raise CacheError(
            f"top-k teacher cache {folder} is stale: {'; '.join(mismatches)}. {rebuild}"
        )
    if manifest.get("encoding") != _encoding(expect):
        raise CacheError(
            f"top-k teacher cache {folder} uses the encoding {manifest.get('encoding')}, this "
            f"version of kdistill reads {_encoding(expect)}. {rebuild}"
        )
    written, shards = 0, manifest["shards"]
    for shard in shards:
        if shard["start"] != written:
            raise CacheError(
                f"top-k teacher cache {folder}: the manifest's shards do not follow each other "
                f"(shard {shard['file']} starts at sequence {shard['start']}, expected {written}). "
                f"{rebuild}"
            )
        written = shard["stop"]
    if written < expect.num_sequences:
        raise CacheError(
            f"top-k teacher cache {folder} is incomplete: it holds {written} of "
            f"{expect.num_sequences} sequences (the cache job stopped early). Resume the cache "
            "job (`kdistill cache` continues from the last complete shard; in Python "
            "TopKCacheWriter(..., resume=True)) to add the rest"
        )
    for shard in shards:
        problem = _shard_problem(folder, shard, expect, full=verify == "full")
        if problem:
            raise CacheError(f"top-k teacher cache {folder}: {problem}. {rebuild}")
    return TopKCache(folder, manifest, expect)


# ----------------------------------------------------------------------------- shared helpers


def _encoding(spec: TopKCacheSpec) -> dict[str, Any]:
    """The manifest's description of the shard layout; the exact encoding's has no "name"
    (as before the compact one existed), so its manifests are unchanged."""
    if spec.encoding == "exact":
        return {
            "tail_mass": TAIL_DTYPE,
            "logprobs": LOGPROB_DTYPE,
            "ids": _ID_DTYPES[spec.id_bytes],
            "byte_order": "little",
            "shard_layout": "tail_mass (n, T), logprobs (n, T, k), ids (n, T, k), back to back",
        }
    layout = _compact_layout(spec.k, spec.vocab_size)
    return {
        "name": "compact",
        "tail_mass": TAIL_DTYPE,
        "exact_ranks": layout.exact,
        "exact_dtype": LOGPROB_DTYPE,
        "knot_ranks": list(layout.knots),
        "knot_levels": COMPACT_CODE_LEVELS,
        "clip_nats": COMPACT_CLIP_NATS,
        "id_bits": layout.id_bits,
        "byte_order": "little",
        "shard_layout": ", ".join(
            f"{name} (n, T{''.join(f', {size}' for size in shape)}) {np.dtype(dtype).name}"
            for name, dtype, shape in _shard_arrays(spec)
        )
        + ", back to back",
    }


def _stored_encoding(manifest: dict[str, Any]) -> str:
    """The encoding a manifest names; "exact" where it names none (every cache written
    before the compact encoding existed)."""
    encoding = manifest.get("encoding")
    return encoding.get("name", "exact") if isinstance(encoding, dict) else "exact"


def new_manifest(spec: TopKCacheSpec) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **{
            name: value
            for name, value in asdict(spec).items()
            if name != "encoding" and not (name == "tail_samples" and value == 0)
        },
        "encoding": _encoding(spec),
        "bytes_per_token": topk_bytes_per_token(spec.k, spec.vocab_size, spec.encoding),
        "sequences_written": 0,
        "complete": False,
        "shards": [],
    }


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    rebuild = f"delete {folder} (or re-run `kdistill cache`) to rebuild it"
    if not path.is_file():
        raise CacheError(
            f"no top-k teacher cache at {folder} ({MANIFEST} is missing); build it with "
            "`kdistill cache` (a job killed before its first manifest left nothing to resume)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"top-k cache manifest {path} is corrupt ({exc}); {rebuild}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a kdistill top-k cache manifest; {rebuild}")
    if manifest.get("version") != FORMAT_VERSION:
        raise CacheError(
            f"{path} has format version {manifest.get('version')}; this kdistill reads version "
            f"{FORMAT_VERSION}; {rebuild}"
        )
    return manifest


def _spec_mismatches(manifest: dict[str, Any], expect: TopKCacheSpec) -> list[str]:
    found = []
    for field in fields(TopKCacheSpec):
        expected = getattr(expect, field.name)
        stored: object
        if field.name == "encoding":
            stored = _stored_encoding(manifest)
        elif field.name == "tail_samples":  # absent: a plain top-k cache
            stored = manifest.get(field.name, 0)
        else:
            stored = manifest.get(field.name)
        if stored != expected:
            found.append(f"{field.name}: expected {_short(expected)}, found {_short(stored)}")
    return found


def _short(value: object) -> str:
    """Fingerprints shortened to 12 hex digits; other values as they are."""
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "…"
    return repr(value)


def _shard_problem(folder: Path, shard: dict[str, Any], spec: TopKCacheSpec, *, full: bool) -> str:
    path = folder / shard["file"]
    sequences = shard["stop"] - shard["start"]
    per_sequence = spec.seq_len * topk_bytes_per_token(spec.k, spec.vocab_size, spec.encoding)
    expected = sequences * per_sequence
    if not path.is_file():
        return f"shard {path} is missing"
    size = path.stat().st_size
    if size != expected or shard["bytes"] != expected:
        return (
            f"shard {path} has {size} bytes, expected {expected} ({sequences} sequences × "
            f"{per_sequence} bytes): it is truncated or damaged"
        )
    if full and file_sha256(path) != shard["sha256"]:
        return f"shard {path} does not match its sha256: the file was changed or damaged"
    return ""


def _shard_arrays(spec: TopKCacheSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """The arrays of a shard in file order: (name, numpy dtype, shape per position)."""
    if spec.encoding == "exact":
        id_dtype, id_shape = {1: ("u1", ()), 2: ("<u2", ()), 3: ("u1", (3,))}[spec.id_bytes]
        return [
            ("tail_mass", "<f4", ()),
            ("logprobs", "<f2", (spec.k,)),
            ("ids", id_dtype, (spec.k, *id_shape)),
        ]
    layout = _compact_layout(spec.k, spec.vocab_size)
    arrays = [("tail_mass", "<f4", ()), ("exact", "<f2", (layout.exact,))]
    if layout.has_low:
        arrays.append(("low", "<f2", ()))
    if layout.knots:
        arrays.append(("knots", "u1", (len(layout.knots),)))
    arrays.append(("ids", "u1", (layout.id_bytes,)))
    return arrays


@dataclass(frozen=True)
class _CompactLayout:
    """Where the compact encoding keeps each rank of a position's k entries.

    exact: ranks 0 .. exact-1 in float16. has_low: rank k-1 in float16 ("low").
    knots: the ranks stored as 8-bit codes. interpolation (m + 2, k - exact): the
    log-probs of ranks exact .. k-1 are anchors @ interpolation, the anchors being
    ranks exact-1, the knots and k-1; a rank between two anchors is linear in
    log(rank + 1) between them, an anchor is itself.
    """

    k: int
    id_bits: int
    exact: int
    knots: tuple[int, ...]
    interpolation: np.ndarray

    @property
    def has_low(self) -> bool:
        return self.k > self.exact

    @property
    def id_bytes(self) -> int:
        return -(-self.k * self.id_bits // 8)

    @property
    def bytes_per_token(self) -> int:
        return 4 + 2 * self.exact + 2 * self.has_low + len(self.knots) + self.id_bytes


@functools.lru_cache(maxsize=32)
def _compact_layout(k: int, vocab_size: int) -> _CompactLayout:
    """Knots: m = min(ceil(k/4), k - exact - 1) ranks after rank exact-1, each one more
    than the last or, once that is larger, exact · ρ^j - 1 with ρ = (k / exact)^(1/(m+1)):
    every rank where single ranks matter most, then geometrically sparser (measured
    better than evenly spaced knots or fewer, wider codes; module docstring)."""
    exact = min(COMPACT_EXACT_RANKS, k)
    count = max(0, min(-(-k // 4), k - exact - 1))
    ratio = (k / exact) ** (1 / (count + 1))
    knots, previous = [], exact - 1
    for j in range(1, count + 1):
        geometric = math.floor(exact * ratio**j + 0.5) - 1
        previous = min(max(previous + 1, geometric), k - 2 - (count - j))  # room for the rest
        knots.append(previous)
    anchors = np.array([exact - 1, *knots, k - 1], dtype=np.float64)
    ranks = np.arange(exact, k, dtype=np.float64)
    left = np.searchsorted(anchors, ranks, side="right") - 1
    right = np.minimum(left + 1, len(anchors) - 1)
    width = np.log1p(anchors[right]) - np.log1p(anchors[left])
    weight = np.divide(
        np.log1p(ranks) - np.log1p(anchors[left]),
        width,
        out=np.zeros_like(ranks),
        where=width > 0,
    )
    interpolation = np.zeros((len(anchors), len(ranks)), dtype=np.float32)
    columns = np.arange(len(ranks))
    np.add.at(interpolation, (left, columns), 1 - weight)
    np.add.at(interpolation, (right, columns), weight)
    id_bits = max(1, (vocab_size - 1).bit_length())
    return _CompactLayout(k, id_bits, exact, tuple(knots), interpolation)


def _encode_compact(
    logprobs: np.ndarray, ids: np.ndarray, layout: _CompactLayout
) -> tuple[np.ndarray, ...]:
    """Sorted (largest first) float64 log-probs and their ids (n, T, k) as the compact
    arrays after tail_mass: exact, [low], [knots], ids (see `_shard_arrays`)."""
    exact = logprobs[..., : layout.exact].astype("<f2")  # (n, T, e)
    arrays = [exact]
    if layout.has_low:
        high = exact[..., -1:].astype(np.float64)  # (n, T, 1), as the reader sees it
        floor = np.maximum(high - COMPACT_CLIP_NATS, _FLOAT16_LOWEST)
        low = np.maximum(logprobs[..., -1:], floor).astype("<f2")  # (n, T, 1)
        arrays.append(low[..., 0])
        if layout.knots:
            bottom = low.astype(np.float64)
            values = np.clip(logprobs[..., list(layout.knots)], bottom, high)  # (n, T, m)
            with np.errstate(invalid="ignore", divide="ignore"):
                position = (high - values) / (high - bottom)  # in [0, 1]; NaN: no range
            position = np.where(np.isfinite(position), position, 0.0)
            arrays.append(np.rint(position * COMPACT_CODE_LEVELS).astype(np.uint8))
    arrays.append(pack_bits(ids, layout.id_bits))
    return tuple(arrays)


def _decode_compact(
    arrays: dict[str, np.ndarray], layout: _CompactLayout
) -> tuple[np.ndarray, np.ndarray]:
    """ids (n, T, k) int64 and log-probs (n, T, k) float32 from a shard's compact arrays:
    anchors decoded, the ranks between them interpolated, then all k shifted by one
    constant so that their probabilities sum to 1 - tail_mass, and clamped at 0."""
    ids = unpack_bits(np.asarray(arrays["ids"]), layout.id_bits, layout.k)
    exact = np.asarray(arrays["exact"], dtype=np.float32)  # (n, T, e)
    logprobs = np.empty((*exact.shape[:-1], layout.k), dtype=np.float32)
    logprobs[..., : layout.exact] = exact
    if layout.has_low:
        high = exact[..., -1:]  # (n, T, 1)
        finite = np.isfinite(high)  # -inf: every entry from rank exact-1 on is -inf
        top = np.where(finite, high, np.float32(0))
        bottom = np.where(finite, np.asarray(arrays["low"], dtype=np.float32)[..., None], 0)
        codes = arrays["knots"] if layout.knots else np.empty((*top.shape[:-1], 0))
        scale = (top - bottom) / np.float32(COMPACT_CODE_LEVELS)
        knots = top - np.asarray(codes, dtype=np.float32) * scale  # (n, T, m)
        anchors = np.concatenate([top, knots, bottom], axis=-1)  # (n, T, m + 2)
        rest = anchors @ layout.interpolation  # (n, T, k - e)
        logprobs[..., layout.exact :] = np.where(finite, rest, -np.inf)
    mass = np.exp(logprobs).sum(-1, keepdims=True, dtype=np.float64)  # (n, T, 1)
    target = 1 - np.asarray(arrays["tail_mass"], dtype=np.float64)[..., None]
    with np.errstate(divide="ignore"):
        shift = np.where((mass > 0) & (target > 0), np.log(target) - np.log(mass), 0.0)
    return ids, np.minimum(logprobs + shift.astype(np.float32), 0)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) integers in [0, 2^bits) -> (..., ceil(n bits / 8)) uint8, bits in 1 .. 24.

    Value j fills bits [j bits, (j+1) bits) of the row, least significant first (byte 0
    holds the lowest bits). Each output byte gathers the few values that overlap it.
    """
    if not 1 <= bits <= 24:
        raise ValueError(f"bits must be in [1, 24]; got {bits}")
    values = np.asarray(values).astype(np.uint32)
    count = values.shape[-1]
    size = -(-count * bits // 8)
    byte = np.arange(size)
    first = 8 * byte // bits  # the first value overlapping each byte
    out = np.zeros((*values.shape[:-1], size), dtype=np.uint32)
    for step in range(-(-8 // bits) + 1):  # at most ceil(8 / bits) + 1 values overlap a byte
        value = first + step
        offset = value * bits - 8 * byte  # where value's bit 0 falls, relative to the byte's
        overlaps = (value < count) & (offset < 8)
        up = np.maximum(offset, 0).astype(np.uint32)
        down = np.maximum(-offset, 0).astype(np.uint32)
        part = values[..., np.minimum(value, count - 1)]  # (..., size)
        out |= np.where(overlaps, ((part << up) >> down) & 0xFF, 0).astype(np.uint32)
    return out.astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: (..., ceil(count bits / 8)) uint8 -> (..., count) int64."""
    if not 1 <= bits <= 24:
        raise ValueError(f"bits must be in [1, 24]; got {bits}")
    if bits in (8, 16):  # whole bytes: the packed row is a little-endian integer array
        whole = np.ascontiguousarray(packed).view("u1" if bits == 8 else "<u2")
        return whole[..., :count].astype(np.int64)
    start = np.arange(count) * bits
    byte, shift = start // 8, (start % 8).astype(np.uint32)
    padded = np.concatenate(  # a value spans at most 4 bytes (bits + 7 <= 31)
        [packed, np.zeros((*packed.shape[:-1], 3), dtype=np.uint8)], axis=-1
    ).astype(np.uint32)
    word = (
        padded[..., byte]
        | padded[..., byte + 1] << 8
        | padded[..., byte + 2] << 16
        | padded[..., byte + 3] << 24
    )
    return ((word >> shift) & ((1 << bits) - 1)).astype(np.int64)


def _encode_ids(ids: np.ndarray, id_bytes: int) -> np.ndarray:
    """(n, T, k) ids as stored: uint8 / uint16 (n, T, k), or (n, T, k, 3) bytes for uint24."""
    if id_bytes == 1:
        return ids.astype("u1")
    if id_bytes == 2:
        return ids.astype("<u2")
    return ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3]


def _decode_ids(stored: np.ndarray, id_bytes: int) -> np.ndarray:
    if id_bytes < 3:
        return stored.astype(np.int64)
    wide = stored.astype(np.int64)
    return wide[..., 0] | (wide[..., 1] << 8) | (wide[..., 2] << 16)


def _is_cache_file(name: str) -> bool:
    return name.startswith("shard-") or name.endswith(".tmp")


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
