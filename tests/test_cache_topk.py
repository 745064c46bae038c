"""kdistill.cache.topk: the offline top-k teacher cache: round trip, sizes, resume after a kill,
and the refusals (stale spec, truncated or corrupted shard, incomplete cache), for
the exact encoding and the compact one (bit-packed ids, 8-bit knots)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdistill.cache.codec import (
    bytes_per_token,
    dense_bytes_per_token,
    pack_bits,
    topk_bytes_per_token,
    unpack_bits,
)
from kdistill.cache.manifest import TopKCacheSpec
from kdistill.cache.topk import TopKCacheWriter, open_topk_cache, write_topk_cache
from kdistill.cache.topk_teacher import teacher_topk, teacher_topk_sampled_tail
from kdistill.errors import CacheError

N, T, K, V = 10, 6, 4, 300


def make_spec(**changes: object) -> TopKCacheSpec:
    spec = TopKCacheSpec(
        teacher="a" * 64,
        tokenizer="b" * 64,
        dataset="c" * 64,
        k=K,
        temperature=2.0,
        seq_len=T,
        num_sequences=N,
        vocab_size=V,
    )
    return dataclasses.replace(spec, **changes)


def teacher_outputs(spec: TopKCacheSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs of random teacher logits, (N, T, k) each."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(spec.num_sequences, spec.seq_len, spec.vocab_size, generator=generator)
    return teacher_topk(logits, k=spec.k, temperature=spec.temperature)


def batches(ids: torch.Tensor, logprobs: torch.Tensor, sizes: list[int], start: int = 0):
    for size in sizes:
        yield start, ids[start : start + size], logprobs[start : start + size]
        start += size


def manifest_ids(spec: TopKCacheSpec) -> str:
    return {1: "uint8", 2: "uint16", 3: "uint24"}[spec.id_bytes]


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, TopKCacheSpec, torch.Tensor, torch.Tensor]:
    """A complete cache of N sequences in shards of 3 (3, 3, 3, 1), from uneven batches."""
    spec = make_spec()
    ids, logprobs = teacher_outputs(spec)
    folder = tmp_path / "cache"
    write_topk_cache(folder, spec, batches(ids, logprobs, [4, 1, 5]), shard_size_sequences=3)
    return folder, spec, ids, logprobs


# ----------------------------------------------------------------------------- math and sizes


def test_teacher_topk_matches_full_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50, dtype=torch.float64)
    ids, logprobs = teacher_topk(logits, k=7, temperature=1.5)
    full = torch.log_softmax(logits / 1.5, dim=-1)
    order = full.argsort(dim=-1, descending=True)[..., :7]
    assert torch.equal(ids, order)
    assert torch.allclose(logprobs, full.gather(-1, order), atol=1e-12, rtol=0)
    assert logprobs.dtype == torch.float64
    half_ids, half_logprobs = teacher_topk(logits.half(), k=7, temperature=1.5)
    assert half_logprobs.dtype == torch.float32 and half_ids.shape == (3, 5, 7)
    with pytest.raises(CacheError, match=r"k must be in \[1, 50\]"):
        teacher_topk(logits, k=51, temperature=1.0)


def test_bytes_per_token_and_dense_comparison(written) -> None:
    folder, _, _, _ = written
    manifest = json.loads((folder / "manifest.json").read_text())
    assert bytes_per_token(manifest) == 4 + K * (2 + 2)  # V = 300 needs uint16 ids
    total = sum(p.stat().st_size for p in folder.glob("shard-*.bin"))
    assert total == N * T * bytes_per_token(manifest)

    def sized(k: int, vocab: int) -> int:
        spec = make_spec(k=k, vocab_size=vocab)
        return bytes_per_token({"k": k, "encoding": {"ids": manifest_ids(spec)}})

    assert dense_bytes_per_token(50257) == 100_514
    assert dense_bytes_per_token(50257, torch.float32) == 201_028
    assert sized(64, 50257) == 260 and sized(128, 50257) == 516
    assert sized(64, 50257) / dense_bytes_per_token(50257) < 0.01
    assert sized(64, 256) == 4 + 64 * 3 and sized(64, 1 << 17) == 4 + 64 * 5


# ----------------------------------------------------------------------------- round trip


def test_round_trip(written) -> None:
    folder, spec, ids, logprobs = written
    cache = open_topk_cache(folder, expect=spec)
    assert len(cache) == N
    got_ids, got_logprobs = cache.get(range(N))
    assert got_ids.dtype == torch.long and got_logprobs.dtype == torch.float32
    assert torch.equal(got_ids, ids)
    # the encoding is float16: exactly the float16 rounding, so |error| <= 2^-11 |log p|
    assert torch.equal(got_logprobs, logprobs.half().float())
    assert ((got_logprobs - logprobs).abs() <= logprobs.abs() * 2**-11 + 1e-12).all()
    probability_error = (got_logprobs.double().exp() - logprobs.double().exp()).abs().sum(-1)
    entropy_part = -(logprobs.double().exp() * logprobs.double()).sum(-1)
    assert (probability_error <= 2**-11 * entropy_part * 1.01).all()
    # the tail is computed before rounding
    tail = (1 - logprobs.double().exp().sum(-1)).float()
    assert torch.allclose(cache.tail_mass(range(N)), tail, atol=1e-7, rtol=0)
    # any order, repeats, across shards, tensors as indices
    index = torch.tensor([9, 0, 4, 4, 7, 2])
    some_ids, some_logprobs = cache.get(index)
    assert torch.equal(some_ids, ids[index]) and torch.equal(some_logprobs, got_logprobs[index])
    empty_ids, _ = cache.get([])
    assert empty_ids.shape == (0, T, K)
    with pytest.raises(IndexError, match=r"sequence 10 is outside"):
        cache.get([10])


@pytest.mark.parametrize("vocab_size", [200, 5000, 70_000])
def test_round_trip_every_id_width(tmp_path: Path, vocab_size: int) -> None:
    spec = make_spec(vocab_size=vocab_size, num_sequences=3)
    ids = torch.randint(0, vocab_size, (3, T, K), generator=torch.Generator().manual_seed(1))
    ids[0, 0, 0], ids[2, -1, -1] = 0, vocab_size - 1  # both ends of the range
    logprobs = torch.full((3, T, K), -3.0)
    write_topk_cache(tmp_path / "c", spec, [(0, ids, logprobs)])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["encoding"]["ids"] == manifest_ids(spec)
    assert (tmp_path / "c" / "shard-0000000000.bin").stat().st_size == 3 * T * bytes_per_token(
        manifest
    )
    assert torch.equal(open_topk_cache(tmp_path / "c", expect=spec).get([0, 1, 2])[0], ids)


def test_manifest_records_spec_and_shards(written) -> None:
    folder, spec, _, _ = written
    manifest = json.loads((folder / "manifest.json").read_text())
    for field, value in dataclasses.asdict(spec).items():
        if field == "tail_samples":  # recorded only when > 0: top-k manifests as before
            assert value == 0 and field not in manifest
        elif field != "encoding":
            assert manifest[field] == value
    # the exact encoding's manifest is the one written before the compact encoding existed
    assert manifest["encoding"] == {
        "tail_mass": "float32",
        "logprobs": "float16",
        "ids": "uint16",
        "byte_order": "little",
        "shard_layout": "tail_mass (n, T), logprobs (n, T, k), ids (n, T, k), back to back",
    }
    assert manifest["complete"] is True and manifest["sequences_written"] == N
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [
        (0, 3),
        (3, 6),
        (6, 9),
        (9, 10),
    ]
    assert not list(folder.glob("*.tmp"))


def test_cache_pickles_without_its_memory_maps(written) -> None:
    folder, spec, ids, _ = written
    cache = open_topk_cache(folder, expect=spec)
    cache.get([0, 9])  # opens two memory maps
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 10_000
    assert torch.equal(clone.get([9])[0], ids[9:10])


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("encoding", ["exact", "compact"])
def test_resume_after_kill_equals_uninterrupted_write(tmp_path: Path, encoding: str) -> None:
    spec = make_spec(encoding=encoding, k=16)
    ids, logprobs = teacher_outputs(spec)
    reference = tmp_path / "reference"
    write_topk_cache(reference, spec, batches(ids, logprobs, [10]), shard_size_sequences=4)

    folder = tmp_path / "killed"
    writer = TopKCacheWriter(folder, spec, shard_size_sequences=4)
    for batch in batches(ids, logprobs, [3, 4]):  # 7 sequences: one shard on disk, 3 buffered
        writer.add(*batch)
    del writer  # killed: never closed, the buffered sequences are lost
    (folder / "shard-0000000004.bin.tmp").write_bytes(b"half a shard")  # killed mid-write
    assert len(json.loads((folder / "manifest.json").read_text())["shards"]) == 1
    with pytest.raises(CacheError, match=r"holds 4 of 10 sequences"):
        open_topk_cache(folder, expect=spec)

    starts = []

    def teacher_from(start: int):
        starts.append(start)
        return batches(ids, logprobs, [3, 3], start=start)

    write_topk_cache(folder, spec, teacher_from, shard_size_sequences=4, resume=True)
    assert starts == [4]  # the teacher only ran on what was missing
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())
    for shard in reference.glob("shard-*.bin"):
        assert (folder / shard.name).read_bytes() == shard.read_bytes()
    assert (
        json.loads((folder / "manifest.json").read_text())["shards"]
        == json.loads((reference / "manifest.json").read_text())["shards"]
    )
    resumed, original = (open_topk_cache(f, expect=spec) for f in (folder, reference))
    assert all(torch.equal(a, b) for a, b in zip(resumed.get(range(N)), original.get(range(N))))


@pytest.mark.parametrize("encoding", ["exact", "compact"])
def test_resume_replays_from_zero_and_redoes_a_damaged_shard(tmp_path: Path, encoding: str) -> None:
    spec = make_spec(encoding=encoding, k=16)
    ids, logprobs = teacher_outputs(spec)
    folder = tmp_path / "cache"
    with TopKCacheWriter(folder, spec, shard_size_sequences=3) as writer:
        for batch in batches(ids, logprobs, [7]):  # shards 0-3, 3-6, then 6-7 on close
            writer.add(*batch)
    shard = folder / "shard-0000000003.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    writer = TopKCacheWriter(folder, spec, shard_size_sequences=3, resume=True)
    assert writer.next_sequence == 3  # the damaged shard and the one after it are redone
    assert not (folder / "shard-0000000006.bin").exists()
    for batch in batches(ids, logprobs, [5, 5]):  # a replay from 0: stored rows are skipped
        writer.add(*batch)
    writer.close()
    cache = open_topk_cache(folder, expect=spec)
    assert torch.equal(cache.get(range(N))[0], ids)


def test_existing_cache_needs_resume_and_same_spec(written) -> None:
    folder, spec, _, _ = written
    with pytest.raises(CacheError, match=r"already holds a top-k cache; pass resume=True"):
        TopKCacheWriter(folder, spec)
    with pytest.raises(CacheError) as info:
        TopKCacheWriter(folder, make_spec(k=8), resume=True)
    assert "cannot resume" in str(info.value) and "k: expected 8, found 4" in str(info.value)


def test_writer_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"is not empty and holds no top-k cache manifest"):
        TopKCacheWriter(tmp_path, make_spec())
    assert (tmp_path / "notes.txt").exists()


# ----------------------------------------------------------------------------- refusals


STALE = {
    "teacher": "d" * 64,
    "tokenizer": "e" * 64,
    "dataset": "f" * 64,
    "k": 8,
    "temperature": 1.0,
    "seq_len": 12,
    "num_sequences": 20,
    "vocab_size": 301,
    "encoding": "compact",
    "tail_samples": 2,
}


@pytest.mark.parametrize("field", list(STALE))
def test_stale_field_is_refused(written, field: str) -> None:
    folder, spec, _, _ = written
    expect = dataclasses.replace(spec, **{field: STALE[field]})
    with pytest.raises(CacheError) as info:
        open_topk_cache(folder, expect=expect)
    message = str(info.value)
    stored = getattr(spec, field)

    def shown(value: object) -> str:  # fingerprints are shortened, other values are not
        return value[:12] + "…" if isinstance(value, str) and len(value) > 16 else repr(value)

    for fragment in [
        f"top-k teacher cache {folder} is stale",
        f"{field}: expected {shown(STALE[field])}, found {shown(stored)}",
        f"Delete {folder}",
        "re-run `kdistill cache`",
    ]:
        assert fragment in message
    assert message.count("expected") == 1  # only the field that differs


def test_all_stale_fields_named_at_once(written) -> None:
    folder, spec, _, _ = written
    with pytest.raises(CacheError) as info:
        open_topk_cache(folder, expect=dataclasses.replace(spec, teacher="x" * 64, k=8))
    message = str(info.value)
    assert "teacher: expected xxxxxxxxxxxx…, found aaaaaaaaaaaa…" in message
    assert "k: expected 8, found 4" in message


def test_truncated_shard_is_refused(written) -> None:
    folder, spec, _, _ = written
    shard = folder / "shard-0000000003.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError) as info:
        open_topk_cache(folder, expect=spec, verify="size")
    message = str(info.value)
    expected_bytes = 3 * T * (4 + K * 4)
    for fragment in [
        str(shard),
        f"{expected_bytes - 10} bytes",
        f"expected {expected_bytes}",
        "truncated",
    ]:
        assert fragment in message
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard .*shard-0000000003.bin is missing"):
        open_topk_cache(folder, expect=spec, verify="size")


@pytest.mark.parametrize("encoding", ["exact", "compact"])
def test_corrupted_byte_is_refused_by_full_verify(tmp_path: Path, encoding: str) -> None:
    spec = make_spec(encoding=encoding)
    ids, logprobs = teacher_outputs(spec)
    folder = tmp_path / "cache"
    write_topk_cache(folder, spec, batches(ids, logprobs, [10]), shard_size_sequences=3)
    shard = folder / "shard-0000000006.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    open_topk_cache(folder, expect=spec, verify="size")  # same size: only the checksum can tell
    with pytest.raises(CacheError) as info:
        open_topk_cache(folder, expect=spec)  # verify="full" is the default
    assert f"shard {shard} does not match its sha256" in str(info.value)
    assert "rebuild" in str(info.value)


def test_incomplete_cache_is_refused(tmp_path: Path) -> None:
    spec = make_spec()
    ids, logprobs = teacher_outputs(spec)
    folder = tmp_path / "cache"
    write_topk_cache(folder, spec, batches(ids, logprobs, [7]), shard_size_sequences=3)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["sequences_written"] == 7
    with pytest.raises(CacheError) as info:
        open_topk_cache(folder, expect=spec)
    message = str(info.value)
    for fragment in [
        "is incomplete",
        "holds 7 of 10 sequences",
        "Resume the cache job",
        "resume=True",
    ]:
        assert fragment in message


def test_missing_or_corrupt_manifest(tmp_path: Path, written) -> None:
    with pytest.raises(CacheError, match=r"no top-k teacher cache at .*manifest.json is missing"):
        open_topk_cache(tmp_path / "nothing", expect=make_spec())
    folder, spec, _, _ = written
    (folder / "manifest.json").write_text("{truncated")
    with pytest.raises(CacheError, match=r"manifest .* is corrupt"):
        open_topk_cache(folder, expect=spec)
    (folder / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CacheError, match=r"not a kdistill top-k cache manifest"):
        open_topk_cache(folder, expect=spec)


# ----------------------------------------------------------------------------- bad input to the writer


def test_writer_rejects_bad_batches(tmp_path: Path) -> None:
    spec = make_spec()
    ids, logprobs = teacher_outputs(spec)
    writer = TopKCacheWriter(tmp_path / "c", spec)
    raw_logits = torch.randn(2, T, K) + 5  # logits, not log-probabilities
    with pytest.raises(CacheError, match=r"not raw logits"):
        writer.add(0, ids[:2], raw_logits)
    with pytest.raises(CacheError, match=r"sum to [\d.]+ > 1.*see teacher_topk"):
        writer.add(0, ids[:2], torch.full((2, T, K), -0.1))
    too_big = ids[:2].clone()
    too_big[1, 2, 3] = V
    with pytest.raises(CacheError, match=rf"token id {V} is outside \[0, {V}\)"):
        writer.add(0, too_big, logprobs[:2])
    with pytest.raises(CacheError) as info:
        writer.add(0, ids[:2, :, :2], logprobs[:2])
    assert f"ids have shape (2, {T}, 2), expected (n, seq_len={T}, k={K})" in str(info.value)
    assert "logprobs have shape" in str(info.value)
    with pytest.raises(CacheError, match=r"starts at sequence 3 but the cache continues at 0"):
        writer.add(3, ids[3:5], logprobs[3:5])
    writer.add(0, ids[:8], logprobs[:8])
    with pytest.raises(CacheError, match=r"the dataset has 10 sequences"):
        writer.add(8, ids[:4], logprobs[:4])
    with pytest.raises(CacheError, match=r"NaN"):
        writer.add(8, ids[8:], torch.full((2, T, K), float("nan")))


def test_spec_validation_lists_every_problem() -> None:
    with pytest.raises(CacheError) as info:
        make_spec(teacher="", k=0, temperature=0.0, vocab_size=1 << 25)
    message = str(info.value)
    expected = [
        "teacher must be a non-empty string",
        "k must be a positive integer",
        "temperature must be a finite number > 0",
        "vocab_size must be at most 2^24",
    ]
    for fragment in expected:
        assert fragment in message
    with pytest.raises(CacheError, match=r"k \(400\) cannot exceed vocab_size \(300\)"):
        make_spec(k=400)


def test_float16_keeps_minus_infinity(tmp_path: Path) -> None:
    """Vocabulary padding rows with -inf logits can land in the top k of a tiny vocabulary."""
    spec = make_spec(num_sequences=1, k=3, vocab_size=3)
    logprobs = torch.tensor([0.0, float("-inf"), float("-inf")]).expand(1, T, 3)
    ids = torch.tensor([2, 0, 1]).expand(1, T, 3)
    write_topk_cache(tmp_path / "c", spec, [(0, ids, logprobs)])
    cache = open_topk_cache(tmp_path / "c", expect=spec)
    assert torch.equal(cache.get([0])[1], logprobs)
    assert torch.equal(cache.tail_mass([0]), torch.zeros(1, T))
    assert np.isfinite(cache.tail_mass([0]).numpy()).all()


# ----------------------------------------------------------------------------- compact encoding


def naive_pack(row: list[int], bits: int) -> bytes:
    """Value j in bits [j·bits, (j+1)·bits) of one little-endian integer."""
    whole = sum(value << (j * bits) for j, value in enumerate(row))
    return whole.to_bytes(-(-len(row) * bits // 8), "little")


@pytest.mark.parametrize("vocab_size", [2, 3, 255, 256, 257, 2048, 50257, 65536, 65537, 1 << 24])
def test_pack_bits_matches_naive_reference_and_round_trips(vocab_size: int) -> None:
    bits = math.ceil(math.log2(vocab_size))  # 1, 2, 8, 8, 9, 11, 16, 16, 17, 24
    generator = np.random.default_rng(vocab_size)
    for count in (1, 7, 13, 64):
        ids = generator.integers(0, vocab_size, size=(3, 2, count))
        ids[0, 0, 0], ids[2, 1, -1] = vocab_size - 1, 0  # the largest id and the smallest
        packed = pack_bits(ids, bits)
        assert packed.dtype == np.uint8 and packed.shape == (3, 2, math.ceil(count * bits / 8))
        for row, stored in zip(ids.reshape(-1, count), packed.reshape(6, -1)):
            assert stored.tobytes() == naive_pack(row.tolist(), bits)
        assert np.array_equal(unpack_bits(packed, bits, count), ids)


def test_compact_bytes_per_token_as_documented(tmp_path: Path) -> None:
    def compact(k: int, vocab_size: int) -> int:
        bits = math.ceil(math.log2(vocab_size))
        return 4 + 2 * 3 + 2 + math.ceil(k / 4) + math.ceil(k * bits / 8)

    table = {(64, 2048): (260, 116), (64, 50257): (260, 156)}
    table |= {(128, 2048): (516, 220), (128, 50257): (516, 300)}
    for (k, vocab_size), (exact_size, compact_size) in table.items():
        assert topk_bytes_per_token(k, vocab_size) == exact_size
        assert topk_bytes_per_token(k, vocab_size, "compact") == compact_size
        assert compact(k, vocab_size) == compact_size
    # the files hold exactly that
    spec = make_spec(encoding="compact", k=32)
    ids, logprobs = teacher_outputs(spec)
    write_topk_cache(tmp_path / "c", spec, [(0, ids, logprobs)], shard_size_sequences=4)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert bytes_per_token(manifest) == manifest["bytes_per_token"] == compact(32, V) == 56
    total = sum(p.stat().st_size for p in (tmp_path / "c").glob("shard-*.bin"))
    assert total == N * T * 56  # 4 + 2·3 + 2 + 8 knots + 32 ids of 9 bits


def documented_bound(exact: torch.Tensor, manifest: dict) -> torch.Tensor:
    """The module docstring's bound on sum_r |p̂_r - p_r| per position, from the exact
    sorted log-probs (N, T, k) float64 and the knot ranks the manifest records."""
    k, e = exact.shape[-1], manifest["encoding"]["exact_ranks"]
    p = exact.exp()
    error = (p * torch.expm1(exact.abs() * 2**-11))[..., :e].sum(-1)  # float16 ranks
    high, low = exact[..., e - 1], exact[..., -1]
    delta = (high - low) / 510 + 2**-10 * torch.maximum(high.abs(), low.abs())  # (N, T)
    anchors = [e - 1, *manifest["encoding"]["knot_ranks"], k - 1]
    for rank in anchors[1:]:
        error += p[..., rank] * torch.expm1(delta)
    for a, b in itertools.pairwise(anchors):  # b - a - 1 ranks in between
        error += (b - a - 1) * ((exact[..., a] + delta).exp() - (exact[..., b] - delta).exp())
    return 2 * error  # renormalising at most doubles it


def test_compact_round_trip_within_documented_bound(tmp_path: Path) -> None:
    spec = make_spec(encoding="compact", k=48, vocab_size=5000)
    ids, logprobs = teacher_outputs(spec)  # largest first, spread over < 20 nats
    shuffle = torch.randperm(spec.k, generator=torch.Generator().manual_seed(2))
    write_topk_cache(  # the writer sorts the entries, keeping each id with its log-prob
        tmp_path / "c", spec, [(0, ids[..., shuffle], logprobs[..., shuffle].float())]
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cache = open_topk_cache(tmp_path / "c", expect=spec)
    got_ids, got_logprobs = cache.get(range(N))
    assert got_ids.dtype == torch.long and got_logprobs.dtype == torch.float32
    assert torch.equal(got_ids, ids)
    exact = logprobs.float().double()
    error = (got_logprobs.double().exp() - exact.exp()).abs().sum(-1)  # (N, T)
    bound = documented_bound(exact, manifest)
    assert (error <= bound + 1e-6).all()
    assert 1e-4 < error.mean() < 0.02  # quantised, but close
    # the first ranks are float16, as in the exact encoding, up to the renormalisation
    shift = (got_logprobs.double() - exact)[..., :3] - (exact.half().double() - exact)[..., :3]
    assert (shift - shift[..., :1]).abs().max() < 1e-5
    # the tail is exact; the decoded probabilities fill the rest, and none exceeds 1
    tail = cache.tail_mass(range(N)).double()
    assert torch.allclose(tail, 1 - exact.exp().sum(-1), atol=1e-7, rtol=0)
    assert ((got_logprobs.double().exp().sum(-1) + tail - 1).abs() < 1e-6).all()
    assert (got_logprobs <= 0).all()
    # the same sequences in another order, across shards
    index = torch.tensor([9, 0, 4, 4])
    assert torch.equal(cache.get(index)[1], got_logprobs[index])


def test_compact_decodes_anchors_to_their_quantised_values(tmp_path: Path) -> None:
    """Log-probs linear in log(rank + 1) (Zipf) are what the interpolation assumes:
    every rank decodes within half a code step (plus float16) of the truth."""
    spec = make_spec(encoding="compact", k=64, vocab_size=5000, num_sequences=1, seq_len=1)
    ranks = torch.arange(64, dtype=torch.float64)
    zipf = -1.5 * torch.log1p(ranks)
    logprobs = zipf - zipf.logsumexp(0) + math.log(0.9)  # top-k mass 0.9
    ids = torch.randperm(5000, generator=torch.Generator().manual_seed(3))[:64]
    write_topk_cache(tmp_path / "c", spec, [(0, ids.view(1, 1, 64), logprobs.view(1, 1, 64))])
    got = open_topk_cache(tmp_path / "c", expect=spec).get([0])[1].double().view(64)
    step = float(logprobs[2] - logprobs[-1]) / 255
    assert (got - logprobs).abs().max() < step / 2 + 2e-3
    assert abs(got.exp().sum() - 0.9) < 1e-6


def test_compact_keeps_minus_infinity_as_zero_probability(tmp_path: Path) -> None:
    """Padding rows with -inf logits in the top k of a tiny vocabulary: ranks at -inf
    from rank 2 on stay -inf; later ones decode to at most e^-20 of rank 2's probability."""
    spec = make_spec(encoding="compact", num_sequences=2, k=8, vocab_size=8)
    minus_inf = float("-inf")
    rows = [
        [math.log(0.5), math.log(0.5)] + [minus_inf] * 6,
        [math.log(0.4)] * 2 + [math.log(0.2), minus_inf] + [minus_inf] * 4,
    ]
    logprobs = torch.tensor(rows, dtype=torch.float64).view(2, 1, 8).expand(2, T, 8)
    ids = torch.arange(8).expand(2, T, 8)
    write_topk_cache(tmp_path / "c", spec, [(0, ids, logprobs)])
    cache = open_topk_cache(tmp_path / "c", expect=spec)
    got_ids, got = cache.get([0, 1])
    assert torch.equal(got_ids, ids)
    assert not got.isnan().any() and (got <= 0).all()
    assert torch.equal(got[0, :, 2:], torch.full((T, 6), minus_inf))
    assert torch.allclose(got[..., :3].double().exp(), logprobs[..., :3].exp(), atol=1e-3)
    assert (got[1, :, 3:].double().exp() <= 0.2 * math.exp(-20) * 1.01).all()
    assert torch.equal(cache.tail_mass([0, 1]), torch.zeros(2, T))


def test_exact_shard_bytes_are_unchanged(written) -> None:
    """The exact encoding's shard is tail float32, log-probs float16, ids uint16, as before."""
    folder, _, ids, logprobs = written
    tail = (1 - logprobs.double().exp().sum(-1)).clamp(0, 1)
    expected = b"".join(
        array[:3].numpy().astype(dtype).tobytes()
        for array, dtype in [(tail, "<f4"), (logprobs.double(), "<f2"), (ids, "<u2")]
    )
    assert (folder / "shard-0000000000.bin").read_bytes() == expected


def test_encoding_mismatch_is_refused(written, tmp_path: Path) -> None:
    folder, spec, ids, logprobs = written
    compact = dataclasses.replace(spec, encoding="compact")
    with pytest.raises(CacheError) as info:
        open_topk_cache(folder, expect=compact)
    assert "is stale: encoding: expected 'compact', found 'exact'" in str(info.value)
    with pytest.raises(CacheError, match=r"cannot resume .*encoding: expected 'compact'"):
        TopKCacheWriter(folder, compact, resume=True)
    write_topk_cache(tmp_path / "compact", compact, [(0, ids, logprobs)])
    with pytest.raises(CacheError, match=r"encoding: expected 'exact', found 'compact'"):
        open_topk_cache(tmp_path / "compact", expect=spec)
    # a compact manifest whose layout is not this version's is refused
    manifest = json.loads((tmp_path / "compact" / "manifest.json").read_text())
    manifest["encoding"]["clip_nats"] = 30.0
    (tmp_path / "compact" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"uses the encoding .*this version of kdistill reads"):
        open_topk_cache(tmp_path / "compact", expect=compact)
    with pytest.raises(CacheError, match=r"encoding must be one of \['exact', 'compact'\]"):
        make_spec(encoding="bits")


def test_compact_truncated_shard_is_refused(tmp_path: Path) -> None:
    spec = make_spec(encoding="compact")
    ids, logprobs = teacher_outputs(spec)
    write_topk_cache(tmp_path / "c", spec, [(0, ids, logprobs)], shard_size_sequences=4)
    shard = tmp_path / "c" / "shard-0000000004.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    expected = 4 * T * topk_bytes_per_token(K, V, "compact")
    with pytest.raises(CacheError, match=rf"has {expected - 1} bytes, expected {expected}"):
        open_topk_cache(tmp_path / "c", expect=spec, verify="size")


def test_recipe_encoding_reaches_the_cache_spec_and_the_plan() -> None:
    """teacher.cache.encoding flows into cache_spec (the cache a run writes and expects)
    and into the plan's size estimate."""
    import kdistill
    from kdistill.errors import RecipeError
    from kdistill.tasks.causal_lm.plan import lm_cache_size
    from kdistill.tasks.causal_lm.teacher_cache import cache_spec

    data = SimpleNamespace(  # what cache_spec and lm_cache_size read of LMData
        seq_len=128,
        train=torch.zeros(10, 129),
        vocab_size=50257,
        tokenizer_fingerprint="t" * 64,
        fingerprint="d" * 64,
    )
    name = "shakespeare_gpt_small_from_gpt"
    for encoding, per_token in [("exact", 516), ("compact", 300)]:
        recipe = kdistill.load_recipe(
            name, ["teacher.cache.top_k=128", f"teacher.cache.encoding={encoding}"]
        )
        assert cache_spec(recipe, data, "0" * 64).encoding == encoding
        size = lm_cache_size(recipe, data)
        assert size.bytes == per_token * 10 * 128
    assert size.detail.startswith("300 bytes/token (top 128, compact)")
    assert kdistill.load_recipe(name).teacher.cache.encoding == "exact"  # the default
    with pytest.raises(RecipeError, match=r"teacher.cache.encoding: Input should be 'exact'"):
        kdistill.load_recipe(name, ["teacher.cache.encoding=bits"])


# ----------------------------------------------------------------------------- sampled tail


def _dense(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """The distribution the entries describe, over the whole vocabulary: (..., V)."""
    return torch.zeros(*ids.shape[:-1], vocab, dtype=torch.float64).scatter_add_(
        -1, ids, logprobs.double().exp()
    )


def test_sampled_tail_keeps_the_head_exactly_and_sums_to_one() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(3, 7, 50, generator=generator, dtype=torch.float64)
    ids, logprobs = teacher_topk_sampled_tail(logits, k=12, exact=5, temperature=1.5, seed=0)
    head_ids, head_logprobs = teacher_topk(logits, k=5, temperature=1.5)
    assert torch.equal(ids[..., :5], head_ids)
    torch.testing.assert_close(logprobs[..., :5], head_logprobs)
    assert ids.shape == logprobs.shape == (3, 7, 12) and ids.dtype == torch.int64
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct per position, spares too
    total = logprobs.exp().sum(-1)  # exp(−inf) = 0 for unused slots
    torch.testing.assert_close(total, torch.ones_like(total))  # no tail bucket left


def test_sampled_tail_is_an_unbiased_estimate_of_the_teacher() -> None:
    """Averaged over many draws, the entries give back the teacher's distribution token by
    token (head exact, tail in expectation), the property that makes the forward-KL
    gradient unbiased."""
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]]], dtype=torch.float64)
    p = torch.softmax(logits, -1)[0, 0]
    draws = 4000
    mean = torch.zeros(8, dtype=torch.float64)
    for seed in range(draws):
        ids, logprobs = teacher_topk_sampled_tail(logits, k=4, exact=2, temperature=1.0, seed=seed)
        mean += _dense(ids, logprobs, 8)[0, 0]
    mean /= draws
    # each tail probability is a mean of 4000 · 2 Bernoulli-like draws: 4 sigma is < 0.01
    torch.testing.assert_close(mean, p, atol=0.01, rtol=0)
    torch.testing.assert_close(mean[:2], p[:2], atol=1e-12, rtol=0)  # the head: every draw


def test_sampled_tail_draws_depend_on_the_sequence_not_the_batch() -> None:
    """Sequence i drawn in a batch that starts at 0 or in one that starts at i gives the
    same entries: a resumed cache job writes what an uninterrupted one would."""
    logits = torch.randn(6, 5, 40, generator=torch.Generator().manual_seed(1))
    whole = teacher_topk_sampled_tail(logits, k=10, exact=3, temperature=1.0, seed=100)
    for start in (1, 4):
        part = teacher_topk_sampled_tail(
            logits[start:], k=10, exact=3, temperature=1.0, seed=100 + start
        )
        assert torch.equal(part[0], whole[0][start:]) and torch.equal(part[1], whole[1][start:])
    other = teacher_topk_sampled_tail(logits, k=10, exact=3, temperature=1.0, seed=0)
    assert not torch.equal(other[0], whole[0])


def test_sampled_tail_bad_arguments() -> None:
    logits = torch.randn(1, 2, 10)
    for exact, k in [(0, 4), (4, 4), (3, 11)]:
        with pytest.raises(CacheError, match="1 <= exact < k <= vocabulary"):
            teacher_topk_sampled_tail(logits, k=k, exact=exact, temperature=1.0, seed=0)
    with pytest.raises(CacheError, match="temperature must be > 0"):
        teacher_topk_sampled_tail(logits, k=4, exact=2, temperature=0.0, seed=0)
    with pytest.raises(CacheError, match=r"tail_samples \(4\) must be below k \(4\)"):
        make_spec(tail_samples=4)


def test_sampled_tail_cache_round_trip_and_manifest(tmp_path: Path) -> None:
    spec = make_spec(k=6, tail_samples=3)
    logits = 3 * torch.randn(N, T, V, generator=torch.Generator().manual_seed(2))
    ids, logprobs = teacher_topk_sampled_tail(logits, k=6, exact=3, temperature=2.0, seed=0)
    folder = tmp_path / "cache"
    write_topk_cache(folder, spec, batches(ids, logprobs, [4, 6]), shard_size_sequences=3)
    cache = open_topk_cache(folder, expect=spec)
    got_ids, got_logprobs = cache.get(list(range(N)))
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(got_logprobs, logprobs.float(), rtol=2e-3, atol=0)
    assert json.loads((folder / "manifest.json").read_text())["tail_samples"] == 3
    with pytest.raises(CacheError, match="tail_samples: expected 0, found 3"):
        open_topk_cache(folder, expect=dataclasses.replace(spec, tail_samples=0))


def test_recipe_tail_samples_reach_the_spec_and_need_forward_kl() -> None:
    import kdistill
    from kdistill.errors import RecipeError
    from kdistill.tasks.causal_lm.teacher_cache import cache_spec

    data = SimpleNamespace(
        seq_len=128,
        train=torch.zeros(10, 129),
        vocab_size=2048,
        tokenizer_fingerprint="t" * 64,
        fingerprint="d" * 64,
    )
    name = "shakespeare_gpt_small_from_gpt"
    recipe = kdistill.load_recipe(name, ["teacher.signal=cache", "teacher.cache.tail_samples=32"])
    assert cache_spec(recipe, data, "0" * 64).tail_samples == 32
    with pytest.raises(RecipeError, match=r"unbiased for forward_kl only.*uses reverse_kl"):
        kdistill.load_recipe(
            name,
            [
                "teacher.signal=cache",
                "teacher.cache.tail_samples=32",
                "objective=[{loss: reverse_kl}]",
            ],
        )
    with pytest.raises(RecipeError, match=r"tail_samples \(64\) must be below"):
        kdistill.load_recipe(name, ["teacher.cache.tail_samples=64"])
