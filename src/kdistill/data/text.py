"""Text classification data: raw texts and labels, readers, tokenized batches.

A text dataset keeps the raw text. Teacher and student may use different
tokenizers, so each model tokenizes the texts itself: `TextCollator(tokenizer,
max_length=...)` pre-tokenizes a split once (`TokenizedTexts`) and a training step
only gathers and pads a batch, to the longest text in it. `length_buckets` draws
batches of similar-length texts so little of a batch is padding.

Sources, each returning a `TextBundle` (train, val, test, class names):

- `load_sst2(folder)`: GLUE SST-2 (`train.tsv`, `dev.tsv`). GLUE hides the test
  labels, so `dev.tsv` is the test split; validation is carved from train, by
  rows (`split_validation`) or by whole sentences (`split_validation_by_sentence`:
  train.tsv is mostly phrases of its own sentences).
- `load_text_files(train=..., test=...)`: your own CSV, TSV or JSON Lines files
  with a text column and a label column.
- `load_hf_disk(path)`: a Hugging Face dataset saved with `save_to_disk`.

Unlabelled text for a transfer set: `read_unlabelled(path)` reads a plain text file
(one example per line), or CSV / TSV / JSON Lines / a saved dataset with a text
column. Its labels are `UNLABELLED` (-1).

Tokenizers: a Hugging Face fast tokenizer, a `tokenizers.Tokenizer`, or
`VocabTokenizer`, a word-level vocabulary built from the training texts for
students without a subword tokenizer (BiLSTM, TextCNN).

Reading rules, the same for every format:

- Texts are stripped of surrounding whitespace. Empty texts are refused (the
  error names how many and where) unless `drop_empty=True`, which skips them and
  records how many were skipped in `TextBundle.settings["dropped_empty"]`.
- CSV follows RFC 4180 (quotes allowed). TSV has no quoting: one line is one row,
  fields split at each TAB, as in GLUE (its texts contain `"` and `'` freely).
- Labels are integers or strings. Without `class_names`, the classes come from
  the training split: if every label is an integer, class k is named "k" and there
  are max + 1 classes; otherwise the distinct labels, sorted, are the class names.
  Sorted rather than in order of first appearance, so that shuffling or
  re-exporting a file never renumbers the classes. With `class_names`, a label
  equal to a class name is that class, and an integer label k is class k.
  Validation and test labels must be classes of the training split (or of
  `class_names`): a typo in a test label is an error, not a new class.
- Every problem is a `DataError` naming the file, the line (files) or row (saved
  datasets, 0-based) and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kdistill.errors import DataError

UNLABELLED = -1  # the label of an example without one (transfer text)
SST2_CLASSES = ["negative", "positive"]
TextFormat = Literal["csv", "tsv", "jsonl", "txt", "hf_disk"]
_SUFFIXES: dict[str, TextFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # read as JSON Lines; a JSON array gets an error that says how to convert
    ".txt": "txt",
}
_FORMATS = ("csv", "tsv", "jsonl", "txt", "hf_disk")
_SHOWN = 5  # rows named in an error message before "and N more"


# ----------------------------------------------------------------------------- splits


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


# ----------------------------------------------------------------------------- sources


def load_sst2(
    folder: str | Path,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    val_unit: Literal["rows", "sentences"] = "sentences",
) -> TextBundle:
    """GLUE SST-2 from `folder` (holding train.tsv and dev.tsv, e.g. shared/data/sst2).

    train.tsv (67,349 phrases and sentences) gives train and validation; dev.tsv
    (872 sentences) is the test split, since GLUE keeps its test labels hidden.
    Classes: 0 negative, 1 positive. Texts lose GLUE's trailing space.

    val_unit "sentences" (the default) holds out whole sentences, like dev.tsv, and
    drops their own phrases from train (`split_validation_by_sentence`). "rows" takes
    a random val_fraction of the rows, most of which are phrases of training sentences
    (about 88% of them occur verbatim inside a training text), so validation scores
    run high.
    """
    folder = Path(folder).expanduser()
    paths = [folder / "train.tsv", folder / "dev.tsv"]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
        raise DataError(
            f"{folder}: SST-2 needs the GLUE files train.tsv and dev.tsv; missing "
            f"{missing}, found {found if found is not None else 'no such folder'}. Point the "
            "path at the folder of GLUE's SST-2.zip (header 'sentence<TAB>label')"
        )
    full, classes = read_labelled(
        paths[0], text_column="sentence", class_names=SST2_CLASSES, format="tsv"
    )
    test, _ = read_labelled(paths[1], text_column="sentence", class_names=classes, format="tsv")
    settings: dict[str, Any] = {
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "val_unit": val_unit,
        "test_from": "dev.tsv",
    }
    if val_unit == "rows":
        train, val = split_validation(full, val_fraction, split_seed)
    elif val_unit == "sentences":
        train, val, settings["dropped_val_phrases"] = split_validation_by_sentence(
            full, val_fraction, split_seed
        )
    else:
        raise ValueError(f"val_unit must be 'rows' or 'sentences'; got {val_unit!r}")
    return TextBundle(
        train=train,
        val=val,
        test=test,
        class_names=classes,
        source="sst2",
        source_files=paths,
        settings=settings,
    )


def load_text_files(
    *,
    train: str | Path,
    test: str | Path,
    val: str | Path | None = None,
    format: TextFormat | None = None,
    text_column: str = "text",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    drop_empty: bool = False,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> TextBundle:
    """Your own labelled files: CSV, TSV or JSON Lines (format from the suffix unless given).

    Without a `val` file, validation is carved from train (`val_fraction`, seeded by
    `split_seed`); with one, nothing is carved and `val_fraction` is not used.
    """
    paths = {"train": Path(train), "test": Path(test)} | ({"val": Path(val)} if val else {})
    return _labelled_bundle(
        "files",
        {name: {"path": path, "format": format} for name, path in paths.items()},
        text_column=text_column,
        label_column=label_column,
        class_names=class_names,
        drop_empty=drop_empty,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )


def load_hf_disk(
    path: str | Path,
    *,
    train_split: str = "train",
    test_split: str = "test",
    val_split: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    drop_empty: bool = False,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> TextBundle:
    """A `datasets.DatasetDict` saved with `save_to_disk` (needs `pip install datasets`).

    A `ClassLabel` label column gives the class names, unless `class_names` is set.
    GLUE-style test splits whose labels are all -1 cannot be the test split: use the
    labelled validation split (`test_split="validation"`).
    """
    splits = {"train": train_split, "test": test_split} | ({"val": val_split} if val_split else {})
    return _labelled_bundle(
        "hf_disk",
        {name: {"path": Path(path), "format": "hf_disk", "split": s} for name, s in splits.items()},
        text_column=text_column,
        label_column=label_column,
        class_names=class_names,
        drop_empty=drop_empty,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )


def _labelled_bundle(
    source: str,
    where: dict[str, dict[str, Any]],
    *,
    text_column: str,
    label_column: str,
    class_names: Sequence[str] | None,
    drop_empty: bool,
    val_fraction: float,
    split_seed: int,
) -> TextBundle:
    columns = {"text_column": text_column, "label_column": label_column}
    tables = {
        name: _read_table(**spec, columns=[text_column, label_column])
        for name, spec in where.items()
    }
    tables = {name: _check_empty(table, text_column, drop_empty) for name, table in tables.items()}
    classes = _resolve_classes(tables["train"], label_column, class_names)
    parts = {
        name: TextSplit(table.texts, _encode_labels(table, label_column, classes))
        for name, table in tables.items()
    }
    if "val" in parts:
        train, val = parts["train"], parts["val"]
    else:
        train, val = split_validation(parts["train"], val_fraction, split_seed)
    files = list(dict.fromkeys(table.path for table in tables.values()))
    settings: dict[str, Any] = {
        **columns,
        "val_fraction": None if "val" in parts else val_fraction,
        "split_seed": None if "val" in parts else split_seed,
        "class_names_given": class_names is not None,
        "dropped_empty": {name: table.dropped for name, table in tables.items()},
    }
    if source == "hf_disk":
        settings["hf_splits"] = {name: spec["split"] for name, spec in where.items()}
    return TextBundle(
        train=train,
        val=val,
        test=parts["test"],
        class_names=classes,
        source=source,
        source_files=files,
        settings=settings,
    )


def read_labelled(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    format: TextFormat | None = None,
    split: str | None = None,
    drop_empty: bool = False,
) -> tuple[TextSplit, list[str]]:
    """One labelled file (or saved dataset split) and its class names (see the module rules)."""
    table = _read_table(Path(path), format=format, split=split, columns=[text_column, label_column])
    table = _check_empty(table, text_column, drop_empty)
    classes = _resolve_classes(table, label_column, class_names)
    return TextSplit(table.texts, _encode_labels(table, label_column, classes)), classes


def read_unlabelled(
    path: str | Path,
    *,
    text_column: str = "text",
    format: TextFormat | None = None,
    split: str | None = None,
    drop_empty: bool = False,
) -> TextSplit:
    """Transfer text without labels: a .txt file holds one example per line (blank lines
    are skipped); CSV / TSV / JSON Lines / saved datasets need `text_column` and may
    have other columns, which are ignored."""
    table = _read_table(Path(path), format=format, split=split, columns=[text_column])
    return TextSplit.unlabelled(_check_empty(table, text_column, drop_empty).texts)


# ----------------------------------------------------------------------------- readers


@dataclass
class _Table:
    """Columns read from one file: texts (stripped), raw labels, and where each row is."""

    path: Path
    texts: list[str]
    labels: list[Any] | None
    places: list[int]  # line number (files, 1-based) or row index (saved datasets, 0-based)
    unit: str  # "line" or "row"
    class_names: list[str] | None = None  # from a datasets ClassLabel feature
    dropped: int = 0

    def where(self, indices: Sequence[int]) -> str:
        shown = ", ".join(str(self.places[i]) for i in indices[:_SHOWN])
        more = f" and {len(indices) - _SHOWN} more" if len(indices) > _SHOWN else ""
        return f"{self.unit}{'s' if len(indices) > 1 else ''} {shown}{more}"


def _read_table(
    path: Path, *, format: TextFormat | None, columns: list[str], split: str | None = None
) -> _Table:
    path = path.expanduser()
    fmt = format or _infer_format(path)
    if fmt not in _FORMATS:
        raise DataError(f"{path}: format {fmt!r} is not one of {list(_FORMATS)}")
    if fmt == "hf_disk":
        return _read_hf_disk(path, split, columns)
    if split is not None:
        raise DataError(f"{path}: split {split!r} applies to saved datasets only (format hf_disk)")
    if path.is_dir():
        raise DataError(
            f"{path} is a folder; give a CSV, TSV, JSON Lines or text file, or, for a folder "
            "written by datasets' save_to_disk, use the hf_disk format"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if fmt == "txt":
            if len(columns) > 1:
                raise DataError(
                    f"{path}: a plain text file has no label column ({columns[1]!r}); use it "
                    "as unlabelled transfer text, or give labelled data as CSV, TSV or JSON Lines"
                )
            return _read_txt(path)
        if fmt == "jsonl":
            return _read_jsonl(path, columns)
        return _read_delimited(path, fmt, columns)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: byte {exc.start} is not UTF-8 text ({exc.reason}); is it a {fmt} file? "
            "Save it as UTF-8"
        ) from None


def _infer_format(path: Path) -> TextFormat:
    if path.is_dir():
        return "hf_disk"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; name the file "
            f"{', '.join(sorted(_SUFFIXES))}, or set the format to one of csv, tsv, jsonl, txt"
        )
    return fmt


def _read_txt(path: Path) -> _Table:
    texts, places = [], []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                texts.append(line.strip())
                places.append(line_no)
    return _Table(path, texts, None, places, "line")


def _read_delimited(path: Path, fmt: str, columns: list[str]) -> _Table:
    with path.open(newline="", encoding="utf-8-sig") as f:
        if fmt == "tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; expected a header row naming the columns")
            header = [name.strip() for name in header]
            _require_columns(path, fmt, header, columns, place="the header")
            at = [header.index(name) for name in columns]
            values: list[list[str]] = [[] for _ in columns]
            places = []
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(row)} fields, but the header has "
                        f"{len(header)} ({header})" + _delimiter_hint(fmt)
                    )
                for column, i in zip(values, at):
                    column.append(row[i])
                places.append(reader.line_num)
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: not valid {fmt} ({exc})") from None
    labels = [value.strip() for value in values[1]] if len(columns) > 1 else None
    return _Table(path, [text.strip() for text in values[0]], labels, places, "line")


def _delimiter_hint(fmt: str) -> str:
    if fmt == "tsv":
        return "; in a TSV file a TAB inside a text splits it (TSV has no quoting): use CSV"
    return "; quote texts that contain commas"


def _require_columns(
    path: Path, fmt: str, found: list[str], wanted: list[str], *, place: str
) -> None:
    missing = [name for name in wanted if name not in found]
    if not missing:
        return
    roles = dict(zip(wanted, ["text", "label"]))
    what = " and ".join(f"{roles[name]} column {name!r}" for name in missing)
    hint = ""
    if len(found) == 1 and fmt in ("csv", "tsv"):
        other = "\t" if fmt == "csv" else ","
        if other in found[0]:
            hint = f" The header has one column holding {other!r}: is it a {'TSV' if fmt == 'csv' else 'CSV'} file? Set the format or rename the file."
        elif found[0].lstrip().startswith(("{", "[")):
            hint = " It looks like JSON: set the format to jsonl or name the file .jsonl."
    raise DataError(
        f"{path}: no {what}; {place} has the columns {found}. Set the "
        f"{' and '.join(roles[name] + '_column' for name in missing)} to one of them.{hint}"
    )


def _read_jsonl(path: Path, columns: list[str]) -> _Table:
    values: list[list[Any]] = [[] for _ in columns]
    places = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = ""
                if line_no == 1 and line.lstrip().startswith("["):
                    hint = (
                        " The file looks like one JSON array; JSON Lines holds one object per "
                        "line. Convert it with: jq -c '.[]' in.json > out.jsonl"
                    )
                elif line_no == 1:
                    hint = " Is it a CSV or TSV file? Set the format or rename the file."
                raise DataError(
                    f"{path}, line {line_no}: not valid JSON ({exc.msg} at column {exc.colno})."
                    + hint
                ) from None
            if not isinstance(record, dict):
                hint = ""
                if isinstance(record, list) and record and isinstance(record[0], dict):
                    hint = ". The file looks like one JSON array: convert it with jq -c '.[]' in.json > out.jsonl"
                raise DataError(
                    f"{path}, line {line_no}: a JSON {type(record).__name__}, but JSON Lines "
                    f'data must hold one object per line, e.g. {{"text": "...", "label": 1}}' + hint
                )
            _require_columns(path, "jsonl", list(record), columns, place=f"line {line_no}")
            for column, name in zip(values, columns):
                column.append(record[name])
            places.append(line_no)
    table = _Table(path, [], values[1] if len(columns) > 1 else None, places, "line")
    table.texts = _as_texts(table, values[0], columns[0])
    return table


def _read_hf_disk(path: Path, split: str | None, columns: list[str]) -> _Table:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading a dataset saved with save_to_disk needs the Hugging Face "
            "`datasets` package: pip install datasets"
        ) from None
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (a dataset saved with save_to_disk)")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"{path}: datasets.load_from_disk cannot read it ({exc}); the folder must be "
            "written by Dataset.save_to_disk or DatasetDict.save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise DataError(
                f"{path} holds a DatasetDict with the splits {sorted(loaded)}; choose one "
                "(split: name)"
            )
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r}; the saved DatasetDict has the splits "
                f"{sorted(loaded)}. Set the split names (train, validation, test) to match"
            )
        dataset = loaded[split]
        place = f"split {split!r}"
    else:
        if split not in (None, "train"):
            raise DataError(
                f"{path} holds a single Dataset, not a DatasetDict with splits, so split "
                f"{split!r} does not exist; save a DatasetDict, or one folder per split"
            )
        dataset = loaded
        place = "the dataset"
    _require_columns(path, "hf_disk", list(dataset.column_names), columns, place=place)
    data = dataset.select_columns(columns).to_dict()
    table = _Table(path, [], None, list(range(len(dataset))), "row")
    table.texts = _as_texts(table, data[columns[0]], columns[0])
    if len(columns) > 1:
        table.labels = data[columns[1]]
        feature = dataset.features[columns[1]]
        if isinstance(feature, datasets.ClassLabel):
            table.class_names = list(feature.names)
    return table


def _as_texts(table: _Table, values: list[Any], column: str) -> list[str]:
    """Stripped strings; None counts as an empty text, anything else that is not a string
    is an error."""
    bad = [i for i, v in enumerate(values) if v is not None and not isinstance(v, str)]
    if bad:
        raise DataError(
            f"{table.path}: the text column {column!r} holds {type(values[bad[0]]).__name__} "
            f"values ({values[bad[0]]!r} at {table.where(bad)}); texts must be strings"
        )
    return [(v or "").strip() for v in values]


def _check_empty(table: _Table, column: str, drop_empty: bool) -> _Table:
    empty = [i for i, text in enumerate(table.texts) if not text]
    if not empty:
        return table
    if not drop_empty:
        raise DataError(
            f"{table.path}: {len(empty)} of {len(table.texts)} texts in column {column!r} are "
            f"empty or only whitespace ({table.where(empty)}). Remove those rows, or set "
            "drop_empty: true to skip them"
        )
    keep = [i for i, text in enumerate(table.texts) if text]
    return _Table(
        table.path,
        [table.texts[i] for i in keep],
        None if table.labels is None else [table.labels[i] for i in keep],
        [table.places[i] for i in keep],
        table.unit,
        table.class_names,
        dropped=len(empty),
    )


# ----------------------------------------------------------------------------- labels

_INTEGER = re.compile(r"[+-]?\d+")


def _as_int(label: Any) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str) and _INTEGER.fullmatch(label.strip()):
        return int(label)
    return None


def _check_label_types(table: _Table, column: str) -> None:
    assert table.labels is not None
    missing = [
        i for i, v in enumerate(table.labels) if v is None or (isinstance(v, str) and not v.strip())
    ]
    if missing:
        raise DataError(
            f"{table.path}: {len(missing)} of {len(table.labels)} rows have no label in column "
            f"{column!r} ({table.where(missing)}). Label them, remove them, or read the file as "
            "unlabelled transfer text"
        )
    bad = [
        i for i, v in enumerate(table.labels) if isinstance(v, bool) or not isinstance(v, int | str)
    ]
    if bad:
        value = table.labels[bad[0]]
        raise DataError(
            f"{table.path}: the label column {column!r} holds {value!r} "
            f"({type(value).__name__}) at {table.where(bad)}; labels must be integer class "
            "indices or class names (strings)"
        )


def _resolve_classes(train: _Table, column: str, class_names: Sequence[str] | None) -> list[str]:
    """The class names: given, else from a ClassLabel feature, else from the train labels."""
    _check_label_types(train, column)
    if class_names is not None:
        names = [str(name) for name in class_names]
        repeated = sorted(name for name, n in Counter(names).items() if n > 1)
        if not names or repeated:
            raise DataError(
                f"class_names must list each class once; got {names}"
                + (f" (repeated: {repeated})" if repeated else "")
            )
        return names
    if train.class_names is not None:
        return train.class_names
    assert train.labels is not None
    maybe_numbers = [_as_int(label) for label in train.labels]
    numbers = [n for n in maybe_numbers if n is not None]
    if len(numbers) == len(maybe_numbers):
        negative = [i for i, n in enumerate(numbers) if n < 0]
        if negative:
            raise DataError(
                f"{train.path}: label {numbers[negative[0]]} in column {column!r} at "
                f"{train.where(negative)} is negative; integer labels are class indices 0, 1, "
                "... (GLUE-style test splits mark a missing label with -1: use a labelled split)"
            )
        return [str(k) for k in range(max(numbers, default=-1) + 1)]
    return sorted({str(label).strip() for label in train.labels})


def _encode_labels(table: _Table, column: str, class_names: list[str]) -> torch.Tensor:
    _check_label_types(table, column)
    assert table.labels is not None
    index = {name: i for i, name in enumerate(class_names)}
    encoded, unknown = [], []
    for i, label in enumerate(table.labels):
        k = index.get(str(label).strip())
        if k is None:
            number = _as_int(label)
            k = number if number is not None and 0 <= number < len(class_names) else None
        if k is None:
            unknown.append(i)
            k = UNLABELLED
        encoded.append(k)
    if unknown:
        values = list(dict.fromkeys(repr(table.labels[i]) for i in unknown))
        hidden = any(_as_int(table.labels[i]) == -1 for i in unknown)
        raise DataError(
            f"{table.path}: {len(unknown)} labels in column {column!r} are not among the "
            f"{len(class_names)} classes {class_names}: {', '.join(values[:_SHOWN])} at "
            f"{table.where(unknown)}. Fix those labels, or set class_names to every class in "
            "order (the classes come from the training labels unless given)"
            + (
                ". Label -1 marks a hidden label (GLUE-style test splits): use a labelled "
                "split as the test split"
                if hidden
                else ""
            )
        )
    return torch.tensor(encoded, dtype=torch.int64)


# ----------------------------------------------------------------------------- tokenizers

# words with inner hyphens/apostrophes ("well-made", "n't"), clitics ("'s"), punctuation runs
_WORD = r"\w+(?:[-'’]\w+)*|'\w+|[^\w\s]+"


class VocabTokenizer:
    """A word-level vocabulary for students without a subword tokenizer (BiLSTM, TextCNN).

    Words: `\\w+` runs with inner hyphens or apostrophes ("well-made", "n't"), a
    leading-apostrophe clitic ("'s"), or a run of punctuation, lowercased when
    `lowercase`. `mask_token` ("[MASK]", as augmented transfer text writes it) is
    one word and maps to <unk>, as in Tang et al. (2019). Ids: <pad> = 0, <unk> = 1,
    then the vocabulary. A text without words encodes as [<unk>], so no sequence
    is empty.
    """

    pad_token, unk_token = "<pad>", "<unk>"
    pad_id, unk_id = 0, 1
    _FORMAT = "kdistill.VocabTokenizer/1"

    def __init__(
        self, tokens: Sequence[str], *, lowercase: bool = True, mask_token: str = "[MASK]"
    ) -> None:
        if list(tokens[:2]) != [self.pad_token, self.unk_token]:
            raise ValueError(f"a vocabulary starts with <pad>, <unk>; got {list(tokens[:2])}")
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("the vocabulary lists a token more than once")
        self.lowercase = lowercase
        self.mask_token = mask_token
        self._pattern = re.compile(f"{re.escape(mask_token)}|{_WORD}" if mask_token else _WORD)

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        *,
        min_freq: int = 1,
        max_size: int | None = None,
        lowercase: bool = True,
        mask_token: str = "[MASK]",
    ) -> VocabTokenizer:
        """The words of `texts` seen at least `min_freq` times, most frequent first (ties
        alphabetical), at most `max_size` tokens including <pad> and <unk>."""
        errors = []
        if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
            errors.append(f"'min_freq' must be an int >= 1. Got {min_freq!r} instead.")
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 2
        ):
            errors.append(f"'max_size' must be None or an int >= 2. Got {max_size!r} instead.")
        if errors:
            raise ValueError("VocabTokenizer.build: " + " ".join(errors))
        tokenizer = cls([cls.pad_token, cls.unk_token], lowercase=lowercase, mask_token=mask_token)
        counts = Counter(word for text in texts for word in tokenizer.words(text))
        counts.pop(mask_token, None)
        ranked = sorted(
            (word for word, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w)
        )
        if max_size is not None:
            ranked = ranked[: max_size - 2]
        return cls(
            [cls.pad_token, cls.unk_token, *ranked], lowercase=lowercase, mask_token=mask_token
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def words(self, text: str) -> list[str]:
        words = self._pattern.findall(text)
        if self.lowercase:
            return [w if w == self.mask_token else w.lower() for w in words]
        return words

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        return [self.index.get(word, unk) for word in self.words(text)] or [unk]

    def encode_batch(
        self, texts: Sequence[str], *, max_length: int | None = None
    ) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text, cut to `max_length`, and whether each text was cut."""
        ids = [self.encode(text) for text in texts]
        if max_length is None:
            return ids, [False] * len(ids)
        return [seq[:max_length] for seq in ids], [len(seq) > max_length for seq in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.tokens[i] for i in ids if i != self.pad_id)

    def save(self, path: str | Path) -> None:
        record = {
            "format": self._FORMAT,
            "lowercase": self.lowercase,
            "mask_token": self.mask_token,
            "tokens": self.tokens,
        }
        Path(path).write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> VocabTokenizer:
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read a vocabulary from it ({exc})") from None
        if not isinstance(record, dict) or record.get("format") != cls._FORMAT:
            raise DataError(
                f'{path} is not a vocabulary saved by VocabTokenizer.save (no "format": '
                f'"{cls._FORMAT}"); build one with VocabTokenizer.build(train_texts)'
            )
        try:
            return cls(
                record["tokens"], lowercase=record["lowercase"], mask_token=record["mask_token"]
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{path}: a broken vocabulary file ({exc!r})") from None


def _rust_tokenizer(tokenizer: Any) -> Any:
    """A private `tokenizers.Tokenizer` copy (with no padding or truncation of its own)."""
    import tokenizers

    backend = (
        tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else tokenizer.backend_tokenizer
    )
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def _default_pad_id(tokenizer: Any) -> int | None:
    if isinstance(tokenizer, VocabTokenizer):
        return tokenizer.pad_id
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.pad_token_id
    if tokenizer.padding is not None:
        return tokenizer.padding["pad_id"]
    for token in ("[PAD]", "<pad>"):
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return None


class TextCollator:
    """Texts -> (B, L) `input_ids` and `attention_mask`, L the longest text of the batch.

    tokenizer: a Hugging Face fast tokenizer (anything with `backend_tokenizer`, e.g.
    `AutoTokenizer.from_pretrained(...)`), a `tokenizers.Tokenizer`, or a
    `VocabTokenizer`. Texts are encoded with the tokenizer's special tokens ([CLS] ...
    [SEP]) and cut to `max_length` tokens, specials included. `texts_truncated` of
    `texts_seen` counts the texts that were cut, for the results.

    `tokenize(texts)` encodes a whole split once (the Rust tokenizers batch-encode in
    parallel); per step, `TokenizedTexts.batch(index)` only gathers and pads.
    `collator(texts)` does both for a list of texts.
    """

    def __init__(self, tokenizer: Any, *, max_length: int, pad_id: int | None = None) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1; got {max_length!r}")
        import tokenizers

        if isinstance(tokenizer, VocabTokenizer):
            self._rust = None
        elif isinstance(tokenizer, tokenizers.Tokenizer) or hasattr(tokenizer, "backend_tokenizer"):
            self._rust = _rust_tokenizer(tokenizer)
            self._rust.enable_truncation(max_length)
        else:
            raise TypeError(
                f"TextCollator needs a Hugging Face fast tokenizer, a tokenizers.Tokenizer or a "
                f"VocabTokenizer; got {type(tokenizer).__name__}. Slow (Python) tokenizers: load "
                "the fast one with AutoTokenizer.from_pretrained(name, use_fast=True)"
            )
        pad_id = _default_pad_id(tokenizer) if pad_id is None else pad_id
        if pad_id is None:
            raise DataError(
                f"the tokenizer ({type(tokenizer).__name__}) has no padding token; pass pad_id "
                "(any id works, the attention mask hides padding: e.g. the eos token id)"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = int(pad_id)
        self.texts_seen = 0
        self.texts_truncated = 0

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        if self._rust is None:
            ids, truncated = self.tokenizer.encode_batch(texts, max_length=self.max_length)
        else:
            encodings = self._rust.encode_batch(list(texts))
            ids = [e.ids for e in encodings]
            truncated = [bool(e.overflowing) for e in encodings]
        tokenized = TokenizedTexts.from_lists(ids, truncated, pad_id=self.pad_id)
        self.texts_seen += len(tokenized)
        self.texts_truncated += tokenized.num_truncated
        return tokenized

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokenized = self.tokenize(texts)
        return tokenized.batch(torch.arange(len(tokenized)))


@dataclass
class TokenizedTexts:
    """The token ids of a split's texts for one tokenizer, stored flat: text i is
    `token_ids[offsets[i] : offsets[i] + lengths[i]]`."""

    token_ids: torch.Tensor  # (total,) int64
    offsets: torch.Tensor  # (N,) int64
    lengths: torch.Tensor  # (N,) int64, after truncation
    truncated: torch.Tensor  # (N,) bool: the text was cut to max_length
    pad_id: int

    @classmethod
    def from_lists(
        cls, ids: Sequence[Sequence[int]], truncated: Sequence[bool], *, pad_id: int
    ) -> TokenizedTexts:
        lengths = torch.tensor([len(seq) for seq in ids], dtype=torch.int64)
        offsets = torch.cumsum(lengths, 0) - lengths
        flat = torch.tensor([i for seq in ids for i in seq], dtype=torch.int64)
        return cls(flat, offsets, lengths, torch.tensor(truncated, dtype=torch.bool), pad_id)

    def __len__(self) -> int:
        return self.lengths.shape[0]

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum())

    def ids(self, i: int) -> list[int]:
        start = int(self.offsets[i])
        return self.token_ids[start : start + int(self.lengths[i])].tolist()

    def batch(self, index: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` (B, L) int64 for the texts at `index`, padded
        with `pad_id` to L = the longest of them."""
        index = torch.as_tensor(index, dtype=torch.int64)
        lengths = self.lengths[index]  # (B,)
        width = int(lengths.max()) if len(index) else 0
        positions = torch.arange(width)  # (L,)
        mask = positions < lengths[:, None]  # (B, L)
        if width == 0:
            return {"input_ids": mask.long(), "attention_mask": mask.long()}
        gather = (self.offsets[index][:, None] + positions).clamp_(max=len(self.token_ids) - 1)
        input_ids = torch.where(mask, self.token_ids[gather], self.pad_id)  # (B, L)
        return {"input_ids": input_ids, "attention_mask": mask.long()}


def length_buckets(
    lengths: torch.Tensor | Sequence[int],
    batch_size: int,
    generator: torch.Generator,
    *,
    pool_batches: int | None = 100,
) -> list[torch.Tensor]:
    """One epoch of batches of indices, each batch of texts with similar lengths.

    1. Shuffle all indices. 2. Cut the shuffled order into pools of
    `batch_size * pool_batches` (None: one pool). 3. Sort each pool by length, stably,
    so equal lengths stay in shuffled order. 4. Cut each pool into batches of
    `batch_size` (the last batch of the last pool may be smaller). 5. Shuffle the
    order of the batches. Every index appears exactly once; the result depends only
    on `lengths`, the sizes and the generator's state.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    errors = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        errors.append(f"'batch_size' must be an int >= 1. Got {batch_size!r} instead.")
    if pool_batches is not None and (
        isinstance(pool_batches, bool) or not isinstance(pool_batches, int) or pool_batches < 1
    ):
        errors.append(f"'pool_batches' must be None or an int >= 1. Got {pool_batches!r} instead.")
    if errors:
        raise ValueError("length_buckets: " + " ".join(errors))
    n = lengths.shape[0]
    order = torch.randperm(n, generator=generator)
    pool = n if pool_batches is None else batch_size * pool_batches
    batches = []
    for start in range(0, n, max(pool, 1)):
        members = order[start : start + pool]
        members = members[torch.sort(lengths[members], stable=True).indices]
        batches.extend(members.split(batch_size))
    shuffle = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in shuffle.tolist()]
