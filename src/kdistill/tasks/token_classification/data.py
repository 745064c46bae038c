"""Token-classification data: CoNLL-format sentences, read and checked, and their
batches for each model's tokenizer.

A CoNLL file has one word a line, its columns separated by spaces (CoNLL-2003:
`word POS chunk NER`), a blank line between sentences and `-DOCSTART-` lines between
documents. Every line of a file must have the same number of columns; tags must be
IOB2 (`O`, `B-TYPE`, `I-TYPE`, an `I-` only after a `B-` or `I-` of its type).

Each model reads the words through its own tokenizer (`TaggedSentences.encode`): a
Hugging Face fast tokenizer splits words into subwords (`is_split_into_words`), a
word vocabulary (`WordVocab`, the BiLSTM's) keeps one token per word. Either way a
word's label sits on its first token (`first`: that token's position, -1 when the
word was cut off by max_length or produced no token), so the logits of any two models
are compared word by word. A word without a first token is never counted in a loss,
and is predicted `O` when measured (a miss when it is part of an entity).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data.paths import resolve_data_root, resolve_user_path
from kdistill.data.text_batches import length_buckets
from kdistill.errors import DataError
from kdistill.recipe.token_classification import TaggingDataConfig
from kdistill.tasks.token_classification.augment import augment_tagged

IGNORE = -100
UNLABELLED = -1  # a transfer sentence's words: the teacher's signal only, no label term
DOCSTART = "-DOCSTART-"


@dataclass
class Sentences:
    """One split: words and their tag names, sentence by sentence (None: a transfer
    sentence, which has no tags)."""

    words: list[list[str]]
    tags: list[list[str] | None]
    source: str = ""  # the file, for messages

    def __len__(self) -> int:
        return len(self.words)

    @property
    def num_words(self) -> int:
        return sum(len(w) for w in self.words)


def read_conll(path: Path, *, tag_column: int = -1) -> Sentences:
    """The sentences of a CoNLL-format file; a DataError names the file and line of a
    line whose column count differs from the file's first line."""
    words: list[list[str]] = []
    tags: list[list[str] | None] = []
    current_words: list[str] = []
    current_tags: list[str] = []
    columns: int | None = None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the CoNLL file {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            if current_words:
                words.append(current_words)
                tags.append(current_tags)
                current_words, current_tags = [], []
            continue
        if columns is None:
            columns = len(parts)
            if columns < 2:
                raise DataError(
                    f"{path}, line {number}: one column ({line.strip()!r}); a CoNLL file has "
                    "the word first and its tag in a later column, separated by spaces"
                )
            if not -columns <= tag_column < columns or tag_column in (0, -columns):
                raise DataError(
                    f"{path}: data.tag_column {tag_column} is not a tag column of lines with "
                    f"{columns} columns (the word is column 0); use 1..{columns - 1} or -1"
                )
        elif len(parts) != columns:
            raise DataError(
                f"{path}, line {number}: {len(parts)} columns where the file's lines have "
                f"{columns} ({line.strip()!r}); every line is `word ... tag` with the same "
                "columns, separated by spaces (a word with a space in it breaks this)"
            )
        if parts[0] == DOCSTART:
            continue
        current_words.append(parts[0])
        current_tags.append(parts[tag_column])
    if current_words:
        words.append(current_words)
        tags.append(current_tags)
    if not words:
        raise DataError(f"{path} holds no sentences (one `word ... tag` line per word)")
    return Sentences(words, tags, source=str(path))


def check_iob2(split: Sentences) -> None:
    """Refuse tags that are not IOB2, naming the first few with their sentence."""
    bad: list[str] = []
    for index, tags in enumerate(split.tags):
        if tags is None:
            continue
        previous = "O"
        for position, tag in enumerate(tags):
            kind, _, entity = tag.partition("-")
            valid = tag == "O" or (kind in ("B", "I") and entity)
            if valid and kind == "I" and previous not in (f"B-{entity}", f"I-{entity}"):
                valid = False
            if not valid:
                bad.append(f"sentence {index + 1}, word {position + 1} {tag!r} after {previous!r}")
            previous = tag
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(
            f"{split.source}: tags that are not IOB2: {'; '.join(bad[:5])}{more}. IOB2 tags "
            "are O, B-TYPE (an entity's first word) and I-TYPE (its next words, after a B- or "
            "I- of the same type); convert IOB1 or BIOES files first"
        )


@dataclass
class Encoded:
    """A split's sentences in one tokenizer: token ids, and each word's first token."""

    ids: list[torch.Tensor]  # per sentence (T_i,)
    first: list[torch.Tensor]  # per sentence (W_i,) positions, -1 for a word without one
    pad_id: int

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(i) for i in self.ids], dtype=torch.int64)

    def dropped(self) -> int:
        """Words without a first token (cut off by max_length, or no token at all)."""
        return int(sum(int((f < 0).sum()) for f in self.first))


class WordVocab:
    """A word-level tokenizer (the BiLSTM's): one id per training word seen at least
    `min_freq` times, the rest `<unk>`; id 0 pads."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}
        self.pad_token_id = 0
        self.unk_id = 1

    @classmethod
    def build(cls, sentences: list[list[str]], *, min_freq: int = 1, max_size: int = 50000):
        counts = Counter(word for sentence in sentences for word in sentence)
        kept = [w for w, c in counts.most_common(max_size - 2) if c >= min_freq]
        return cls(["<pad>", "<unk>", *kept])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def key(self) -> str:
        digest = hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()
        return f"words:{digest[:16]}"


@dataclass
class TaggedSentences:
    """The splits, the label names (O first, then B-/I- of each type, sorted) and the
    tokenizations made so far, by (tokenizer key, split).

    `transfer`: untagged sentences for the distill stage (data.transfer), which
    `for_distill()` appends to train; their words are labelled UNLABELLED, so the
    label terms of the objective skip them and the teacher's terms read them."""

    train: Sentences
    val: Sentences
    test: Sentences
    label_names: list[str]
    max_length: int
    transfer: Sentences | None = None
    _encoded: dict[tuple[str, str], Encoded] = field(default_factory=dict, repr=False)
    _labels: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _distill: TaggedSentences | None = field(default=None, repr=False)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def entity_types(self) -> list[str]:
        return sorted({name[2:] for name in self.label_names if name != "O"})

    def split(self, name: str) -> Sentences:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def for_distill(self) -> TaggedSentences:
        """The data of a stage that learns from a teacher: the training sentences, then
        the transfer sentences (a new object: its own tokenizations of train)."""
        if self.transfer is None:
            return self
        if self._distill is not None:  # one per run: every seed reads its tokenizations
            return self._distill
        train = Sentences(
            self.train.words + self.transfer.words,
            self.train.tags + self.transfer.tags,
            f"{self.train.source} + {self.transfer.source}",
        )
        self._distill = TaggedSentences(
            train, self.val, self.test, self.label_names, self.max_length
        )
        return self._distill

    def labels(self, split: str) -> list[torch.Tensor]:
        """Each sentence's label ids (W_i,)."""
        if split not in self._labels:
            ids = {name: i for i, name in enumerate(self.label_names)}
            sentences = self.split(split)
            self._labels[split] = [
                torch.tensor([ids[t] for t in tags], dtype=torch.int64)
                if tags is not None
                else torch.full((len(words),), UNLABELLED, dtype=torch.int64)
                for words, tags in zip(sentences.words, sentences.tags, strict=True)
            ]
        return self._labels[split]

    def encode(self, model: nn.Module, split: str) -> Encoded:
        tokenizer = model.kdistill_tokenizer
        key = (str(model.kdistill_tokenizer_key), split)
        if key not in self._encoded:
            words = self.split(split).words
            if isinstance(tokenizer, WordVocab):
                self._encoded[key] = _encode_words(tokenizer, words, self.max_length)
            else:
                self._encoded[key] = _encode_subwords(tokenizer, words, self.max_length)
        return self._encoded[key]

    def batch(self, model: nn.Module, split: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's inputs for sentences `rows` (input_ids, attention_mask (B, T)),
        and `first` (B, W): each word's first-token position, -1 past a sentence's end
        or for a word without one, W the most words of a sentence in the batch."""
        encoded = self.encode(model, split)
        rows_list = [int(r) for r in rows]
        width = max((len(encoded.ids[r]) for r in rows_list), default=0)
        words = max((len(encoded.first[r]) for r in rows_list), default=0)
        input_ids = torch.full((len(rows_list), width), encoded.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows_list), width), dtype=torch.int64)
        first = torch.full((len(rows_list), words), -1, dtype=torch.int64)
        for i, r in enumerate(rows_list):
            n = len(encoded.ids[r])
            input_ids[i, :n] = encoded.ids[r]
            mask[i, :n] = 1
            first[i, : len(encoded.first[r])] = encoded.first[r]
        return {"input_ids": input_ids, "attention_mask": mask, "first": first}

    def word_labels(self, split: str, rows: torch.Tensor, words: int) -> torch.Tensor:
        """(B, W) label ids of sentences `rows`, IGNORE past a sentence's end."""
        labels = self.labels(split)
        out = torch.full((len(rows), words), IGNORE, dtype=torch.int64)
        for i, r in enumerate(rows.tolist()):
            out[i, : len(labels[r])] = labels[r]
        return out

    def order(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """An epoch's order of training sentences, batches of similar token lengths."""
        lengths = self.encode(model, "train").lengths
        batches = length_buckets(lengths, batch_size, generator, pool_batches=50)
        full = [b for b in batches if len(b) == batch_size]
        return torch.cat(full + [b for b in batches if len(b) < batch_size])


def _encode_subwords(tokenizer: Any, sentences: list[list[str]], max_length: int) -> Encoded:
    ids: list[torch.Tensor] = []
    first: list[torch.Tensor] = []
    for start in range(0, len(sentences), 1000):
        chunk = sentences[start : start + 1000]
        out = tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=max_length)
        for i, words in enumerate(chunk):
            positions = torch.full((len(words),), -1, dtype=torch.int64)
            for position, word in enumerate(out.word_ids(i)):
                if word is not None and positions[word] < 0:
                    positions[word] = position
            ids.append(torch.tensor(out["input_ids"][i], dtype=torch.int64))
            first.append(positions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids, first, pad)


def _encode_words(vocab: WordVocab, sentences: list[list[str]], max_length: int) -> Encoded:
    ids, first = [], []
    for words in sentences:
        kept = words[:max_length]
        ids.append(torch.tensor([vocab.index.get(w, vocab.unk_id) for w in kept]))
        positions = torch.arange(len(words))
        positions[len(kept) :] = -1
        first.append(positions)
    return Encoded(ids, first, vocab.pad_token_id)


def load_tagging(section: TaggingDataConfig, data_dir: str | Path | None) -> TaggedSentences:
    """The recipe's splits, read, checked (columns, IOB2, labels) and limited."""
    root, tried = resolve_data_root(data_dir)
    if section.source == "conll2003":
        folder = (
            resolve_user_path(section.path, root, source="conll2003", layout="CoNLL files")
            if section.path and root is not None
            else (root / "conll2003" if root is not None else None)
        )
        if folder is None or not (folder / section.files.train).is_file():
            where = folder if folder is not None else tried[0] / "conll2003"
            raise DataError(
                f"CoNLL-2003 not found: {Path(where) / section.files.train} does not exist. "
                "Its text is licensed for research use and cannot be downloaded here: put "
                "train.txt, valid.txt and test.txt (eng.train, eng.testa, eng.testb with IOB2 "
                "tags; the original files are IOB1: convert them first) in <data "
                "folder>/conll2003 (the data folder is --data-dir, else $KDISTILL_DATA)"
            )
    else:
        if root is None:
            root = Path.cwd()
        folder = resolve_user_path(section.path, root, source="conll", layout="CoNLL files")
    splits: dict[str, Sentences] = {}
    for name, file, limit in (
        ("train", section.files.train, section.limit_train),
        ("val", section.files.val, section.limit_val),
        ("test", section.files.test, section.limit_test),
    ):
        if file is None:
            splits[name] = Sentences([], [], source="none")
            continue
        path = folder / file
        if not path.is_file():
            raise DataError(
                f"data.files.{name}: {path} does not exist; the folder holds "
                + (", ".join(sorted(p.name for p in folder.iterdir())) or "nothing")
            )
        split = read_conll(path, tag_column=section.tag_column)
        check_iob2(split)
        if limit is not None:
            split = Sentences(split.words[:limit], split.tags[:limit], split.source)
        splits[name] = split
    types = sorted({t[2:] for tags in splits["train"].tags for t in tags or () if t != "O"})
    names = ["O"] + [f"{kind}-{t}" for t in types for kind in ("B", "I")]
    for name in ("val", "test"):
        unseen = sorted({t for tags in splits[name].tags for t in tags or ()} - set(names))
        if unseen:
            raise DataError(
                f"{splits[name].source}: tags {', '.join(unseen)} never occur in the training "
                f"sentences ({splits['train'].source}"
                + (f", the first {section.limit_train}" if section.limit_train else "")
                + f"), so no model can learn them; the training tags are {', '.join(names)}"
            )
    transfer = None if section.transfer is None else _transfer(section, splits["train"], root)
    return TaggedSentences(
        splits["train"], splits["val"], splits["test"], names, section.max_length, transfer
    )


def _transfer(section: TaggingDataConfig, train: Sentences, root: Path | None) -> Sentences:
    """data.transfer's sentences: the file's, then the augmented training sentences."""
    settings = section.transfer
    assert settings is not None
    words: list[list[str]] = []
    sources: list[str] = []
    if settings.file is not None:
        path = Path(settings.file).expanduser()
        if not path.is_absolute():
            path = (root if root is not None else Path.cwd()) / path
        if not path.is_file():
            raise DataError(
                f"data.transfer.file: {path} does not exist (a relative path resolves against "
                "the data folder: --data-dir, else $KDISTILL_DATA)"
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"data.transfer.file: cannot read {path}: {exc}") from None
        words += [line.split() for line in lines if line.strip()]
        if not words:
            raise DataError(
                f"data.transfer.file: {path} holds no sentences (one a line, words separated "
                "by spaces)"
            )
        sources.append(str(path))
    if settings.augment is not None:
        a = settings.augment
        augmented = augment_tagged(
            train.words, [t or [] for t in train.tags],
            copies=a.copies, p_mention=a.p_mention, p_mask=a.p_mask, p_word=a.p_word,
            max_total=a.max_total, seed=a.seed,
        )  # fmt: skip
        words += augmented.words
        sources.append(
            f"{len(augmented.words)} augmented sentences ({augmented.draws} drawn, "
            f"{augmented.duplicates} duplicates dropped)"
        )
    return Sentences(words, [None] * len(words), " + ".join(sources))
