"""What the plan measures the same way for every task whose loss is a chunked loss over
output tokens (language models, translation): the loss's memory (`lm_loss_memory`),
the student with the plan's counter between its forward and that loss (`ProbedHead`),
one probed micro-step (`probed_token_step`) and a stand-in for a top-k teacher cache
not written yet (`TopKStandIn`).

The tasks' stage builders (`kdistill.tasks.causal_lm.plan`, `kdistill.tasks.seq2seq.plan`)
differ only in their rows, their teacher signal and how their steps call the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.plan.probes import (
    RecordedSignal,
    SavedTensors,
    largest_layer,
    tensor_bytes,
    weight_storages,
)
from kdistill.plan.results import LOSS_COPIES, NAIVE_LOSS_COPIES, CacheSize, LossMemory
from kdistill.plan.stage import Probe


def lm_loss_memory(
    *,
    kind: str,
    tokens: int,
    hidden: int,
    head_rows: int,
    vocab: int,
    bias: bool,
    with_cross_entropy: bool,
    chunk_size: int | None,
) -> LossMemory:
    """The memory of a token-level loss over one micro-batch of `tokens` counted tokens,
    as the task steps compute it (chunked) and over full logits (naive).

    kind "cross_entropy" (chunked_cross_entropy: each chunk's logits are recomputed in the
    backward pass): LOSS_COPIES × chunk × head_rows float32 tensors, plus the gradient of
    the hidden states. A divergence (chunked_divergence): LOSS_COPIES × chunk × U, U the
    student's head rows with cross-entropy else the compared vocabulary, plus the
    gradients it stores in the forward pass, one set per output (divergence, and
    cross-entropy when weighted): hidden states (tokens, H), head weight and bias.
    """
    from kdistill.losses.lm_chunked import CHUNK_ELEMENTS

    copies = LOSS_COPIES[kind]
    if kind == "cross_entropy":
        columns = head_rows
        default = max(1, CHUNK_ELEMENTS // head_rows)
        stored = tokens * hidden * 4
    else:
        columns = head_rows if with_cross_entropy else vocab
        default = max(1, CHUNK_ELEMENTS // max(vocab, head_rows))
        outputs = 2 if with_cross_entropy else 1
        stored = outputs * (tokens * hidden + head_rows * hidden + (head_rows if bias else 0)) * 4
    chunk = min(chunk_size or default, max(tokens, 1))
    return LossMemory(
        kind=kind,
        tokens=tokens,
        vocab=columns,
        chunk_size=chunk,
        copies=copies,
        chunked_bytes=copies * chunk * columns * 4 + stored,
        naive_bytes=NAIVE_LOSS_COPIES[kind] * tokens * columns * 4,
    )


def objective_loss_memory(
    objective: Any, settings: Any, head: dict[str, int], tokens: int, vocab: int
) -> LossMemory:
    """`lm_loss_memory` of a stage's objective (cross-entropy alone, or its divergence with
    or without cross-entropy) over `tokens` counted tokens, for the student's output
    layer `head` (hidden, rows, bias: noted by the stage's first build)."""
    from kdistill.losses.table import LM_DIVERGENCES

    if objective.divergence is None:
        kind, with_ce = "cross_entropy", False
    else:
        kind = LM_DIVERGENCES[objective.divergence.loss]
        with_ce = objective.ce_weight is not None and objective.at(0.0)[0] > 0
    return lm_loss_memory(
        kind=kind,
        tokens=tokens,
        hidden=head["hidden"],
        head_rows=head["rows"],
        vocab=vocab,
        bias=bool(head["bias"]),
        with_cross_entropy=with_ce,
        chunk_size=settings.chunk_size,
    )


class ProbedHead(nn.Module):
    """The student as a task's steps call it, `model(..., head_loss=...)`, with the
    plan's counter between the forward and the loss: the final hidden states counted as
    the model's output, the chunked loss computed inside the forward left out of the
    count (`lm_loss_memory` sizes it)."""

    def __init__(self, model: nn.Module, counter: SavedTensors) -> None:
        super().__init__()
        self.model, self.counter = model, counter

    def forward(self, *args: Any, head_loss: Callable[..., Any], **inputs: Any) -> Any:
        def probed(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Any:
            self.counter.add(hidden)  # (b, T, H)
            with self.counter.paused():
                return head_loss(hidden, weight, bias)

        return self.model(*args, **inputs, head_loss=probed)


def probed_token_step(
    loss: Callable[[nn.Module], Tensor],
    model: nn.Module,
    scale: float,
    recorded: RecordedSignal | None,
    teachers: list[nn.Module],
    counter: SavedTensors | None,
) -> Probe:
    """Forward + loss (`loss(student)`: the task steps' own loss of one micro-batch) and
    backward, the loss scaled by `scale`; with a counter, what autograd saves for the
    student's forward and the backward walk, else only the teacher's probes (what it
    hands the loss, its largest layer)."""
    student = model if counter is None else ProbedHead(model, counter)
    with largest_layer(teachers) as layer, counter or contextlib.nullcontext():
        total = loss(student)
    handed = tensor_bytes(
        recorded.last if recorded is not None else None, weight_storages(teachers)
    )
    if counter is None:
        (total * scale).backward()
        return Probe(0, 0, handed, layer[0])
    with counter.gradients_during(model.parameters()):
        (total * scale).backward()
    return Probe(
        counter.bytes,
        counter.backward_bytes,
        handed,
        layer[0],
        backward_bytes=counter.backward_with_gradients,
    )


class TopKStandIn:
    """In place of a top-k cache that does not exist yet (kdistill.cache.TopKCache):
    ids and log-probabilities of the right shapes and dtypes for given rows, which the
    task's real cache reader (CachedLMTeacher, CachedSeq2SeqTeacher) reads as it reads
    the cache."""

    def __init__(self, rows: Tensor, seq_len: int, vocab: int, k: int, temperature: float):
        from kdistill.cache.topk_teacher import teacher_topk

        self.position = {int(row): i for i, row in enumerate(rows.tolist())}
        generator = torch.Generator().manual_seed(0)
        ids, logprobs = [], []
        for _ in range(len(rows)):
            logits = torch.randn(1, seq_len, vocab, generator=generator)
            one_ids, one_logprobs = teacher_topk(logits, k=k, temperature=temperature)
            ids.append(one_ids.long())
            logprobs.append(one_logprobs.float())
        self.ids, self.logprobs = torch.cat(ids), torch.cat(logprobs)  # (n, T, k)

    def get(self, sequence_indices: Tensor) -> tuple[Tensor, Tensor]:
        """(ids (b, T, k) int64, log-probabilities (b, T, k) float32), as TopKCache.get."""
        where = torch.tensor([self.position[int(i)] for i in sequence_indices])
        return self.ids[where], self.logprobs[where]


def topk_cache_size(spec: Any, *, in_use: bool, unit: str = "token") -> CacheSize:
    """The top-k cache a spec (kdistill.cache.manifest.TopKCacheSpec) describes, as
    kdistill.cache.topk writes it: bytes per position × sequences × their length."""
    from kdistill.cache.codec import bytes_per_token
    from kdistill.cache.manifest import new_manifest

    per_token = bytes_per_token(new_manifest(spec))
    positions = spec.num_sequences * spec.seq_len
    compact = ", compact" if spec.encoding == "compact" else ""
    return CacheSize(
        "top-k",
        per_token * positions,
        f"{per_token} bytes/{unit} (top {spec.k}{compact}) × {positions:,} {unit}s",
        in_use=in_use,
    )
