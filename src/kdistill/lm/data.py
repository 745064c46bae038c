"""A recipe's corpus as packed token sequences: read, split by position, tokenize, pack.

The tokenizer is trained on the training text (or loaded) once per run and kept in
`<run>/tokenizer/tokenizer.json`, with `trained_on.json` saying from what; a resumed
run and `kdistill cache` load it, so every stage sees the same token ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from kdistill.checkpoint import atomic_write_json
from kdistill.data.lm_text import (
    TOKENIZER_FILE,
    count_characters,
    dataset_fingerprint,
    encode_text,
    load_tokenizer,
    pack,
    read_corpus,
    save_tokenizer,
    split_corpus,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from kdistill.data.paths import DATA_ENV_VAR, resolve_data_root
from kdistill.errors import DataError
from kdistill.lm.models import EOS_TOKEN, CausalLM, build_causal_lm
from kdistill.lm.recipe import LMDataConfig, LMModelSpec

TRAINED_ON = "trained_on.json"


@dataclass
class LMData:
    """Packed sequences: row i is seq_len + 1 tokens; inputs = row[:-1], labels = row[1:]."""

    tokenizer: Tokenizer
    train: torch.Tensor  # (N, seq_len + 1) int64
    val: torch.Tensor  # (M, seq_len + 1) int64
    seq_len: int
    val_characters: int  # characters the val labels decode to (the bpc denominator)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.token_to_id(EOS_TOKEN)

    @property
    def tokenizer_fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    def build_model(self, spec: LMModelSpec, where: str) -> CausalLM:
        """The model of `spec` for this data: its vocabulary, sequence length and
        end-of-text id (`kdistill.lm.models.build_causal_lm`)."""
        return build_causal_lm(
            spec, vocab_size=self.vocab_size, seq_len=self.seq_len, eos_id=self.eos_id, where=where
        )

    @property
    def fingerprint(self) -> str:
        """Of the training sequences: what a teacher cache was computed on."""
        return dataset_fingerprint(
            self.train, seq_len=self.seq_len, tokenizer_fingerprint=self.tokenizer_fingerprint
        )


def corpus_paths(cfg: LMDataConfig, data_dir: str | Path | None) -> list[Path]:
    """Each corpus file: absolute as is; relative against the current folder, else the data
    folder. Every missing file is named in one error."""
    return data_files(cfg.corpus, data_dir, where="data.corpus")


def data_files(names: list[str], data_dir: str | Path | None, *, where: str) -> list[Path]:
    """Files named in a recipe (at YAML path `where`): absolute as is; relative against the
    current folder, else the data folder. Every missing file is named in one error."""
    root, searched = resolve_data_root(data_dir)
    found, missing = [], []
    for text in names:
        given = Path(text).expanduser()
        tried = [given] if given.is_absolute() else [Path.cwd() / given]
        if not given.is_absolute() and root is not None:
            tried.append(root / given)
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            missing.append(f"{text} (tried {', '.join(str(p) for p in tried)})")
        else:
            found.append(hit)
    if missing:
        raise DataError(
            f"{where}: {len(missing)} file(s) not found: {'; '.join(missing)}. Relative "
            f"paths resolve against the current folder, then the data folder ({searched[0]}; "
            f"set it with --data-dir or ${DATA_ENV_VAR})"
        )
    return found


def build_lm_data(
    cfg: LMDataConfig,
    *,
    data_dir: str | Path | None,
    tokenizer_dir: Path,
    may_train_tokenizer: bool = True,
    tokenizer: Tokenizer | None = None,
) -> LMData:
    """Read, split, tokenize and pack the corpus.

    tokenizer_dir: where the run keeps its tokenizer; one trained earlier from the same
    text and settings is reused, one from other settings is refused. With
    may_train_tokenizer=False (other processes, `kdistill cache`) it must exist there.
    tokenizer: use this one instead of data.tokenizer (the same text seen by a model with
    its own tokenizer, e.g. a pretrained teacher in sequence-level KD).
    """
    text = read_corpus(corpus_paths(cfg, data_dir), text_field=cfg.text_field)
    if cfg.limit_chars is not None:
        text = text[: cfg.limit_chars]
    train_text, val_text = split_corpus(text, cfg.val_fraction)
    if tokenizer is None:
        tokenizer = _tokenizer(cfg, train_text, tokenizer_dir, may_train=may_train_tokenizer)
    train_ids, val_ids = encode_text(tokenizer, train_text), encode_text(tokenizer, val_text)
    train = _pack(train_ids, cfg.seq_len, "training", len(train_text))
    val = _pack(val_ids, cfg.seq_len, "validation", len(val_text))
    val_characters = count_characters(tokenizer, val.sequences[:, 1:].reshape(-1))
    info = {
        "characters": {"train": len(train_text), "val": len(val_text)},
        "tokens": {"train": len(train_ids), "val": len(val_ids)},
        "sequences": {"train": len(train.sequences), "val": len(val.sequences)},
        "chars_per_token": len(train_text) / max(len(train_ids), 1),
        "vocab_size": tokenizer.get_vocab_size(),
    }
    return LMData(tokenizer, train.sequences, val.sequences, cfg.seq_len, val_characters, info)


def _pack(ids: torch.Tensor, seq_len: int, split: str, characters: int) -> Any:
    try:
        return pack(ids, seq_len)
    except DataError as exc:
        raise DataError(
            f"data: the {split} split ({characters} characters, {len(ids)} tokens) is shorter "
            f"than one sequence: {exc}"
        ) from None


def _tokenizer(cfg: LMDataConfig, train_text: str, folder: Path, *, may_train: bool) -> Tokenizer:
    settings = cfg.tokenizer
    if settings.path is not None:
        return load_tokenizer(settings.path)
    wanted = {
        "vocab_size": settings.vocab_size,
        "min_frequency": settings.min_frequency,
        "train_text_sha256": hashlib.sha256(train_text.encode("utf-8")).hexdigest(),
    }
    path, record = folder / TOKENIZER_FILE, folder / TRAINED_ON
    if path.is_file():
        try:
            stored = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored != wanted:
            raise DataError(
                f"the run's tokenizer {path} was trained from other text or settings than "
                f"data.tokenizer now asks for ({_difference(stored, wanted)}); the stages "
                "trained with it would not match. Use another --output-dir, or --overwrite"
            )
        return load_tokenizer(path)
    if not may_train:
        raise DataError(
            f"no tokenizer at {path}: the run has not trained it yet. Run the recipe first "
            "(`kdistill run`), which trains the tokenizer and the teacher"
        )
    assert settings.vocab_size is not None
    tokenizer = train_bpe_tokenizer(
        [train_text],
        settings.vocab_size,
        special_tokens=(EOS_TOKEN,),
        min_frequency=settings.min_frequency,
    )
    save_tokenizer(tokenizer, folder)
    atomic_write_json(record, wanted)
    return tokenizer


def _difference(stored: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(stored, dict):
        return f"{TRAINED_ON} is missing or unreadable"
    changed = [
        f"{key}: run {stored.get(key)!r} vs recipe {value!r}"
        for key, value in wanted.items()
        if stored.get(key) != value and key != "train_text_sha256"
    ]
    if stored.get("train_text_sha256") != wanted["train_text_sha256"]:
        changed.append("the training text differs")
    return "; ".join(changed)
