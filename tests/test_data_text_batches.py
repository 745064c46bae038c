"""Tokenized texts and their batches: padding against a naive reference, length buckets."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import naive_pad

from kdistill.data.text_batches import TokenizedTexts, length_buckets


def test_tokenized_batch_matchesnaive_padding() -> None:
    g = torch.Generator().manual_seed(0)
    sequences = [
        torch.randint(2, 100, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 30, (200,), generator=g)
    ]
    tokenized = TokenizedTexts.from_lists(sequences, [False] * 200, pad_id=7)
    for _ in range(5):
        index = torch.randint(0, 200, (17,), generator=g)
        batch = tokenized.batch(index)
        ids, mask = naive_pad([sequences[i] for i in index.tolist()], pad_id=7)
        assert batch["input_ids"].tolist() == ids and batch["attention_mask"].tolist() == mask
    assert tokenized.ids(5) == sequences[5]


def test_length_buckets_cover_every_index_once() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (1003,), generator=g)
    for pool_batches in (None, 1, 4, 100):
        batches = length_buckets(
            lengths, 32, torch.Generator().manual_seed(1), pool_batches=pool_batches
        )
        flat = torch.cat(batches)
        assert sorted(flat.tolist()) == list(range(1003))
        assert sorted(len(b) for b in batches)[1:] == [32] * (len(batches) - 1)
        again = length_buckets(
            lengths, 32, torch.Generator().manual_seed(1), pool_batches=pool_batches
        )
        assert all(torch.equal(a, b) for a, b in zip(batches, again))
    # one pool: batches are consecutive runs of the sorted lengths
    batches = length_buckets(lengths, 32, torch.Generator().manual_seed(1), pool_batches=None)
    ranges = sorted((int(lengths[b].min()), int(lengths[b].max())) for b in batches)
    assert all(high <= next_low for (_, high), (next_low, _) in itertools.pairwise(ranges))
    other = length_buckets(lengths, 32, torch.Generator().manual_seed(2), pool_batches=None)
    assert [b.tolist() for b in other] != [b.tolist() for b in batches]
    # grouping pays: far less padding than random batches
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    random_padded = sum(
        int(lengths[b].max()) * len(b) for b in torch.randperm(1003, generator=g).split(32)
    )
    assert padded < 0.7 * random_padded
    with pytest.raises(ValueError, match=r"batch_size.*pool_batches"):
        length_buckets(lengths, 0, g, pool_batches=0)
