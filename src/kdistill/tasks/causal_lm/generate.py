"""Text generation by a `CausalLM`: seeded sampling with a key/value cache.

Used by sequence-level KD (the teacher writes completions, `kdistill.tasks.causal_lm.seqkd`) and by
on-policy distillation (the student writes continuations, `kdistill.tasks.causal_lm.steps`). Each
next token is drawn from the model's distribution over the tokenizer's ids
[0, vocab_size) (padded rows of the output layer never win):

    temperature 0:  the most likely token (greedy)
    temperature T:  softmax(logits / T), restricted to the top_k most likely tokens and
                    to the smallest set whose probabilities sum to at least top_p
                    (nucleus sampling, Holtzman et al. 2020), renormalised

Sampling reads no random state: each row brings its own uniform numbers, one per new
token (`row_uniforms`, seeded per row), and takes the token where the cumulative
probability passes it (inverse-CDF sampling). A row's text therefore depends on its
seed alone, not on the batch it was generated in, the number of processes or a
resume, and dropout masks drawn from the global random state are not shifted by it.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
from torch import Tensor

from kdistill.recipe.causal_lm import GenerationConfig
from kdistill.tasks.causal_lm.models import CausalLM


class Generated(NamedTuple):
    """tokens: (B, P + G) int64, the prompt then the written tokens; after a row's
    end-of-text token the rest of the row repeats it (padding).
    new_tokens: (B,) int64, how many tokens each row wrote (its end-of-text included).
    ended: (B,) bool, whether the row wrote the end-of-text token."""

    tokens: Tensor
    new_tokens: Tensor
    ended: Tensor


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (a purpose, the run's seed, a step, a row): distinct
    parts give unrelated streams, the same parts the same one."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_uniforms(seeds: list[int], count: int, device: torch.device | str = "cpu") -> Tensor:
    """(len(seeds), count) float64 numbers in [0, 1), row i from a generator seeded by
    seeds[i]: the randomness of `count` sampled tokens of each row."""
    rows = [torch.rand(count, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds]  # fmt: skip
    return torch.stack(rows).to(device) if rows else torch.zeros(0, count, dtype=torch.float64)


def sample_next(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """One token per row of `logits` (B, V): greedy at temperature 0, else sampled from
    softmax(logits / temperature) within top_k and top_p, taking in row i the first token
    whose cumulative probability exceeds uniform[i] (B,) in [0, 1). Returns (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)  # (B, V)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = before >= top_p  # the most likely token is always kept (before = 0)
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    if uniform is None:
        raise ValueError("sampling at temperature > 0 needs one uniform number per row")
    cumulative = scores.softmax(dim=-1).double().cumsum(dim=-1)  # (B, V)
    # scaled by the total, which rounding leaves a little off 1, so a token is always found
    # and tokens of probability 0 (cut by top_k, top_p) never are
    threshold = uniform.to(cumulative) * cumulative[:, -1]  # (B,)
    return (cumulative <= threshold.unsqueeze(1)).sum(dim=-1)


def generate(
    model: CausalLM,
    prompts: Tensor,
    settings: GenerationConfig,
    *,
    vocab_size: int,
    uniforms: Tensor | None = None,
    eos_id: int | None = None,
    max_new_tokens: int | None = None,
) -> Generated:
    """Continue each row of `prompts` (B, P), all of one length, by up to
    `max_new_tokens` (default settings.max_new_tokens) tokens. uniforms: (B, ≥ that
    many) from `row_uniforms`, needed unless settings.temperature is 0.

    Runs in eval mode under torch.no_grad(), keeping each layer's keys and values so a
    step reads one new token. A row stops at `eos_id` when one is given; generation
    ends when every row has stopped. The caller keeps P + max_new_tokens within the
    model's context.
    """
    if prompts.dim() != 2 or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be (B, P) with P >= 1; got {tuple(prompts.shape)}")
    limit = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
    batch = prompts.shape[0]
    if settings.temperature > 0 and (
        uniforms is None or uniforms.shape[0] != batch or uniforms.shape[1] < limit
    ):
        raise ValueError(
            f"sampling {limit} tokens for {batch} rows needs uniforms of shape ({batch}, "
            f">= {limit}); got {None if uniforms is None else tuple(uniforms.shape)}"
        )
    device = prompts.device
    written: list[Tensor] = []
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.hf.base_model(input_ids=prompts, use_cache=True, return_dict=True)
            for step in range(limit):
                hidden = out.last_hidden_state[:, -1]  # (B, H)
                logits = model.logits(hidden)[:, :vocab_size]  # (B, V)
                token = sample_next(
                    logits,
                    temperature=settings.temperature,
                    top_k=settings.top_k,
                    top_p=settings.top_p,
                    uniform=None if uniforms is None else uniforms[:, step],
                )
                if eos_id is not None:
                    token = token.masked_fill(ended, eos_id)  # rows that ended: padding
                new_tokens += (~ended).long()
                written.append(token)
                if eos_id is not None:
                    ended |= token == eos_id
                    if bool(ended.all()):
                        break
                if step + 1 < limit:
                    out = model.hf.base_model(
                        input_ids=token.unsqueeze(1),  # (B, 1)
                        past_key_values=out.past_key_values,
                        use_cache=True,
                        return_dict=True,
                    )
    finally:
        model.train(was_training)
    tokens = torch.cat([prompts, *[t.unsqueeze(1) for t in written]], dim=1)  # (B, P + G)
    return Generated(tokens, new_tokens, ended)
