"""Text classification data: texts and their labels (`TextSplit`), a dataset's train,
validation and test splits with its class names (`TextBundle`), and validation carved
from train, by rows or by whole sentences.

A text dataset keeps the raw text: teacher and student may use different
tokenizers, so each model tokenizes the texts itself. The other text modules:

- `text_sources`: SST-2, your own CSV / TSV / JSON Lines files and saved Hugging
  Face datasets as `TextBundle`s, and unlabelled text for a transfer set;
- `text_readers` and `text_labels`: one file (or saved split) read into texts and
  class indices, by rules that are the same for every format;
- `text_tokenizers`: `VocabTokenizer` and `TextCollator`, texts to token ids;
- `text_batches`: a split's token ids (`TokenizedTexts`), padded batches, length
  buckets;
- `text_augment`: Tang et al.'s augmented transfer set;
- `text_task`: `TextData`, text classification as the training loop sees it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

UNLABELLED = -1  # the label of an example without one (transfer text)


@dataclass
class TextSplit:
    """Texts and their labels: texts[i] has class index labels[i], or UNLABELLED (-1)."""

    texts: list[str]
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        assert self.labels.dtype == torch.int64 and self.labels.dim() == 1, self.labels
        assert len(self.texts) == self.labels.shape[0], (len(self.texts), self.labels.shape)

    @classmethod
    def unlabelled(cls, texts: Sequence[str]) -> TextSplit:
        return cls(list(texts), torch.full((len(texts),), UNLABELLED, dtype=torch.int64))

    @classmethod
    def concat(cls, splits: Sequence[TextSplit]) -> TextSplit:
        texts = [text for split in splits for text in split.texts]
        labels = [split.labels for split in splits]
        return cls(texts, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_labelled(self) -> bool:
        return bool((self.labels != UNLABELLED).all())

    def subset(self, index: torch.Tensor | slice | Sequence[int]) -> TextSplit:
        if isinstance(index, slice):
            return TextSplit(self.texts[index], self.labels[index])
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.int64).flatten()
        return TextSplit([self.texts[i] for i in index.tolist()], self.labels[index])


@dataclass
class TextBundle:
    """Train, validation and test texts with the class names and where they came from.

    `settings` records how the files were read and split (columns, val_fraction,
    split_seed, dropped empty texts), for the run's results.
    """

    train: TextSplit
    val: TextSplit
    test: TextSplit
    class_names: list[str]
    source: str  # "sst2", "files" or "hf_disk"
    source_files: list[Path]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> dict[str, TextSplit]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def fingerprint(self) -> str:
        """sha256 over the class names and every split's texts and labels, in order.

        It changes when any text, label, class name or the train/validation split
        does, and not when the files move.
        """
        h = hashlib.sha256(json.dumps(self.class_names).encode())
        for name, split in self.splits().items():
            h.update(f"\0{name}\0{len(split)}\0".encode())
            for text in split.texts:
                data = text.encode()
                h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguity
                h.update(data)
            h.update(split.labels.numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: source, files, classes, examples and class counts per split."""
        splits = {}
        for name, split in self.splits().items():
            counts = torch.bincount(split.labels[split.labels >= 0], minlength=self.num_classes)
            splits[name] = {
                "examples": len(split),
                "class_counts": dict(zip(self.class_names, counts.tolist())),
                "unlabelled": int((split.labels == UNLABELLED).sum()),
            }
        return {
            "source": self.source,
            "files": [str(p) for p in self.source_files],
            "class_names": self.class_names,
            "splits": splits,
            "settings": self.settings,
            "fingerprint": self.fingerprint(),
        }


def split_validation(
    full: TextSplit, val_fraction: float, seed: int
) -> tuple[TextSplit, TextSplit]:
    """(train, val) from a seeded permutation: val is the first round(N * val_fraction)
    indices of `torch.randperm(N)` under `seed`, train the rest in permuted order (so a
    limit on train takes a random subset, the same for the same seed)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(full) * val_fraction)
    return full.subset(order[n_val:]), full.subset(order[:n_val])


def split_validation_by_sentence(
    full: TextSplit, val_fraction: float, seed: int
) -> tuple[TextSplit, TextSplit, int]:
    """(train, val, dropped) for data that holds sentences and their phrases, as SST-2's
    train.tsv does: a random row split puts in validation phrases whose sentence (and
    sibling phrases) are in train.

    Texts are word sequences (split at whitespace). A sentence is a text that occurs in
    no other text as a contiguous sub-sequence. Validation takes round(S * val_fraction)
    of the S distinct sentences (seeded `torch.randperm`, sentences in order of first
    appearance); train keeps every other row except the `dropped` phrases that occur
    only inside validation sentences, so no validation sentence has its own phrases
    labelled in train. Phrases that a training sentence also holds ("the film") stay in
    train, as they do for the test sentences.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    unique: dict[tuple[str, ...], int] = {}
    row_text = [unique.setdefault(tuple(text.split()), len(unique)) for text in full.texts]
    is_sentence, containers, members = _sentences(list(unique))
    sentences = np.flatnonzero(is_sentence)  # (S,) text ids
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
    in_val = np.zeros(len(unique), dtype=bool)
    in_val[sentences[order[: round(len(sentences) * val_fraction)].numpy()]] = True
    held_by_train = np.zeros(len(unique), dtype=bool)
    held_by_train[members[~in_val[containers]]] = True
    train_rows, val_rows, dropped = [], [], 0
    for row, text in enumerate(row_text):
        if in_val[text]:
            val_rows.append(row)
        elif held_by_train[text]:
            train_rows.append(row)
        else:
            dropped += 1
    return full.subset(train_rows), full.subset(val_rows), dropped


def _sentences(texts: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which texts are sentences (in no other text), and every (sentence, member) pair of
    text ids where texts[member] is a contiguous sub-sequence of that sentence (a
    sentence is a member of itself).

    Longest texts first: a text is a sentence unless a longer sentence holds it, and
    whatever a non-sentence holds its sentence holds too, so only sentences' spans are
    looked up. Spans are hashed with two polynomial hashes modulo the prime 2^31 - 1,
    vectorised per text length, and matched against the texts' own hashes; a false
    match needs both 31-bit hashes of two same-length word sequences to collide.
    """
    words = [word for text in texts for word in text]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words), 1)}
    flat = np.fromiter((vocab[w] for w in words), dtype=np.int64, count=len(words))
    lengths = np.array([len(text) for text in texts], dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    modulus, bases = (1 << 31) - 1, (1_000_003, 998_244_353)
    powers = np.ones((len(bases), int(lengths.max(initial=0)) + 1), dtype=np.int64)
    for j in range(1, powers.shape[1]):
        powers[:, j] = powers[:, j - 1] * bases % modulus

    prefixes = {}  # length n -> (text ids (G,), prefix hashes (2, G, n + 1))
    keys = np.zeros(len(texts), dtype=np.int64)  # a text's 62-bit key: both hashes
    for n in np.unique(lengths).tolist():
        group = np.flatnonzero(lengths == n)
        rows = flat[offsets[group][:, None] + np.arange(n)]  # (G, n) word ids
        h = np.zeros((len(bases), len(group), n + 1), dtype=np.int64)
        for j in range(n):
            h[:, :, j + 1] = (h[:, :, j] * np.array(bases)[:, None] + rows[:, j]) % modulus
        prefixes[n] = (group, h)
        keys[group] = (h[0, :, n] << 31) | h[1, :, n]
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]

    is_sentence = np.zeros(len(texts), dtype=bool)
    contained = np.zeros(len(texts), dtype=bool)
    containers, members = [], []
    for n in sorted(prefixes, reverse=True):
        group, h = prefixes[n]
        fresh = ~contained[group]
        sentences, h = group[fresh], h[:, fresh]  # (G',), (2, G', n + 1)
        is_sentence[sentences] = True
        a, b = np.triu_indices(n + 1, k=1)  # every span [a, b), 0 <= a < b <= n
        span = (h[:, :, b] - h[:, :, a] * powers[:, None, b - a] % modulus) % modulus
        span_keys = (span[0] << 31) | span[1]  # (G', spans)
        at = np.searchsorted(sorted_keys, span_keys).clip(max=len(texts) - 1)
        found = by_key[at]
        hit = (sorted_keys[at] == span_keys) & (lengths[found] == b - a)
        contained[found[hit & (b - a < n)]] = True
        containers.append(np.broadcast_to(sentences[:, None], hit.shape)[hit])
        members.append(found[hit])
    empty = np.zeros(0, dtype=np.int64)
    return is_sentence, np.concatenate([empty, *containers]), np.concatenate([empty, *members])
