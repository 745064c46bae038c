"""kdistill.cache.dense and kdistill.teachers directly: a cache is complete or refused,
each classifier teacher signal returns float32 logits (B, C) a student's graph can
read, and every signal names its live modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill.cache import (
    TopKCacheSpec,
    open_cache,
    open_topk_cache,
    teacher_topk,
    write_cache,
    write_topk_cache,
)
from kdistill.data.bundle import DataBundle, Split
from kdistill.errors import CacheError
from kdistill.recipe.causal_lm import LMModelSpec
from kdistill.tasks.causal_lm.models import build_causal_lm
from kdistill.teachers import (
    CachedLMTeacher,
    CachedTeacher,
    EnsembleTeacher,
    LiveLMTeacher,
    LiveTeacher,
    combine_members,
)


def _bundle(n: int = 20, fingerprint: str = "data-a") -> DataBundle:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    split = Split(x, y)
    return DataBundle(
        train=split, val=split.subset(slice(0, 0)), test=split, num_classes=3,
        class_names=["a", "b", "c"], input_shape=(6,), mean=torch.zeros(6), std=torch.ones(6),
        fingerprint=fingerprint, source_files=[],
    )  # fmt: skip


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3)


def test_cache_holds_the_teachers_logits_and_is_refused_when_stale(tmp_path: Path) -> None:
    bundle, teacher = _bundle(), _teacher()
    manifest = write_cache(tmp_path / "c", teacher, bundle, teacher_sha256="t1", batch_size=7)
    assert manifest["shape"] == [20, 3] and not (tmp_path / "c.tmp").exists()
    logits = open_cache(tmp_path / "c", teacher_sha256="t1", bundle=bundle)
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(bundle.train.x))
    with pytest.raises(CacheError, match="made by another teacher"):
        open_cache(tmp_path / "c", teacher_sha256="t2", bundle=bundle)
    with pytest.raises(CacheError, match="made on other data"):
        open_cache(tmp_path / "c", teacher_sha256="t1", bundle=_bundle(fingerprint="data-b"))
    with pytest.raises(CacheError, match=r"its shape is \[20, 3\], expected \[10, 3\]"):
        open_cache(tmp_path / "c", teacher_sha256="t1", bundle=_bundle(n=10))


def test_a_changed_cache_file_fails_its_checksum(tmp_path: Path) -> None:
    bundle = _bundle()
    write_cache(tmp_path / "c", _teacher(), bundle, teacher_sha256="t1")
    data = bytearray((tmp_path / "c" / "logits.npy").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "c" / "logits.npy").write_bytes(bytes(data))
    with pytest.raises(CacheError, match="does not match its checksum"):
        open_cache(tmp_path / "c", teacher_sha256="t1", bundle=bundle)
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(tmp_path / "missing", teacher_sha256="t1", bundle=bundle)


def test_cached_teacher_reads_rows_by_index() -> None:
    table = torch.arange(12, dtype=torch.float16).view(4, 3)
    teacher = CachedTeacher(table)
    out = teacher(None, torch.tensor([2, 0]))
    assert out.dtype == torch.float32 and out.tolist() == [[6, 7, 8], [0, 1, 2]]
    assert teacher.models == {}


def test_live_teacher_is_frozen_and_its_logits_enter_a_graph() -> None:
    model = _teacher()
    teacher = LiveTeacher(model)
    x = torch.randn(5, 6)
    logits = teacher(x, torch.arange(5))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert not logits.is_inference()  # readable by the student's autograd graph
    student = torch.nn.Linear(6, 3)
    (student(x) - logits).square().sum().backward()
    assert student.weight.grad is not None


def test_ensemble_combines_members_as_documented() -> None:
    torch.manual_seed(1)
    members = {"main": torch.nn.Linear(6, 3), "b": torch.nn.Linear(6, 3)}
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = (members["main"](x) + members["b"](x)) / 2
    ensemble = EnsembleTeacher(members, combine="logits", weights="equal")
    torch.testing.assert_close(ensemble(x, torch.arange(4)), expected)
    stacked = torch.stack([expected, expected])
    # probabilities: the log of the mean of two equal distributions is that distribution
    mixed = combine_members(stacked, combine="probs", weights=torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(mixed, torch.log_softmax(expected, dim=-1))


def test_language_model_signals_name_their_live_modules(tmp_path: Path) -> None:
    config = {"type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}
    model = build_causal_lm(
        LMModelSpec(config=config), vocab_size=50, seq_len=3, eos_id=None, where="m"
    )
    live = LiveLMTeacher(model).to(torch.device("cpu"))
    assert list(live.models) == ["main"] and live.models["main"] is model

    spec = TopKCacheSpec(
        teacher="a" * 64, tokenizer="b" * 64, dataset="c" * 64, k=2, temperature=1.0,
        seq_len=3, num_sequences=4, vocab_size=50,
    )  # fmt: skip
    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0))
    ids, logprobs = teacher_topk(logits, k=2, temperature=1.0)  # (4, 3, 2) each
    write_topk_cache(tmp_path / "topk", spec, [(0, ids, logprobs)])
    cached = CachedLMTeacher(open_topk_cache(tmp_path / "topk", expect=spec))
    assert cached.to(torch.device("cpu")) is cached and cached.models == {}
    out = cached(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 1]))
    assert out["teacher_topk_ids"].tolist() == ids[[3, 1]].tolist()
    torch.testing.assert_close(out["teacher_topk_logprobs"], logprobs[[3, 1]].half().float())
