"""TextData: the training order by length buckets, and a distill stage's transfer texts."""

from __future__ import annotations

import torch

from kdistill.data.text import UNLABELLED, TextBundle, TextSplit
from kdistill.data.text_task import TextData
from kdistill.data.text_tokenizers import VocabTokenizer


def _toy_text_data(n: int, bucket_batches: int | None):
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (n,), generator=rng).tolist()
    texts = [" ".join(f"w{j}" for j in range(k)) for k in lengths]
    split = TextSplit(texts, torch.zeros(n, dtype=torch.int64))
    small = split.subset(slice(0, 4))
    bundle = TextBundle(split, small, small, ["a", "b"], "files", [])
    tokenizer = VocabTokenizer.build(texts)
    model = torch.nn.Module()
    model.kdistill_tokenizer = tokenizer
    model.kdistill_tokenizer_key = "toy"
    return TextData(bundle, 64, bucket_batches=bucket_batches), model


def test_train_order_buckets_lengths_and_keeps_every_row() -> None:
    data, model = _toy_text_data(1000, bucket_batches=10)
    order = data.train_order(model, 32, torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == list(range(1000))
    lengths = data.tokenized(model, "train").lengths
    full = order[: 1000 // 32 * 32].view(-1, 32)  # the batches the loop reads
    bucketed = (lengths[full].max(1).values - lengths[full].min(1).values).float().mean()
    data.bucket_batches = None  # same data, plain shuffling
    shuffled = data.train_order(model, 32, torch.Generator().manual_seed(3))
    assert sorted(shuffled.tolist()) == list(range(1000))
    mixed = shuffled[: 1000 // 32 * 32].view(-1, 32)
    spread = (lengths[mixed].max(1).values - lengths[mixed].min(1).values).float().mean()
    assert bucketed < 0.25 * spread  # similar lengths inside each batch
    # padding per batch, what the bucketing is for
    assert lengths[full].max(1).values.sum() < 0.8 * lengths[mixed].max(1).values.sum()


def test_train_order_is_deterministic_per_generator_seed() -> None:
    data, model = _toy_text_data(300, bucket_batches=4)
    a = data.train_order(model, 16, torch.Generator().manual_seed(5))
    b = data.train_order(model, 16, torch.Generator().manual_seed(5))
    c = data.train_order(model, 16, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_distill_data_puts_transfer_texts_after_train_and_builds_them_once() -> None:
    """A distill stage's training texts are the labelled ones then the transfer ones
    (unlabelled); the concatenation is built once, not for every batch the loop reads."""
    data, model = _toy_text_data(50, bucket_batches=None)
    transfer = TextSplit.unlabelled(["w1 w2 w3", "w4"])
    plain = TextData(data.bundle, 64, transfer)
    distill = plain.for_distill()
    assert len(plain.train) == 50 and len(distill.train) == 52
    assert distill.train is distill.train  # cached
    assert distill.train.split.texts[50:] == ["w1 w2 w3", "w4"]
    assert distill.train.split.labels[50:].tolist() == [UNLABELLED, UNLABELLED]
    # the tokenization follows the rows: the transfer texts' token counts come last
    lengths = distill.tokenized(model, "train").lengths
    assert lengths[50:].tolist() == [3, 1]
    assert len(plain.tokenized(model, "train").lengths) == 50
