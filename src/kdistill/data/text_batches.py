"""A split's token ids and the batches drawn from them.

`TokenizedTexts` stores the token ids of a split's texts for one tokenizer, flat,
and pads a batch to its longest text. `length_buckets` draws an epoch of batches of
similar-length texts, so little of a batch is padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
