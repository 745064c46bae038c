"""Tokenizers for text classification: each model's texts to token ids.

Teacher and student may read the same texts with different tokenizers: a Hugging
Face fast tokenizer, a `tokenizers.Tokenizer`, or `VocabTokenizer`, a word-level
vocabulary built from the training texts for students without a subword
tokenizer (BiLSTM, TextCNN). `TextCollator(tokenizer, max_length=...)` encodes a
split once into `TokenizedTexts` (`text_batches`); a training step then only
gathers and pads a batch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdistill.data.text_batches import TokenizedTexts
from kdistill.errors import DataError

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
