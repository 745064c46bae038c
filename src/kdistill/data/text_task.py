"""Text classification as the training loop sees it: `TextData`.

A `TextData` holds raw texts (so teacher and student may use different tokenizers)
and gives each model its own inputs: `batch(model, split, indices)` tokenizes a
split once per tokenizer (cached) and pads a batch to its longest text. A model
says which tokenizer it reads with two attributes set when it is built:
`kdistill_tokenizer` (the tokenizer) and `kdistill_tokenizer_key` (a string that
names it, so deep copies of a model share the cache).

The distill stage may train on more text than the labelled training split: a
transfer set (a file of unlabelled text, and/or Tang et al.'s augmentation of the
training sentences), labelled by the teacher. `for_distill()` returns the data
with the transfer texts appended to train, with label -1; losses that read
labels skip those rows.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data.text import UNLABELLED, TextBundle, TextSplit
from kdistill.data.text_augment import augment_texts
from kdistill.data.text_batches import TokenizedTexts, length_buckets
from kdistill.data.text_sources import load_hf_disk, load_sst2, load_text_files, read_unlabelled
from kdistill.data.text_tokenizers import TextCollator
from kdistill.errors import DataError, ModelError
from kdistill.recipe.classification import TEXT_SOURCES as TEXT_SOURCES


@dataclass
class TextPart:
    """One split as the loop indexes it: `x` are row numbers, `y` the labels (-1: none)."""

    split: TextSplit
    name: str

    @property
    def x(self) -> torch.Tensor:
        return torch.arange(len(self.split))

    @property
    def y(self) -> torch.Tensor:
        return self.split.labels

    def __len__(self) -> int:
        return len(self.split)


@dataclass
class TextData:
    bundle: TextBundle
    max_length: int
    transfer: TextSplit | None = None
    with_transfer: bool = False
    bucket_batches: int | None = 100
    _tokenized: dict[tuple[str, str, bool], TokenizedTexts] = field(default_factory=dict)

    is_image = False
    is_text = True

    @functools.cached_property
    def train(self) -> TextPart:
        """The training texts, with the transfer texts after them in a distill stage's
        data; built once (the training loop reads it for every batch)."""
        split = self.bundle.train
        if self.with_transfer and self.transfer is not None:
            split = TextSplit.concat([split, self.transfer])
        return TextPart(split, "train")

    @property
    def val(self) -> TextPart:
        return TextPart(self.bundle.val, "val")

    @property
    def test(self) -> TextPart:
        return TextPart(self.bundle.test, "test")

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.bundle.class_names

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.bundle.fingerprint().encode())
        h.update(f"max_length={self.max_length}".encode())
        if self.with_transfer and self.transfer is not None:
            for text in self.transfer.texts:
                h.update(text.encode() + b"\0")
        return h.hexdigest()

    @property
    def source_files(self) -> list[Path]:
        return self.bundle.source_files

    def for_distill(self) -> TextData:
        """The data of stages that learn from a teacher: train plus the transfer texts."""
        if self.transfer is None:
            return self
        return TextData(
            self.bundle, self.max_length, self.transfer, True, self.bucket_batches, self._tokenized
        )

    # ----------------------------------------------------------------- model inputs

    def tokenized(self, model: nn.Module, split: str) -> TokenizedTexts:
        tokenizer, key = _tokenizer_of(model)
        cache_key = (key, split, self.with_transfer and split == "train")
        if cache_key not in self._tokenized:
            part: TextPart = getattr(self, split)
            collator = TextCollator(tokenizer, max_length=self.max_length)
            self._tokenized[cache_key] = collator.tokenize(part.split.texts)
        return self._tokenized[cache_key]

    def batch(self, model: nn.Module, split: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.tokenized(model, split).batch(index)

    def train_order(
        self, model: nn.Module, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """One epoch's order of training rows, read by the loop `batch_size` at a time.

        With `bucket_batches` set, each consecutive `batch_size` rows hold texts of
        similar length (by `model`'s tokenization; `length_buckets` with pools of that
        many batches), so padding, and time per step, shrink. The one short batch goes
        last, where the loop drops it. None: a plain random permutation.
        """
        n = len(self.train)
        if self.bucket_batches is None:
            return torch.randperm(n, generator=generator)
        lengths = self.tokenized(model, "train").lengths
        batches = length_buckets(lengths, batch_size, generator, pool_batches=self.bucket_batches)
        full = [b for b in batches if len(b) == batch_size]
        return torch.cat(full + [b for b in batches if len(b) < batch_size])

    def eval_feed(
        self, model: nn.Module, split: str
    ) -> tuple[torch.Tensor, Callable[[Any], Any], torch.Tensor]:
        """(rows, to_input, order) for `evaluate.predict`: rows are indices, batched by
        `to_input`, run shortest text first so each batch pads little."""
        tokenized = self.tokenized(model, split)
        order = torch.sort(tokenized.lengths, stable=True).indices
        return getattr(self, split).x, lambda rows: tokenized.batch(rows), order

    def truncated(self, model: nn.Module) -> dict[str, int]:
        """How many texts of each split were cut to max_length for this model's tokenizer."""
        return {s: self.tokenized(model, s).num_truncated for s in ("train", "val", "test")}

    def example_input(self, model: nn.Module, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Real test sentences, for latency: the first `batch_size` of them."""
        n = min(batch_size, len(self.test))
        return self.batch(model, "test", torch.arange(n))


def _tokenizer_of(model: nn.Module) -> tuple[Any, str]:
    tokenizer = getattr(model, "kdistill_tokenizer", None)
    key = getattr(model, "kdistill_tokenizer_key", None)
    if tokenizer is None or key is None:
        raise ModelError(
            f"{type(model).__name__} has no tokenizer: text models are built by kdistill "
            "(hf, hf_student, bilstm, textcnn) or carry `kdistill_tokenizer` and "
            "`kdistill_tokenizer_key` attributes"
        )
    return tokenizer, key


def load_text_data(cfg: Any, root: Path) -> TextData:
    """A text dataset from the recipe's `data` section (source sst2, text_files or hf_disk)."""
    path = Path(cfg.path) if cfg.path else None
    if path is not None and not path.is_absolute():
        path = root / path
    if cfg.source == "sst2":
        folder = path or root / "sst2"
        if not (folder / "train.tsv").is_file():
            raise DataError(
                f"SST-2 not found: {folder / 'train.tsv'} does not exist. Point KDISTILL_DATA "
                "(or --data-dir) at the folder holding sst2/train.tsv and sst2/dev.tsv, or set "
                "data.path to the sst2 folder"
            )
        bundle = load_sst2(
            folder,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            val_unit=cfg.text.val_unit,
        )
    elif cfg.source == "text_files":
        if path is None:
            raise DataError("data.path: name the folder holding train and test files")
        bundle = load_text_files(
            train=_one_file(path, "train"),
            test=_one_file(path, "test"),
            text_column=cfg.text.text_column,
            label_column=cfg.label_column,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            drop_empty=cfg.text.drop_empty,
        )
    else:
        if path is None:
            raise DataError("data.path: name the folder a `datasets` dataset was saved to")
        bundle = load_hf_disk(
            path,
            text_column=cfg.text.text_column,
            label_column=cfg.label_column,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            drop_empty=cfg.text.drop_empty,
        )
    if cfg.limit_train is not None:
        bundle.train = bundle.train.subset(slice(0, cfg.limit_train))
    if cfg.limit_val is not None:
        bundle.val = bundle.val.subset(slice(0, cfg.limit_val))
    if cfg.limit_test is not None:
        bundle.test = bundle.test.subset(slice(0, cfg.limit_test))
    return TextData(
        bundle,
        cfg.text.max_length,
        _transfer(cfg, root, bundle),
        bucket_batches=cfg.text.bucket_batches,
    )


def _one_file(folder: Path, stem: str) -> Path:
    found = sorted(p for p in folder.glob(f"{stem}.*") if p.suffix in (".csv", ".tsv", ".jsonl"))
    if not found:
        raise DataError(
            f"{folder}: no {stem}.csv, {stem}.tsv or {stem}.jsonl; files found: "
            + (", ".join(sorted(p.name for p in folder.iterdir())) or "none")
        )
    return found[0]


def _transfer(cfg: Any, root: Path, bundle: TextBundle) -> TextSplit | None:
    transfer = cfg.text.transfer
    if transfer is None:
        return None
    parts: list[TextSplit] = []
    if transfer.file is not None:
        file = Path(transfer.file)
        parts.append(
            read_unlabelled(
                file if file.is_absolute() else root / file,
                text_column=cfg.text.text_column,
                drop_empty=True,
            )
        )
    if transfer.augment is not None:
        settings = transfer.augment
        augmented = augment_texts(
            bundle.train.texts,
            n_iter=settings.n_iter,
            p_mask=settings.p_mask,
            p_pos=settings.p_pos,
            p_ng=settings.p_ng,
            per_example=settings.per_example,
            max_total=settings.max_total,
            seed=cfg.split_seed,
        )
        parts.append(augmented.as_split())
    split = TextSplit.concat(parts)
    split.labels.fill_(UNLABELLED)
    return split
