"""A transfer set for tagging: new sentences made from the training sentences, which the
teacher tags and the distill stage learns from (the baseline never sees them).

In each round (`copies` of them) every training sentence yields one new sentence:

- mention replacement (Dai & Adel 2020, "An Analysis of Simple Data Augmentation for
  Named Entity Recognition"): each entity of the sentence (a B- tag and the I- tags
  after it) is, with probability `p_mention`, replaced by another entity of the same
  type drawn uniformly from the training sentences' entities ("Germany" -> "Peru",
  "John Major" -> "Bill Clinton");
- each word outside the entities, with one draw u ~ U[0, 1): u < `p_mask` masks it
  ("[MASK]", the teacher's mask token), `p_mask` <= u < `p_mask + p_word` replaces it
  with a word of the same kind, chosen as Tang et al. (2019) do without a tagger:
  among the training words of the same shape (punctuation, number, capitalised,
  other), one of the 10 nearest in frequency rank (kdistill.data.text_augment).

Nothing is cut: a tag sequence keeps its entities whole. A new sentence equal to a
training sentence or an earlier new one is discarded. The teacher's word distributions
are the only signal on these sentences, so the gold tags that mention replacement
would imply are not kept; what makes them useful is that the teacher has a view on
words and contexts that the training tags do not show. The result depends only on the
sentences, their tags and the settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kdistill.data.text_augment import substitutes


@dataclass
class AugmentedSentences:
    words: list[list[str]]
    source: list[int]  # the training sentence each one came from
    draws: int  # new sentences drawn
    duplicates: int  # drawn but discarded (equal to a training sentence or an earlier draw)


def entity_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, type) of each entity of an IOB2 tag sequence, end exclusive."""
    spans: list[tuple[int, int, str]] = []
    for position, tag in enumerate(tags):
        if tag.startswith("B-"):
            spans.append((position, position + 1, tag[2:]))
        elif tag.startswith("I-") and spans and spans[-1][1] == position:
            start, _, kind = spans[-1]
            spans[-1] = (start, position + 1, kind)
    return spans


def augment_tagged(
    words: list[list[str]],
    tags: list[list[str]],
    *,
    copies: int = 4,
    p_mention: float = 0.5,
    p_mask: float = 0.1,
    p_word: float = 0.1,
    max_total: int | None = None,
    seed: int = 0,
    mask_token: str = "[MASK]",
    neighbours: int = 10,
) -> AugmentedSentences:
    """New sentences from `words` (tagged IOB2 by `tags`), as the module docstring says.

    Rounds visit the sentences in one seeded order; `max_total` stops early, so a
    smaller cap keeps a prefix of a larger one.
    """
    vocabulary: dict[str, int] = {}
    for sentence in words:
        for word in sentence:
            vocabulary.setdefault(word, len(vocabulary))
    counts = np.zeros(len(vocabulary), dtype=np.int64)
    for sentence in words:
        for word in sentence:
            counts[vocabulary[word]] += 1
    strings = list(vocabulary)
    table, valid = substitutes(strings, counts, neighbours=neighbours)
    mentions: dict[str, list[tuple[str, ...]]] = {}
    spans = [entity_spans(t) for t in tags]
    for sentence, sentence_spans in zip(words, spans, strict=True):
        for start, end, kind in sentence_spans:
            mentions.setdefault(kind, []).append(tuple(sentence[start:end]))

    rng = np.random.default_rng(seed)
    order = [i for i in rng.permutation(len(words)).tolist() if words[i]]
    seen = {"\x1f".join(sentence) for sentence in words}
    out: list[list[str]] = []
    source: list[int] = []
    draws = duplicates = 0
    total = math.inf if max_total is None else max_total
    for _ in range(copies):
        for index in order:
            if len(out) >= total:
                break
            new = _draw(
                words[index], spans[index], rng, mentions, vocabulary, strings, table, valid,
                p_mention=p_mention, p_mask=p_mask, p_word=p_word, mask_token=mask_token,
            )  # fmt: skip
            draws += 1
            key = "\x1f".join(new)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            out.append(new)
            source.append(index)
    return AugmentedSentences(out, source, draws, duplicates)


def _draw(
    sentence: list[str],
    spans: list[tuple[int, int, str]],
    rng: np.random.Generator,
    mentions: dict[str, list[tuple[str, ...]]],
    vocabulary: dict[str, int],
    strings: list[str],
    table: np.ndarray,
    valid: np.ndarray,
    *,
    p_mention: float,
    p_mask: float,
    p_word: float,
    mask_token: str,
) -> list[str]:
    starts = {start: (end, kind) for start, end, kind in spans}
    new: list[str] = []
    position = 0
    while position < len(sentence):
        if position in starts:
            end, kind = starts[position]
            mention = tuple(sentence[position:end])
            pool = mentions[kind]
            if rng.random() < p_mention and len(pool) > 1:
                choice = pool[int(rng.integers(len(pool)))]
                for _ in range(8):  # another mention where the pool has one
                    if choice != mention:
                        break
                    choice = pool[int(rng.integers(len(pool)))]
                mention = choice
            new.extend(mention)
            position = end
            continue
        word = sentence[position]
        u = rng.random()
        if u < p_mask:
            word = mask_token
        elif u < p_mask + p_word:
            row = vocabulary[word]
            if valid[row] > 0:
                word = strings[int(table[row, int(rng.integers(valid[row]))])]
        new.append(word)
        position += 1
    return new
