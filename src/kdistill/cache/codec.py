"""The bytes of a top-k cache's shards: the exact and compact encodings, and their sizes.

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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdistill.errors import CacheError

LOGPROB_DTYPE = "float16"
TAIL_DTYPE = "float32"
_ID_DTYPES = {1: "uint8", 2: "uint16", 3: "uint24"}
ENCODINGS = ("exact", "compact")
# compact: ranks kept in float16, knot code width, widest quantised range (nats)
COMPACT_EXACT_RANKS = 3
COMPACT_CODE_LEVELS = 255
COMPACT_CLIP_NATS = 20.0
_FLOAT16_LOWEST = float(np.finfo(np.float16).min)


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
        return compact_layout(k, vocab_size).bytes_per_token
    if encoding != "exact":
        raise CacheError(f"encoding must be one of {list(ENCODINGS)}; got {encoding!r}")
    return _bytes_per_token(k, exact_id_bytes(vocab_size))


def dense_bytes_per_token(vocab_size: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes per token of a dense cache of all `vocab_size` logits in `dtype`."""
    return vocab_size * torch.empty((), dtype=dtype).element_size()


def _bytes_per_token(k: int, id_bytes: int) -> int:
    return 4 + k * (2 + id_bytes)


def exact_id_bytes(vocab_size: int) -> int:
    """Bytes per id in the exact encoding: the narrowest of uint8, uint16 and uint24 that
    holds vocab_size - 1."""
    return 1 if vocab_size <= 1 << 8 else 2 if vocab_size <= 1 << 16 else 3


def encoding_description(k: int, vocab_size: int, encoding: str) -> dict[str, Any]:
    """The manifest's description of the shard layout; the exact encoding's has no "name"
    (as before the compact one existed), so its manifests are unchanged."""
    if encoding == "exact":
        return {
            "tail_mass": TAIL_DTYPE,
            "logprobs": LOGPROB_DTYPE,
            "ids": _ID_DTYPES[exact_id_bytes(vocab_size)],
            "byte_order": "little",
            "shard_layout": "tail_mass (n, T), logprobs (n, T, k), ids (n, T, k), back to back",
        }
    layout = compact_layout(k, vocab_size)
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
            for name, dtype, shape in shard_arrays(k, vocab_size, encoding)
        )
        + ", back to back",
    }


def shard_arrays(k: int, vocab_size: int, encoding: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """The arrays of a shard in file order: (name, numpy dtype, shape per position)."""
    if encoding == "exact":
        id_dtype, id_shape = {1: ("u1", ()), 2: ("<u2", ()), 3: ("u1", (3,))}[
            exact_id_bytes(vocab_size)
        ]
        return [
            ("tail_mass", "<f4", ()),
            ("logprobs", "<f2", (k,)),
            ("ids", id_dtype, (k, *id_shape)),
        ]
    layout = compact_layout(k, vocab_size)
    arrays = [("tail_mass", "<f4", ()), ("exact", "<f2", (layout.exact,))]
    if layout.has_low:
        arrays.append(("low", "<f2", ()))
    if layout.knots:
        arrays.append(("knots", "u1", (len(layout.knots),)))
    arrays.append(("ids", "u1", (layout.id_bytes,)))
    return arrays


@dataclass(frozen=True)
class CompactLayout:
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
def compact_layout(k: int, vocab_size: int) -> CompactLayout:
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
    return CompactLayout(k, id_bits, exact, tuple(knots), interpolation)


def encode_compact(
    logprobs: np.ndarray, ids: np.ndarray, layout: CompactLayout
) -> tuple[np.ndarray, ...]:
    """Sorted (largest first) float64 log-probs and their ids (n, T, k) as the compact
    arrays after tail_mass: exact, [low], [knots], ids (see `shard_arrays`)."""
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


def decode_compact(
    arrays: dict[str, np.ndarray], layout: CompactLayout
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


def encode_ids(ids: np.ndarray, id_bytes: int) -> np.ndarray:
    """(n, T, k) ids as stored: uint8 / uint16 (n, T, k), or (n, T, k, 3) bytes for uint24."""
    if id_bytes == 1:
        return ids.astype("u1")
    if id_bytes == 2:
        return ids.astype("<u2")
    return ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3]


def decode_ids(stored: np.ndarray, id_bytes: int) -> np.ndarray:
    if id_bytes < 3:
        return stored.astype(np.int64)
    wide = stored.astype(np.int64)
    return wide[..., 0] | (wide[..., 1] << 8) | (wide[..., 2] << 16)
