"""Size and precision of the top-k teacher cache's two encodings (kdistill.cache.codec).

Bytes per token: `topk_bytes_per_token` for k = 64 and 128 at vocabularies 2,048 and
50,257, next to dense float16 logits.

Reconstruction error: teacher top-k log-probabilities are written and read back
through the real cache (TopKCacheWriter, open_topk_cache) in each encoding and
compared per position with the teacher's float64 values:

  Σ|Δp|   sum over the top k of |p̂_i - p_i|
  KL      KL(P ‖ Q) in nats over the k + 1 buckets (top k, tail): P the teacher's top-k
          probabilities and tail, Q the decoded top k and the tail a loss rebuilds from
          them, 1 - Σ p̂ floored at float32's smallest normal, renormalised (as
          kdistill.losses.lm_math does with cached log-probabilities)

on two sets of distributions:

  shakespeare T=1, T=2  the 4x256 GPT-2 teacher of runs/shakespeare_gpt_small_from_gpt
                        (vocabulary 2,048) on 32 sequences of 128 tokens from the end of
                        tinyshakespeare/input.txt, at temperatures 1 and 2
  N(0,3²) 50,257        logits drawn from N(0, 3²) over 50,257 tokens, 512 positions

"read" is the time `TopKCache.get` takes for all the positions (decoding included).

    OMP_NUM_THREADS=1 python benchmarks/cache_encoding.py [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from kdistill.cache.codec import ENCODINGS, dense_bytes_per_token, topk_bytes_per_token
from kdistill.cache.manifest import TopKCacheSpec
from kdistill.cache.topk import open_topk_cache, write_topk_cache
from kdistill.cache.topk_teacher import teacher_topk
from kdistill.data import resolve_data_root

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "shakespeare_gpt_small_from_gpt"
SEQUENCES, SEQ_LEN = 32, 128
SYNTHETIC_VOCAB, SYNTHETIC_POSITIONS = 50_257, 512


def shakespeare_logits(data_dir: str | None) -> torch.Tensor:
    """The teacher's logits (SEQUENCES, SEQ_LEN, 2048) on the end of tinyshakespeare."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    root, searched = resolve_data_root(data_dir)
    text_path = (root or searched[0]) / "tinyshakespeare" / "input.txt"
    tokenizer = Tokenizer.from_file(str(RUN / "tokenizer" / "tokenizer.json"))
    text = text_path.read_text(encoding="utf-8")
    ids = tokenizer.encode(text[-len(text) // 10 :]).ids[: SEQUENCES * SEQ_LEN]
    model = AutoModelForCausalLM.from_pretrained(RUN / "teacher" / "seed0" / "hf")
    with torch.inference_mode():
        return model.eval()(torch.tensor(ids).view(SEQUENCES, SEQ_LEN)).logits.double()


def distributions(data_dir: str | None) -> Iterator[tuple[str, torch.Tensor, float]]:
    """(name, logits (n, T, V), temperature)."""
    logits = shakespeare_logits(data_dir)
    yield "shakespeare T=1", logits, 1.0
    yield "shakespeare T=2", logits, 2.0
    generator = torch.Generator().manual_seed(0)
    synthetic = 3 * torch.randn(4, SYNTHETIC_POSITIONS // 4, SYNTHETIC_VOCAB, generator=generator)
    yield "N(0,3²) 50,257", synthetic, 1.0


def bucket_kl(exact: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per position over the top-k and tail buckets; (n, T, k) log-probs each."""
    p = exact.exp()
    p_buckets = torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    q = decoded.exp()
    q_tail = (1 - q.sum(-1, keepdim=True)).clamp(min=torch.finfo(torch.float32).tiny)
    q_buckets = torch.cat([q, q_tail], dim=-1)
    log_q = q_buckets.log() - q_buckets.sum(-1, keepdim=True).log()
    terms = torch.where(p_buckets > 0, p_buckets * (p_buckets.log() - log_q), 0.0)
    return terms.sum(-1)


def measure(
    folder: Path, logits: torch.Tensor, k: int, temperature: float, encoding: str
) -> dict[str, float]:
    n, seq_len, vocab = logits.shape
    ids, logprobs = teacher_topk(logits, k=k, temperature=temperature)  # float64
    spec = TopKCacheSpec(
        teacher="benchmark",
        tokenizer="benchmark",
        dataset="benchmark",
        k=k,
        temperature=temperature,
        seq_len=seq_len,
        num_sequences=n,
        vocab_size=vocab,
        encoding=encoding,
    )
    write_topk_cache(folder, spec, [(0, ids, logprobs)], shard_size_sequences=8)
    cache = open_topk_cache(folder, expect=spec)
    started = time.perf_counter()
    got_ids, got = cache.get(range(n))
    seconds = time.perf_counter() - started
    assert torch.equal(got_ids, ids), "the cache must return the teacher's ids in order"
    error = (got.double().exp() - logprobs.exp()).abs().sum(-1)  # (n, T)
    kl = bucket_kl(logprobs, got.double())
    return {
        "bytes": topk_bytes_per_token(k, vocab, encoding),
        "dp_mean": float(error.mean()),
        "dp_max": float(error.max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "tokens_per_s": n * seq_len / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="default: $KDISTILL_DATA")
    args = parser.parse_args()
    torch.manual_seed(0)

    print("| k | vocabulary | exact B/token | compact B/token | dense float16 B/token |")
    print("|---|---|---|---|---|")
    for k in (64, 128):
        for vocab in (2048, 50_257):
            sizes = [topk_bytes_per_token(k, vocab, encoding) for encoding in ENCODINGS]
            print(
                f"| {k} | {vocab:,} | {sizes[0]} | {sizes[1]} | {dense_bytes_per_token(vocab):,} |"
            )
    print()
    print(
        "| distribution | k | encoding | B/token | Σ\\|Δp\\| mean | Σ\\|Δp\\| max "
        "| KL mean (nats) | KL max (nats) | read (tokens/s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, logits, temperature in distributions(args.data_dir):
            for k in (64, 128):
                for encoding in ENCODINGS:
                    folder = Path(scratch) / f"{len(list(Path(scratch).iterdir()))}"
                    row = measure(folder, logits, k, temperature, encoding)
                    print(
                        f"| {name} | {k} | {encoding} | {row['bytes']} | {row['dp_mean']:.1e} "
                        f"| {row['dp_max']:.1e} | {row['kl_mean']:.1e} | {row['kl_max']:.1e} "
                        f"| {_rate(row['tokens_per_s'])} |"
                    )


def _rate(value: float) -> str:
    return f"{value / 1e6:.1f} M" if value >= 1e6 else f"{value / 1e3:.0f} k"


if __name__ == "__main__":
    main()
