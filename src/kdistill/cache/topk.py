"""Offline top-k teacher cache for language-model distillation: writer and reader.

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
                                (`kdistill.cache.manifest`)
    shard-0000000000.bin        sequences [0, shard_size)
    shard-0000000256.bin        ...

How a shard stores its sequences (the exact and compact encodings), their sizes and
their precision: `kdistill.cache.codec`.

Crash safety: each shard is written to `<name>.tmp`, fsynced, renamed, and only
then recorded in the manifest (rewritten atomically). A killed job leaves at
worst a stray .tmp file and unrecorded sequences; `TopKCacheWriter(...,
resume=True)` verifies the recorded shards and continues after the last one. A
write that fails (a full disk) removes its .tmp file, stops the writer and is one
CacheError; the shards recorded before it stay as they were.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from kdistill.cache.codec import (
    compact_layout,
    decode_compact,
    decode_ids,
    encode_compact,
    encode_ids,
    encoding_description,
    shard_arrays,
)
from kdistill.cache.manifest import (
    MANIFEST,
    TopKCacheSpec,
    is_cache_file,
    new_manifest,
    read_manifest,
    shard_problem,
    spec_mismatches,
)
from kdistill.checkpoint import atomic_write_json, fsync
from kdistill.errors import CacheError, write_failure

# log-probs a little above 0 or top-k masses a little above 1 are float rounding
_LOGPROB_SLACK = 1e-4
_MASS_SLACK = 1e-3

TopKBatch = tuple[int, Tensor, Tensor]  # (first sequence index, ids (n, T, k), logprobs (n, T, k))


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
        self._save_manifest(self.manifest)

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
            layout = compact_layout(spec.k, spec.vocab_size)
            arrays = (tail, *encode_compact(logprobs64.numpy(), ids.numpy(), layout))
        else:
            arrays = (
                tail,
                logprobs64.numpy().astype("<f2"),
                encode_ids(ids.numpy(), spec.id_bytes),
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
        try:
            with open(tmp, "wb") as f:
                for array in arrays:
                    data = np.ascontiguousarray(array).tobytes()
                    digest.update(data)
                    f.write(data)
                    size += len(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._write_error(f"shard {name}", exc) from exc
        fsync(self.folder)
        entry = {
            "file": name,
            "start": start,
            "stop": stop,
            "bytes": size,
            "sha256": digest.hexdigest(),
        }
        self._save_manifest(
            {
                **self.manifest,
                "shards": [*self.manifest["shards"], entry],
                "sequences_written": stop,
                "complete": stop == self.spec.num_sequences,
            }
        )

    def _save_manifest(self, manifest: dict[str, Any]) -> None:
        """Store `manifest` and make it this writer's; until it is stored the old one holds
        (a shard it does not record is removed on resume)."""
        try:
            atomic_write_json(self.folder / MANIFEST, manifest)
        except OSError as exc:
            (self.folder / (MANIFEST + ".tmp")).unlink(missing_ok=True)
            raise self._write_error(MANIFEST, exc) from exc
        self.manifest = manifest

    def _write_error(self, what: str, exc: OSError) -> CacheError:
        """Stop this writer after a failed write (nothing more is written, not even at
        close) and say what is kept and how to go on."""
        self._buffer, self._buffered, self._closed = [], 0, True
        happened, first = write_failure(exc)
        shards, stored = self.manifest["shards"], self.manifest["sequences_written"]
        return CacheError(
            f"cannot write {what} of the top-k teacher cache {self.folder}: {happened}. The "
            f"{len(shards)} complete shard(s) before it ({stored} of {self.spec.num_sequences} "
            f"sequences) are kept. {first}, then run `kdistill cache` (or `kdistill run "
            "--resume`) again: it continues after the last complete shard (in Python: "
            "TopKCacheWriter(..., resume=True))"
        )

    def _prepare_empty_folder(self) -> None:
        """Create the folder, or clear what a job killed before its first manifest left."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entries = list(self.folder.iterdir())
        foreign = [p.name for p in entries if not is_cache_file(p.name)]
        if foreign:
            raise CacheError(
                f"{self.folder} is not empty and holds no top-k cache manifest (found "
                f"{sorted(foreign)[:5]}); give an empty or new folder for the cache"
            )
        for path in entries:
            path.unlink()

    def _resumed_manifest(self) -> dict[str, Any]:
        manifest = read_manifest(self.folder)
        mismatches = spec_mismatches(manifest, self.spec)
        if mismatches:
            raise CacheError(
                f"cannot resume the top-k cache {self.folder}: it was started with other "
                f"settings ({'; '.join(mismatches)}). Delete the folder to build it afresh"
            )
        # keep the recorded shards up to the first one that is missing or damaged
        kept, next_start = [], 0
        for shard in manifest["shards"]:
            if shard["start"] != next_start or shard_problem(
                self.folder, shard, self.spec, full=True
            ):
                break
            kept.append(shard)
            next_start = shard["stop"]
        keep_files = {shard["file"] for shard in kept} | {MANIFEST}
        for path in self.folder.iterdir():
            if path.name not in keep_files and is_cache_file(path.name):
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
                ids[rows], logprobs[rows] = decode_compact(
                    {name: array[local] for name, array in arrays.items()},
                    compact_layout(spec.k, spec.vocab_size),
                )
            else:
                logprobs[rows] = arrays["logprobs"][local]
                ids[rows] = decode_ids(arrays["ids"][local], spec.id_bytes)
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
        """The shard's arrays by name (see `shard_arrays`), memory-mapped."""
        if shard not in self._maps:
            entry = self.manifest["shards"][shard]
            n, spec = entry["stop"] - entry["start"], self.spec
            path = self.folder / entry["file"]
            maps: dict[str, np.ndarray] = {}
            offset = 0
            for name, dtype, per_position in shard_arrays(spec.k, spec.vocab_size, spec.encoding):
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
    manifest = read_manifest(folder)
    rebuild = f"Delete {folder} (or re-run `kdistill cache`) to rebuild it"
    mismatches = spec_mismatches(manifest, expect)
    if mismatches:
        raise CacheError(
            f"top-k teacher cache {folder} is stale: {'; '.join(mismatches)}. {rebuild}"
        )
    encoding = encoding_description(expect.k, expect.vocab_size, expect.encoding)
    if manifest.get("encoding") != encoding:
        raise CacheError(
            f"top-k teacher cache {folder} uses the encoding {manifest.get('encoding')}, this "
            f"version of kdistill reads {encoding}. {rebuild}"
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
        problem = shard_problem(folder, shard, expect, full=verify == "full")
        if problem:
            raise CacheError(f"top-k teacher cache {folder}: {problem}. {rebuild}")
    return TopKCache(folder, manifest, expect)
