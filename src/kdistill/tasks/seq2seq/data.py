"""Parallel text for sequence-to-sequence distillation: reading the pairs, the subword
tokenizers, and the padded batches the training steps read.

A split is read from (first match):
    <data.path>/<name>.tsv[.gz]      source <TAB> target, one pair a line
    <data.path>/<name>.jsonl[.gz]    {"<source_field>": ..., "<target_field>": ...} a line
    <data.path>/<name>/              a Hugging Face dataset saved with save_to_disk: columns
                                     source_field and target_field, or one `translation`
                                     column of {lang: text} (the hub's translation layout)
    <data.path>/<name>.<lang>[.gz]   one file per language, line i of each a pair
`name` may also be a path of its own (absolute, or relative to the current folder).

A source becomes its tokens + </s>, cut to data.max_source_length (the cut ones are
counted per split and reported); a target becomes tokens + </s>, cut to
max_target_length. The decoder reads [<pad>] + target[:-1] (the start token is the pad
token, as Marian and T5 do) and predicts the target; padding counts for nothing (-100).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import Tensor

from kdistill.data.lm_text import load_tokenizer, save_tokenizer, tokenizer_fingerprint
from kdistill.data.paths import DATA_ENV_VAR, candidates, resolve_data_root
from kdistill.errors import DataError
from kdistill.recipe.seq2seq import Seq2SeqDataConfig, Seq2SeqTokenizerConfig

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 of a trained tokenizer
SPLITS = ("train", "val", "test")
_SHOWN = 5


@dataclass(frozen=True)
class TextPairs:
    """One split as text: sources, targets, and where they came from."""

    sources: list[str]
    targets: list[str]
    origin: str

    def __len__(self) -> int:
        return len(self.sources)


@dataclass(frozen=True)
class Tokenizers:
    """The source side's and the target side's tokenizer (one object when joint), and
    their special ids."""

    source: Tokenizer
    target: Tokenizer

    @property
    def joint(self) -> bool:
        return self.source is self.target or self.fingerprint("source") == self.fingerprint(
            "target"
        )

    def fingerprint(self, side: str) -> str:
        return tokenizer_fingerprint(self.source if side == "source" else self.target)

    @property
    def key(self) -> str:
        """What two models must share to compare token distributions."""
        return f"{self.fingerprint('source')}/{self.fingerprint('target')}"

    def special(self, name: str, side: str = "target") -> int:
        tokenizer = self.source if side == "source" else self.target
        found = tokenizer.token_to_id(name)
        if found is None:
            raise DataError(
                f"the {side} tokenizer has no {name} token; kdistill's translation models need "
                f"{', '.join(SPECIAL_TOKENS)} (train the tokenizer with data.tokenizer.vocab_size, "
                "or add them to yours)"
            )
        return int(found)

    def decode(self, ids: Sequence[int]) -> str:
        return self.target.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: Path) -> None:
        if self.joint:
            save_tokenizer(self.source, folder)
        else:
            save_tokenizer(self.source, folder / "source")
            save_tokenizer(self.target, folder / "target")


@dataclass
class Pairs:
    """One split as token ids: sources and targets, each ending in </s>."""

    sources: list[Tensor]
    targets: list[Tensor]
    text: TextPairs
    cut_sources: int = 0
    cut_targets: int = 0
    target_lengths: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.target_lengths = torch.tensor([len(t) for t in self.targets], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.sources)

    def with_targets(self, targets: list[Tensor], texts: list[str]) -> Pairs:
        """The same sources with other targets (the teacher's translations)."""
        return Pairs(list(self.sources), targets, TextPairs(self.text.sources, texts, "teacher"))

    def __add__(self, other: Pairs) -> Pairs:
        text = TextPairs(
            self.text.sources + other.text.sources,
            self.text.targets + other.text.targets,
            f"{self.text.origin} + {other.text.origin}",
        )
        return Pairs(self.sources + other.sources, self.targets + other.targets, text)


@dataclass
class Seq2SeqData:
    """The run's splits as token ids and the tokenizers that made them."""

    train: Pairs
    val: Pairs
    test: Pairs
    tokenizers: Tokenizers
    section: Seq2SeqDataConfig
    source: str

    def split(self, name: str) -> Pairs:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def pad_id(self) -> int:
        return self.tokenizers.special("<pad>")

    @property
    def eos_id(self) -> int:
        return self.tokenizers.special("</s>")

    def info(self) -> dict[str, Any]:
        """What results.json says about the data: sizes and the cut sentences."""
        return {
            "pairs": {s: len(self.split(s)) for s in SPLITS},
            "cut_sources": {s: self.split(s).cut_sources for s in SPLITS},
            "cut_targets": {s: self.split(s).cut_targets for s in SPLITS},
            "source_vocab": self.tokenizers.source.get_vocab_size(),
            "target_vocab": self.tokenizers.target.get_vocab_size(),
            "joint_vocabulary": self.tokenizers.joint,
        }


# ------------------------------------------------------------------------------ reading


def read_split(section: Seq2SeqDataConfig, name: str, data_dir: Any = None) -> TextPairs:
    """A split's pairs as text (the layouts of the module docstring), each pair checked:
    both sides non-empty."""
    root, searched = resolve_data_root(data_dir)
    folders = [Path(p) for p in candidates(section.path, root)]
    folder = next((f for f in folders if f.is_dir()), None)
    src, tgt = section.source_lang, section.target_lang
    tried: list[Path] = []
    own = Path(name).expanduser()
    bases = ([own] if own.is_absolute() or own.exists() else []) + (
        [folder / name] if folder is not None else []
    )
    for base in bases:
        for suffix in (".tsv", ".tsv.gz", ".jsonl", ".jsonl.gz"):
            path = _with_suffix(base, suffix)
            tried.append(path)
            if path.is_file():
                if ".tsv" in suffix:
                    return _tsv(path)
                return _jsonl(path, section.source_field or src, section.target_field or tgt)
        if base.is_dir():
            return _saved_dataset(base, section, src, tgt)
        src_file, tgt_file = _side(base, src), _side(base, tgt)
        tried += [_with_suffix(base, f".{src}"), _with_suffix(base, f".{tgt}")]
        if src_file is not None and tgt_file is not None:
            return _line_files(src_file, tgt_file)
        if (src_file is None) != (tgt_file is None):
            have, lacking = (src_file, tgt) if src_file is not None else (tgt_file, src)
            raise DataError(
                f"data: split {name!r} has {have} but no {lacking} side "
                f"({_with_suffix(base, '.' + lacking)}[.gz]); a file pair needs both languages"
            )
    where = (
        f"data.path {section.path!r} resolved to {folder}"
        if folder is not None
        else f"data.path {section.path!r} is not a folder (tried "
        + ", ".join(str(p) for p in folders or searched)
        + f"; relative paths resolve against the current folder, then --data-dir or ${DATA_ENV_VAR})"
    )
    looked = f"; looked for {', '.join(str(p) for p in tried[:8])}" if tried else ""
    raise DataError(
        f"data: no split {name!r}: {where}{looked}. Give a file pair <name>.<lang>[.gz], a "
        ".tsv or .jsonl file, or a saved dataset"
    )


def _with_suffix(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)


def _side(base: Path, lang: str) -> Path | None:
    for suffix in (f".{lang}", f".{lang}.gz"):
        path = _with_suffix(base, suffix)
        if path.is_file():
            return path
    return None


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.rstrip("\r") for line in lines]


def _line_files(source: Path, target: Path) -> TextPairs:
    sources, targets = _lines(source), _lines(target)
    if len(sources) != len(targets):
        raise DataError(
            f"{source} has {len(sources)} lines and {target} has {len(targets)}; line i of each "
            "must be a translation pair. Check that both files are the same split of the same "
            "corpus (a missing or extra line shifts every pair after it)"
        )
    return _checked(sources, targets, f"{source} + {target}", lambda i: f"line {i + 1}")


def _tsv(path: Path) -> TextPairs:
    sources, targets, bad = [], [], []
    for i, line in enumerate(_lines(path)):
        parts = line.split("\t")
        if len(parts) != 2:
            bad.append(f"line {i + 1} has {len(parts)} tab-separated fields")
            continue
        sources.append(parts[0])
        targets.append(parts[1])
    if bad:
        raise DataError(
            f"{path}: each line must be source<TAB>target; "
            + "; ".join(bad[:_SHOWN])
            + (f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
        )
    return _checked(sources, targets, str(path), lambda i: f"line {i + 1}")


def _jsonl(path: Path, source_field: str, target_field: str) -> TextPairs:
    sources, targets, bad, numbers = [], [], [], []
    for i, line in enumerate(_lines(path)):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"line {i + 1} is not JSON ({exc.msg})")
            continue
        pair = _pair_of(record, source_field, target_field)
        if isinstance(pair, str):
            bad.append(f"line {i + 1} {pair}")
            continue
        sources.append(pair[0])
        targets.append(pair[1])
        numbers.append(i + 1)
    if bad:
        raise DataError(
            f"{path}: "
            + "; ".join(bad[:_SHOWN])
            + (f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
            + " (set data.source_field and data.target_field to the fields holding the texts)"
        )
    return _checked(sources, targets, str(path), lambda i: f"line {numbers[i]}")


def _pair_of(record: Any, source_field: str, target_field: str) -> tuple[str, str] | str:
    if isinstance(record, dict) and isinstance(record.get("translation"), dict):
        record = record["translation"]
    if not isinstance(record, dict):
        return "is not a JSON object"
    missing = [f for f in (source_field, target_field) if f not in record]
    if missing:
        return f"has no field {', '.join(repr(f) for f in missing)} (it has {', '.join(record)})"
    values = record[source_field], record[target_field]
    if not all(isinstance(v, str) for v in values):
        return "has a source or target that is not a string"
    return values


def _saved_dataset(folder: Path, section: Seq2SeqDataConfig, src: str, tgt: str) -> TextPairs:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{folder} is a folder, read as a Hugging Face dataset saved to disk, and the "
            "datasets package is not installed: pip install 'kdistill[datasets]'"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"{folder}: not a dataset saved with save_to_disk ({exc}); give a file pair, a .tsv "
            "or a .jsonl file instead"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(
            f"{folder} holds a DatasetDict ({', '.join(dataset)}); name one split's folder, "
            f"e.g. data.train: {folder.name}/{next(iter(dataset))}"
        )
    source_field, target_field = section.source_field or src, section.target_field or tgt
    sources, targets = [], []
    for i, record in enumerate(dataset):
        pair = _pair_of(record, source_field, target_field)
        if isinstance(pair, str):
            raise DataError(
                f"{folder}: row {i} {pair}; set data.source_field and data.target_field"
            )
        sources.append(pair[0])
        targets.append(pair[1])
    return _checked(sources, targets, str(folder), lambda i: f"row {i}")


def _checked(sources: list[str], targets: list[str], origin: str, where: Any) -> TextPairs:
    empty = [
        f"{where(i)} ({'both sides' if not s.strip() and not t.strip() else 'source' if not s.strip() else 'target'})"
        for i, (s, t) in enumerate(zip(sources, targets))
        if not s.strip() or not t.strip()
    ]
    if empty:
        raise DataError(
            f"{origin}: {len(empty)} pair(s) with an empty side: {', '.join(empty[:_SHOWN])}"
            + (f" and {len(empty) - _SHOWN} more" if len(empty) > _SHOWN else "")
            + ". A pair needs text on both sides; remove those lines from both files"
        )
    if not sources:
        raise DataError(f"{origin}: no pairs")
    return TextPairs(sources, targets, origin)


# ----------------------------------------------------------------------------- tokenizers


def train_tokenizer(texts: Sequence[str], config: Seq2SeqTokenizerConfig) -> Tokenizer:
    """A subword tokenizer (SentencePiece-style: NFKC, ▁ marks a word's start, so decoding
    gives the text back) trained on `texts`, special tokens <pad> </s> <unk> first."""
    assert config.vocab_size is not None
    tokenizer = Tokenizer(
        models.Unigram() if config.kind == "unigram" else models.BPE(unk_token="<unk>")
    )
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer: Any
    if config.kind == "unigram":
        trainer = trainers.UnigramTrainer(
            vocab_size=config.vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            unk_token="<unk>",
            show_progress=False,
        )
    else:
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
    tokenizer.train_from_iterator(list(texts), trainer)
    return tokenizer


def make_tokenizers(
    config: Seq2SeqTokenizerConfig,
    train: TextPairs,
    folder: Path | None,
    *,
    may_train: bool = True,
) -> Tokenizers:
    """The run's tokenizers: loaded from data.tokenizer.path, read back from the run
    folder (a resumed run, another process), or trained on the training pairs and
    saved there."""
    if config.path is not None:
        return load_tokenizers(config.path, where="data.tokenizer.path")
    if folder is not None and (
        (folder / "tokenizer.json").is_file() or (folder / "source").is_dir()
    ):
        return load_tokenizers(folder, where=str(folder))
    if not may_train:
        raise DataError(f"no tokenizer in {folder}: the main process writes it first")
    if config.joint:
        joint = train_tokenizer(train.sources + train.targets, config)
        made = Tokenizers(joint, joint)
    else:
        made = Tokenizers(
            train_tokenizer(train.sources, config), train_tokenizer(train.targets, config)
        )
    if folder is not None:
        made.save(folder)
        # what a resumed run or another process reads back: a trained tokenizer and the
        # same one loaded from its JSON need not serialise alike, and caches key on it
        return load_tokenizers(folder, where=str(folder))
    return made


def load_tokenizers(location: str | Path, *, where: str) -> Tokenizers:
    """One tokenizer for both sides (a tokenizer.json or a folder holding one), or a
    folder with source/ and target/ ones."""
    path = Path(location).expanduser()
    if (path / "source").is_dir() and (path / "target").is_dir():
        return Tokenizers(load_tokenizer(path / "source"), load_tokenizer(path / "target"))
    try:
        joint = load_tokenizer(location)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    return Tokenizers(joint, joint)


# ------------------------------------------------------------------------------- tokens


def encode_pairs(text: TextPairs, tokenizers: Tokenizers, section: Seq2SeqDataConfig) -> Pairs:
    """Token ids of each pair (+ </s>), cut to the recipe's maximum lengths."""
    eos = tokenizers.special("</s>")
    sources, cut_sources = _encode(tokenizers.source, text.sources, section.max_source_length, eos)
    targets, cut_targets = _encode(tokenizers.target, text.targets, section.max_target_length, eos)
    return Pairs(sources, targets, text, cut_sources=cut_sources, cut_targets=cut_targets)


def encode_targets(
    tokenizer: Tokenizer, texts: Sequence[str], limit: int, eos: int
) -> list[Tensor]:
    return _encode(tokenizer, texts, limit, eos)[0]


def _encode(
    tokenizer: Tokenizer, texts: Sequence[str], limit: int, eos: int
) -> tuple[list[Tensor], int]:
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_truncation()
    plain.no_padding()
    out, cut = [], 0
    for encoding in plain.encode_batch(list(texts), add_special_tokens=False):
        ids = encoding.ids
        if len(ids) > limit - 1:
            ids, cut = ids[: limit - 1], cut + 1
        out.append(torch.tensor([*ids, eos], dtype=torch.long))
    return out, cut


def pad(rows: Sequence[Tensor], value: int) -> Tensor:
    """Rows of different lengths as one (B, L) tensor, `value` after each row's end."""
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=value)


def batch(pairs: Pairs, rows: Tensor, *, pad_id: int, start_id: int) -> dict[str, Tensor]:
    """The model inputs of `rows`: padded sources and their mask, the decoder's inputs
    ([start] + target[:-1]) and mask, and the labels (the target, -100 on padding)."""
    index = rows.tolist()
    sources = pad([pairs.sources[i] for i in index], pad_id)
    targets = [pairs.targets[i] for i in index]
    labels = pad(targets, IGNORE_INDEX)
    decoder = pad([torch.cat([torch.tensor([start_id]), t[:-1]]) for t in targets], pad_id)
    return {
        "input_ids": sources,
        "attention_mask": (sources != pad_id).long() if pad_id >= 0 else torch.ones_like(sources),
        "decoder_input_ids": decoder,
        "decoder_attention_mask": (labels != IGNORE_INDEX).long(),
        "labels": labels,
    }


def bucketed_order(
    lengths: Tensor, generator: torch.Generator, batch_size: int, *, pool: int = 50
) -> Tensor:
    """An epoch's order of rows: shuffled, then sorted by length within pools of
    `pool` batches, cut into batches, and the batches shuffled; batches hold sentences
    of similar length (little padding) and the order still changes every epoch."""
    order = torch.randperm(len(lengths), generator=generator)
    span = batch_size * pool
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(torch.split(chunk, batch_size))
    full = [b for b in batches if len(b) == batch_size]
    rest = [b for b in batches if len(b) != batch_size]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return torch.cat(shuffled + rest) if shuffled or rest else order


# --------------------------------------------------------------------------------- load


def load_seq2seq(
    section: Seq2SeqDataConfig,
    data_dir: Any = None,
    *,
    tokenizer_dir: Path | None = None,
    may_train_tokenizer: bool = True,
) -> Seq2SeqData:
    """Read the splits, make (or load) the tokenizers, and encode every pair."""
    texts: dict[str, TextPairs] = {}
    limits = {"train": section.limit_train, "val": section.limit_val, "test": section.limit_test}
    for split in SPLITS:
        name = getattr(section, split)
        if name is None:
            texts[split] = TextPairs([], [], "none")
            continue
        pairs = read_split(section, name, data_dir)
        limit = limits[split]
        if limit is not None:
            pairs = TextPairs(pairs.sources[:limit], pairs.targets[:limit], pairs.origin)
        texts[split] = pairs
    tokenizers = make_tokenizers(
        section.tokenizer, texts["train"], tokenizer_dir, may_train=may_train_tokenizer
    )
    for side in ("source", "target"):
        tokenizers.special("</s>", side)
        tokenizers.special("<pad>", side)
    encoded = {s: encode_pairs(texts[s], tokenizers, section) for s in SPLITS}
    return Seq2SeqData(
        encoded["train"], encoded["val"], encoded["test"], tokenizers, section,
        source=texts["train"].origin,
    )  # fmt: skip


def texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\x1e")
    return digest.hexdigest()
