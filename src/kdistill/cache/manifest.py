"""What a top-k cache holds (`TopKCacheSpec`) and the manifest.json that records it.

The manifest names the format and its version, the spec (teacher, tokenizer, dataset,
k, temperature, seq_len, num_sequences, vocab_size, tail_samples when > 0), the
encoding (`kdistill.cache.codec`) and one entry per shard: file, sequence range,
bytes, sha256. The writer rewrites it atomically after each shard; the reader checks
a cache against it: the spec it expects, each shard's size and (optionally) sha256.
Each problem found is said with its field or file and how to rebuild the cache.
`is_cache_file` tells the writer which files of a folder are the cache's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from kdistill.cache.codec import (
    ENCODINGS,
    encoding_description,
    exact_id_bytes,
    topk_bytes_per_token,
)
from kdistill.checkpoint import file_sha256
from kdistill.errors import CacheError

FORMAT = "kdistill-topk-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_MAX_VOCAB = 1 << 24


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
        return exact_id_bytes(self.vocab_size)


def new_manifest(spec: TopKCacheSpec) -> dict[str, Any]:
    """The manifest of an empty cache of `spec`: no shards yet, not complete."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **{
            name: value
            for name, value in asdict(spec).items()
            if name != "encoding" and not (name == "tail_samples" and value == 0)
        },
        "encoding": encoding_description(spec.k, spec.vocab_size, spec.encoding),
        "bytes_per_token": topk_bytes_per_token(spec.k, spec.vocab_size, spec.encoding),
        "sequences_written": 0,
        "complete": False,
        "shards": [],
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the cache in `folder`; refuses a missing, corrupt or foreign one."""
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


def manifest_or_none(folder: Path) -> dict[str, Any] | None:
    """The manifest as stored, or None when there is none or it cannot be read."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def spec_mismatches(manifest: dict[str, Any], expect: TopKCacheSpec) -> list[str]:
    """One line per spec field whose stored value differs from `expect`'s."""
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


def _stored_encoding(manifest: dict[str, Any]) -> str:
    """The encoding a manifest names; "exact" where it names none (every cache written
    before the compact encoding existed)."""
    encoding = manifest.get("encoding")
    return encoding.get("name", "exact") if isinstance(encoding, dict) else "exact"


def _short(value: object) -> str:
    """Fingerprints shortened to 12 hex digits; other values as they are."""
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "…"
    return repr(value)


def shard_problem(folder: Path, shard: dict[str, Any], spec: TopKCacheSpec, *, full: bool) -> str:
    """What is wrong with a recorded shard's file ("" if nothing): missing, wrong size, or
    (full=True) a sha256 that differs from the manifest's."""
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


def is_cache_file(name: str) -> bool:
    """A shard or a temporary file the writer may leave; anything else is not the cache's."""
    return name.startswith("shard-") or name.endswith(".tmp")
