"""Transfer-set augmentation for text: new unlabelled sentences for the teacher to label.

Tang, Lu, Liu, Mou, Vechtomova & Lin (2019), "Distilling Task-Specific Knowledge
from BERT into Simple Neural Networks", section 3.3. For each word w_i of a training
sentence draw X_i ~ U[0, 1]:

- X_i < p_mask: masking, w_i -> "[MASK]" (the teacher's mask token; a
  `VocabTokenizer` reads it as <unk>, as the paper's students do);
- p_mask <= X_i < p_mask + p_pos: "POS-guided" replacement, w_i -> a random word
  of the same class (below); the two rules exclude each other.

Then, with probability p_ng, the whole synthetic example is cut to a random n-gram,
n uniform in {1, ..., max_ngram} (at most the sentence length), the start uniform
among the positions where it fits. Each sentence is drawn `n_iter` times (paper: 20,
with p_mask = p_pos = 0.1, p_ng = 0.25); duplicates are discarded.

Without a POS tagger, "a word of the same part of speech" is approximated:

- with `embeddings` (e.g. the teacher's input token embeddings): a word whose
  vector (looked up as is, else lowercased) exists is replaced by one of its
  `neighbours` nearest corpus words of the same shape (below) by cosine
  similarity, excluding words that share its vector ("good" -> "excellent",
  "bad", "great"; "film" -> "movie"; "1999" -> "1998");
- otherwise, and for words without a vector: by frequency and shape. Each distinct
  word gets a shape: "punct" (no letter or digit), "number" (digits, no letter),
  "capitalised" (first character an uppercase letter) or "other". Within a shape,
  words are ranked by corpus frequency (most frequent first, ties alphabetical);
  a word is replaced by one of the `neighbours` words nearest to it in that ranking
  (a window of neighbours + 1 ranks holding the word, shifted to fit inside the
  shape's ranking, the word itself removed). Frequent function words swap with
  each other ("the" <-> "a", "of" <-> "and"), punctuation with punctuation, rare
  content words with rare content words.

Words are whitespace-separated tokens (SST-2 is already tokenized); an augmented
example is its words joined by single spaces. Augment only the training part,
after the validation split, or validation sentences leak into training as n-grams.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdistill.data.text import TextSplit

SHAPES = ("punct", "number", "capitalised", "other")


@dataclass(frozen=True)
class WordEmbeddings:
    """Vectors for neighbour search: `vectors[vocab[token]]` is the token's (D,) vector.

    From a Hugging Face model and tokenizer:
    `WordEmbeddings(model.get_input_embeddings().weight.detach(), tokenizer.get_vocab())`.
    Only whole-word tokens matter: a corpus word is looked up as is, then lowercased.
    """

    vectors: torch.Tensor  # (V, D)
    vocab: Mapping[str, int]

    def row(self, word: str) -> int | None:
        row = self.vocab.get(word)
        return self.vocab.get(word.lower()) if row is None else row


@dataclass
class Augmented:
    """The augmented examples and where they came from."""

    texts: list[str]
    source: torch.Tensor  # (M,) int64: index of the original text each one came from
    draws: int  # synthetic examples drawn
    duplicates: int  # drawn but discarded: equal to an earlier draw or (by default) an original

    def as_split(self) -> TextSplit:
        """Unlabelled transfer examples (labels UNLABELLED), for the teacher to label."""
        return TextSplit.unlabelled(self.texts)


def word_shape(word: str) -> str:
    """One of SHAPES (see the module docstring)."""
    has_alpha = any(c.isalpha() for c in word)
    if not has_alpha and not any(c.isdigit() for c in word):
        return "punct"
    if not has_alpha:
        return "number"
    if word[0].isupper():
        return "capitalised"
    return "other"


def substitutes(
    words: Sequence[str],
    counts: Sequence[int] | np.ndarray,
    *,
    neighbours: int = 10,
    embeddings: WordEmbeddings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Replacement candidates for each distinct word: a (V, neighbours) table of word ids
    (-1 past the end) and the number of valid candidates per word (V,), by the
    embedding rule where a vector exists, else the frequency-and-shape rule."""
    table = np.full((len(words), neighbours), -1, dtype=np.int64)
    valid = np.zeros(len(words), dtype=np.int64)
    frequency = np.asarray(counts, dtype=np.int64)
    shapes = np.array([SHAPES.index(word_shape(w)) for w in words], dtype=np.int64)
    for shape in range(len(SHAPES)):
        # ranked: most frequent first, ties alphabetical
        members = np.flatnonzero(shapes == shape).tolist()
        members.sort(key=lambda i: (-frequency[i], words[i]))
        ranked = np.array(members, dtype=np.int64)
        ids, n_valid = _rank_window(len(ranked), neighbours)
        table[ranked] = np.where(ids >= 0, ranked[ids.clip(min=0)], -1)
        valid[ranked] = n_valid
    if embeddings is not None:
        _embedding_neighbours(words, embeddings, neighbours, table, valid)
    return table, valid


def _rank_window(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For ranks 0 .. n-1: the k nearest other ranks ((n, k), -1 past the end) and how
    many there are (min(k, n - 1))."""
    rank = np.arange(n)
    low = np.clip(rank - k // 2, 0, max(n - k - 1, 0))  # window [low, low + k] holds rank
    window = low[:, None] + np.arange(k + 1)  # (n, k + 1)
    ok = (window < n) & (window != rank[:, None])
    order = np.argsort(~ok, axis=1, kind="stable")  # valid ranks first, in rank order
    window = np.take_along_axis(np.where(ok, window, -1), order, axis=1)[:, :k]
    return window, ok.sum(1).clip(max=k)


def _embedding_neighbours(
    words: Sequence[str],
    embeddings: WordEmbeddings,
    k: int,
    table: np.ndarray,
    valid: np.ndarray,
) -> None:
    """Overwrite, for the words with a vector, their candidates with their k nearest
    corpus words of the same shape by cosine similarity (words sharing the same vector
    excluded)."""
    rows = [embeddings.row(w) for w in words]
    with_vector = np.array([i for i, r in enumerate(rows) if r is not None], dtype=np.int64)
    if len(with_vector) < 2:
        return
    row_ids = torch.tensor([rows[i] for i in with_vector.tolist()], dtype=torch.int64)
    shapes = torch.tensor([SHAPES.index(word_shape(words[i])) for i in with_vector.tolist()])
    vectors = embeddings.vectors.detach().to("cpu", torch.float32)[row_ids]  # (W, D)
    vectors = torch.nn.functional.normalize(vectors, dim=1)
    take = min(k, len(with_vector) - 1)
    for start in range(0, len(with_vector), 1024):
        chunk = slice(start, start + 1024)
        similarity = vectors[chunk] @ vectors.T  # (C, W)
        similarity[row_ids[chunk][:, None] == row_ids[None, :]] = -math.inf  # itself, same vector
        similarity[shapes[chunk][:, None] != shapes[None, :]] = -math.inf  # another shape
        best = similarity.topk(take, dim=1)  # (C, take)
        found = torch.isfinite(best.values)
        ids = torch.where(found, torch.as_tensor(with_vector)[best.indices], -1).numpy()
        table[with_vector[chunk]] = -1
        table[with_vector[chunk], :take] = ids
        valid[with_vector[chunk]] = found.sum(1).numpy()


def augment_texts(
    texts: Sequence[str],
    *,
    n_iter: int = 20,
    p_mask: float = 0.1,
    p_pos: float = 0.1,
    p_ng: float = 0.25,
    max_ngram: int = 5,
    per_example: int | None = None,
    max_total: int | None = None,
    seed: int = 0,
    mask_token: str = "[MASK]",
    neighbours: int = 10,
    embeddings: WordEmbeddings | None = None,
    exclude_originals: bool = True,
) -> Augmented:
    """Tang et al. (2019) augmentation of `texts` (see the module docstring).

    Draws run in rounds: in round r = 1 .. n_iter each sentence, in one seeded random
    order, yields one synthetic example. An example equal to an earlier one (or to
    any original, as whitespace-joined words, when `exclude_originals`) is discarded.
    A sentence stops contributing after `per_example` kept examples (None: no limit
    but n_iter), and everything stops at `max_total` examples, so a cap spreads over
    all sentences and a smaller cap keeps a prefix of a larger one. The result
    depends only on the texts, the settings and `seed`.
    """
    _check_settings(
        n_iter=n_iter,
        p_mask=p_mask,
        p_pos=p_pos,
        p_ng=p_ng,
        max_ngram=max_ngram,
        per_example=per_example,
        max_total=max_total,
        neighbours=neighbours,
    )
    sentences = [text.split() for text in texts]
    word_ids: dict[str, int] = {}
    flat = np.fromiter(
        (word_ids.setdefault(w, len(word_ids)) for words in sentences for w in words),
        dtype=np.int64,
    )  # (T,) every word of every sentence
    words = list(word_ids)
    lengths = np.array([len(sentence) for sentence in sentences], dtype=np.int64)  # (S,)
    starts = np.cumsum(lengths) - lengths
    table, valid = substitutes(
        words, np.bincount(flat, minlength=len(words)), neighbours=neighbours, embeddings=embeddings
    )
    strings = np.array([*words, mask_token], dtype=object)
    mask_id = len(words)

    rng = np.random.default_rng(seed)
    visit = [i for i in rng.permutation(len(sentences)).tolist() if lengths[i] > 0]
    seen = {" ".join(sentence) for sentence in sentences} if exclude_originals else set()
    limit = n_iter if per_example is None else min(per_example, n_iter)
    kept_per = [0] * len(sentences)
    out: list[str] = []
    source: list[int] = []
    draws = duplicates = 0
    total = math.inf if max_total is None else max_total
    for _ in range(n_iter):
        if len(out) >= total:
            break
        u = rng.random(len(flat))  # (T,) one draw per word
        new = flat.copy()
        new[u < p_mask] = mask_id
        replace = (u >= p_mask) & (u < p_mask + p_pos) & (valid[flat] > 0)
        old = flat[replace]
        pick = (rng.random(len(old)) * valid[old]).astype(np.int64)
        new[replace] = table[old, pick]
        cut = rng.random(len(sentences)) < p_ng  # (S,)
        n = np.minimum(rng.integers(1, max_ngram + 1, len(sentences)), lengths)
        offset = (rng.random(len(sentences)) * (lengths - n + 1)).astype(np.int64)
        begin = np.where(cut, starts + offset, starts).tolist()
        end = (np.where(cut, starts + offset + n, starts + lengths)).tolist()
        tokens = strings[new].tolist()
        for i in visit:
            if kept_per[i] >= limit:
                continue
            text = " ".join(tokens[begin[i] : end[i]])
            draws += 1
            if text in seen:
                duplicates += 1
                continue
            seen.add(text)
            out.append(text)
            source.append(i)
            kept_per[i] += 1
            if len(out) >= total:
                break
    return Augmented(out, torch.tensor(source, dtype=torch.int64), draws, duplicates)


def _check_settings(**settings: object) -> None:
    """One ValueError listing every bad setting."""
    errors = []

    def check(name: str, ok: bool, wanted: str) -> None:
        if not ok:
            errors.append(
                f"The {name!r} parameter of augment_texts must be {wanted}. "
                f"Got {settings[name]!r} instead."
            )

    def is_int(value: object, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    def is_probability(value: object) -> bool:
        return (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and 0 <= float(value) <= 1
        )

    for name in ("p_mask", "p_pos", "p_ng"):
        check(name, is_probability(settings[name]), "a float in [0, 1]")
    p_mask, p_pos = settings["p_mask"], settings["p_pos"]
    if is_probability(p_mask) and is_probability(p_pos) and p_mask + p_pos > 1:  # type: ignore[operator]
        errors.append(
            f"p_mask + p_pos must be at most 1 (the two rules exclude each other). "
            f"Got {p_mask} + {p_pos} instead."
        )
    check("n_iter", is_int(settings["n_iter"], 1), "an int >= 1")
    check("max_ngram", is_int(settings["max_ngram"], 1), "an int >= 1")
    check("neighbours", is_int(settings["neighbours"], 1), "an int >= 1")
    for name, low in (("per_example", 1), ("max_total", 0)):
        value = settings[name]
        check(name, value is None or is_int(value, low), f"None or an int >= {low}")
    if errors:
        raise ValueError(" ".join(errors))
