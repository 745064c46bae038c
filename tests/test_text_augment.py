"""Tang et al. (2019) transfer-set augmentation: each rule's rate and shape, the
substitute tables against brute force, determinism, deduplication and the caps."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from kdistill.data.text import UNLABELLED
from kdistill.data.text_augment import (
    WordEmbeddings,
    augment_texts,
    substitutes,
    word_shape,
)

MASK = "[MASK]"


def _distinct_sentences(count: int, length: int) -> list[str]:
    """Sentences of distinct words, so a position's word names its sentence and place."""
    return [" ".join(f"w{s}x{i}" for i in range(length)) for s in range(count)]


def _sample_corpus(seed: int = 0, count: int = 300) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    vocab = ["the", "a", "film", "movie", "is", "Paris", "London", ",", ".", "1999", "42", "good"]
    vocab += [f"word{i}" for i in range(60)]
    weights = torch.tensor([1.0 / (i + 1) for i in range(len(vocab))])
    texts = []
    for n in torch.randint(1, 25, (count,), generator=g).tolist():
        picks = torch.multinomial(weights, n, replacement=True, generator=g).tolist()
        texts.append(" ".join(vocab[i] for i in picks))
    return texts


def test_zero_probabilities_give_the_originals_back() -> None:
    texts = ["a  good film ", "a good film", "bad", "  another   one"]
    result = augment_texts(texts, p_mask=0, p_pos=0, p_ng=0, n_iter=3, exclude_originals=False)
    assert sorted(result.texts) == sorted(["a good film", "bad", "another one"])
    assert result.draws == 4 * 3 and result.duplicates == 12 - 3
    nothing_new = augment_texts(texts, p_mask=0, p_pos=0, p_ng=0, n_iter=3)
    assert nothing_new.texts == [] and nothing_new.duplicates == nothing_new.draws == 12


def test_masking_rate_is_p_mask() -> None:
    texts = _distinct_sentences(400, 40)  # 16,000 words per round
    result = augment_texts(texts, p_mask=0.1, p_pos=0, p_ng=0, n_iter=2, exclude_originals=False)
    words = [w for text in result.texts for w in text.split()]
    assert len(result.texts) == 800  # two rounds, no duplicate (P ~ 0.9^40 each, squared)
    assert len(words) == 800 * 40
    rate = words.count(MASK) / len(words)
    assert abs(rate - 0.1) < 0.01  # 6 standard deviations
    originals = [text.split() for text in texts]
    for text, source in zip(result.texts, result.source.tolist()):
        for word, original in zip(text.split(), originals[source]):
            assert word in (MASK, original)


def test_replacement_rate_and_shapes() -> None:
    texts = _sample_corpus() + _distinct_sentences(100, 20)
    originals = [text.split() for text in texts]
    corpus = {w for words in originals for w in words}
    result = augment_texts(texts, p_mask=0, p_pos=0.3, p_ng=0, n_iter=2, exclude_originals=False)
    changed = total = 0
    for text, source in zip(result.texts, result.source.tolist()):
        for word, original in zip(text.split(), originals[source], strict=True):
            total += 1
            if word != original:
                changed += 1
                assert word in corpus and word_shape(word) == word_shape(original)
    # dedup drops unchanged repeats, which biases the rate a little upwards on short texts
    assert 0.27 < changed / total < 0.36


def test_mask_and_replacement_exclude_each_other() -> None:
    texts = _distinct_sentences(200, 30)
    result = augment_texts(texts, p_mask=0.5, p_pos=0.5, p_ng=0, n_iter=1, exclude_originals=False)
    originals = [text.split() for text in texts]
    masked = replaced = 0
    for text, source in zip(result.texts, result.source.tolist()):
        for word, original in zip(text.split(), originals[source]):
            assert word != original  # every word hit by exactly one rule
            masked += word == MASK
            replaced += word != MASK
    assert abs(masked / (masked + replaced) - 0.5) < 0.03


def test_ngrams_are_contiguous_and_short() -> None:
    texts = [*_distinct_sentences(300, 12), "one", "two words"]
    result = augment_texts(texts, p_mask=0, p_pos=0, p_ng=1, n_iter=4, exclude_originals=False)
    sizes = Counter()
    for text, source in zip(result.texts, result.source.tolist()):
        words, original = text.split(), texts[source].split()
        n = len(words)
        assert 1 <= n <= min(5, len(original))
        assert any(original[a : a + n] == words for a in range(len(original) - n + 1))
        sizes[n] += 1
    assert set(sizes) == {1, 2, 3, 4, 5}


def test_deterministic_unique_and_new() -> None:
    texts = _sample_corpus(count=200)
    first = augment_texts(texts, n_iter=5, seed=7)
    again = augment_texts(texts, n_iter=5, seed=7)
    other = augment_texts(texts, n_iter=5, seed=8)
    assert first.texts == again.texts and torch.equal(first.source, again.source)
    assert first.texts != other.texts
    assert len(set(first.texts)) == len(first.texts)
    assert not set(first.texts) & {" ".join(t.split()) for t in texts}
    assert first.draws == len(first.texts) + first.duplicates
    split = first.as_split()
    assert split.texts == first.texts and (split.labels == UNLABELLED).all()


def test_caps() -> None:
    texts = _distinct_sentences(100, 15)
    full = augment_texts(texts, n_iter=6, seed=1)
    capped = augment_texts(texts, n_iter=6, seed=1, max_total=250)
    assert len(capped.texts) == 250 and capped.texts == full.texts[:250]
    assert set(capped.source.tolist()) == set(range(100))  # a cap spreads over all sentences
    one_each = augment_texts(texts, n_iter=6, seed=1, per_example=1)
    assert sorted(one_each.source.tolist()) == list(range(100))
    two_each = augment_texts(texts, n_iter=6, seed=1, per_example=2, max_total=150)
    assert len(two_each.texts) == 150 and max(Counter(two_each.source.tolist()).values()) == 2
    assert augment_texts(texts, max_total=0).texts == []


def test_word_shapes() -> None:
    assert [word_shape(w) for w in [",", "--", "1999", "10,000", "Paris", "É", "film", "n't", "4/5ths"]] == [
        "punct", "punct", "number", "number", "capitalised", "capitalised", "other", "other", "other"
    ]  # fmt: skip


def _brute_force_frequency(words: list[str], counts: list[int], k: int) -> list[set[str]]:
    """Reference: the k words nearest in rank within the shape, by trying every window."""
    out = []
    for w in words:
        same = sorted(
            (v for v in words if word_shape(v) == word_shape(w)),
            key=lambda v: (-counts[words.index(v)], v),
        )
        r, n = same.index(w), len(same)
        if n <= k:
            out.append(set(same) - {w})
            continue
        windows = [range(low, low + k + 1) for low in range(n - k) if low <= r <= low + k]
        centred = min(windows, key=lambda win: abs(win.start - (r - k // 2)))
        out.append({same[i] for i in centred} - {w})
    return out


def test_frequency_substitutes_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)] + [f"C{i}" for i in range(3)] + [",", ".", "1", "22"]
    counts = rng.integers(1, 20, len(words)).tolist()
    for k in (1, 2, 4, 5):
        table, valid = substitutes(words, counts, neighbours=k)
        expected = _brute_force_frequency(words, counts, k)
        for i, want in enumerate(expected):
            got = {words[j] for j in table[i, : valid[i]]}
            assert got == want and len(want) == valid[i], (k, words[i])
            assert (table[i, valid[i] :] == -1).all()


def test_embedding_substitutes_match_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(30)] + ["Same", "same", "nov", ",", ";", "!"]
    vocab = {w: i for i, w in enumerate(words) if w not in ("Same", "nov")}  # Same -> same's row
    vectors = torch.randn(len(words), 8, generator=g)
    embeddings = WordEmbeddings(vectors, vocab)
    table, valid = substitutes(words, [1] * len(words), neighbours=3, embeddings=embeddings)
    frequency_table, frequency_valid = substitutes(words, [1] * len(words), neighbours=3)
    unit = torch.nn.functional.normalize(vectors, dim=1)
    for i, w in enumerate(words):
        got = [words[j] for j in table[i, : valid[i]]]
        if w == "nov":  # no vector: the frequency rule
            assert table[i].tolist() == frequency_table[i].tolist()
            continue
        row = embeddings.row(w)
        candidates = [
            v
            for v in words
            if v != "nov" and embeddings.row(v) != row and word_shape(v) == word_shape(w)
        ]
        scores = {v: float(unit[row] @ unit[embeddings.row(v)]) for v in candidates}
        want = sorted(candidates, key=lambda v: -scores[v])[:3]
        assert got == want, w
    assert "Same" not in [words[j] for j in table[words.index("same")]]
    assert {words[j] for j in table[words.index(",")][: valid[words.index(",")]]} == {";", "!"}
    # the only capitalised word has nothing to turn into, by either rule
    assert frequency_valid[words.index("Same")] == valid[words.index("Same")] == 0


def test_bad_settings_are_listed_together() -> None:
    with pytest.raises(ValueError) as info:
        augment_texts(["a b"], p_mask=1.5, p_ng=-0.1, n_iter=0, per_example=0, max_total=-1)
    message = str(info.value)
    for name in ("'p_mask'", "'p_ng'", "'n_iter'", "'per_example'", "'max_total'"):
        assert name in message
    with pytest.raises(ValueError, match="at most 1"):
        augment_texts(["a b"], p_mask=0.6, p_pos=0.6)
