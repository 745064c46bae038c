"""`chunked_cross_entropy`: a causal language model's next-token cross-entropy from its
final hidden states and output layer, `chunk_size` tokens at a time, without the
(tokens × vocabulary) logits: each chunk's logits are recomputed in the backward pass
(activation checkpointing) instead of being kept. Labels follow the token losses'
conventions (`kdistill.losses.lm_math`): aligned, −100 where a token does not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute

from kdistill.losses.lm_chunked import CHUNK_ELEMENTS, IGNORE_INDEX


def chunked_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Σ over counted tokens of −log softmax(h Wᵀ + b)[label], in float32.

    The logits of `chunk_size` tokens exist at a time; each chunk's are recomputed in
    the backward pass (activation checkpointing) instead of being kept. Shapes: hidden
    (B, T, H), labels (B, T) with -100 where a token does not count. Returns ().
    """
    rows = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1)  # (N,)
    counted = flat_labels != IGNORE_INDEX
    if not counted.all():
        rows, flat_labels = rows[counted], flat_labels[counted]
    if len(flat_labels) == 0:
        return hidden.sum().float() * 0.0  # zero, with zero gradients
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // head_weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(flat_labels), chunk):
        piece = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + recompute(
                _cross_entropy_sum,
                rows[piece],
                head_weight,
                head_bias,
                flat_labels[piece],
                use_reentrant=False,
            )
        else:
            total = total + _cross_entropy_sum(
                rows[piece], head_weight, head_bias, flat_labels[piece]
            )
    return total


def _cross_entropy_sum(rows: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    logits = F.linear(rows.to(weight.dtype), weight, bias).float()  # (c, V)
    return F.cross_entropy(logits, labels, reduction="sum")
