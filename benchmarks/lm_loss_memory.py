"""Peak memory and time of LM distillation losses: full logits vs chunked vs TRL.

One forward + backward of a token-level distillation loss for a GPT-2-sized setup:
vocabulary 50,257, batch 4 × 1,024 tokens, student width 768, teacher width 1,024
(live teacher: its final hidden states and output layer, run without gradients),
float32, no output bias. Labels mask a 64-token prompt in every sequence and 256
padding tokens at the end of the last one (3,584 of 4,096 tokens count). Variants:

  naive_kl, naive_jsd      full logits of both models, then kdistill's per-token
                           `token_divergence` (forward KL; JSD with β = 0.5), masked mean
  chunked_kl, chunked_jsd  kdistill's `chunked_divergence` from hidden states and heads
  trl_kl, trl_jsd          full logits, then TRL's `GKDTrainer.generalized_jsd_loss`
                           (β = 0: forward KL; β = 0.5), as a TRL user computes it

Every variant runs in a fresh subprocess. Peak memory is what the loss adds on top of
its inputs: on CPU, the peak resident set size (getrusage) minus the resident size
after the inputs exist; on CUDA, torch.cuda.max_memory_allocated minus the allocated
bytes after the inputs exist. Time is the median over --repeats runs after one warm-up.
The losses and gradients (student hidden states and head weight) of each variant
are compared with the naive one of the same divergence: the maximum absolute
difference divided by the largest magnitude of the naive value.

TRL is imported only here (pip install trl); it is not a dependency of kdistill.

    python benchmarks/lm_loss_memory.py --repeats 3 --json lm_loss_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("naive_kl", "naive_jsd", "chunked_kl", "chunked_jsd", "trl_kl", "trl_jsd")
BETAS = {"kl": 0.0, "jsd": 0.5}
# options the parent passes on to each child process
SHARED_OPTIONS = (
    "vocab",
    "batch",
    "tokens",
    "hidden",
    "teacher_hidden",
    "chunk_size",
    "repeats",
    "threads",
    "device",
)


def make_inputs(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator)).to(device)

    labels = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=generator)
    labels[:, :64] = -100  # the prompt
    labels[-1, -256:] = -100  # padding
    return {
        "student_hidden": randn(args.batch, args.tokens, args.hidden, scale=1.0).requires_grad_(),
        "student_weight": randn(args.vocab, args.hidden, scale=0.05).requires_grad_(),
        "teacher_hidden": randn(args.batch, args.tokens, args.teacher_hidden, scale=1.0),
        "teacher_weight": randn(args.vocab, args.teacher_hidden, scale=0.05),
        "labels": labels.to(device),
    }


def loss_of(variant: str, inputs: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """The scalar loss of one variant, from hidden states and heads, as its user computes it."""
    method, divergence = variant.split("_")
    h, w = inputs["student_hidden"], inputs["student_weight"]
    labels = inputs["labels"]
    if method == "chunked":
        from kdistill.losses.lm_chunked import chunked_divergence

        return chunked_divergence(
            h,
            w,
            labels=labels,
            kind=divergence,
            beta=BETAS[divergence],
            teacher_hidden=inputs["teacher_hidden"],
            teacher_head_weight=inputs["teacher_weight"],
            chunk_size=chunk_size,
        ).divergence
    student_logits = h @ w.T  # (B, T, V)
    with torch.no_grad():
        teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T  # (B, T, V)
    if method == "trl":
        from trl.experimental.gkd import GKDTrainer

        return GKDTrainer.generalized_jsd_loss(
            student_logits, teacher_logits, labels=labels, beta=BETAS[divergence]
        )
    from kdistill.losses.lm_per_token import token_divergence

    vocab = student_logits.shape[-1]
    per_token = token_divergence(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        divergence,
        beta=BETAS[divergence],
    )  # (B·T,)
    mask = (labels != -100).reshape(-1)
    return (per_token * mask).sum() / mask.sum()


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """Run one variant; print a JSON line; save its loss and gradients."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant.startswith("trl"):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer  # noqa: F401  (import cost outside the peak)
    from kdistill.losses import lm_chunked, lm_per_token  # noqa: F401  (import cost outside the peak)

    inputs = make_inputs(args, device)
    leaves = (inputs["student_hidden"], inputs["student_weight"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = resident_mb()
    seconds = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        loss = loss_of(args.variant, inputs, args.chunk_size)
        grads = torch.autograd.grad(loss, leaves)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        if len(seconds) <= args.repeats:
            del loss, grads
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch.save(
        {"loss": loss.detach().cpu(), "grad_hidden": grads[0].cpu(), "grad_weight": grads[1].cpu()},
        Path(args.out) / f"{args.variant}.pt",
    )
    timed = seconds[1:]
    print(
        json.dumps(
            {
                "variant": args.variant,
                "peak_mb": peak - baseline,
                "inputs_mb": baseline,
                "seconds": statistics.median(timed),
                "all_seconds": timed,
                "loss": float(loss),
            }
        )
    )


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / max(scale, 1e-30)


def compare(out: Path, variant: str, reference: str) -> dict[str, float]:
    got, expected = torch.load(out / f"{variant}.pt"), torch.load(out / f"{reference}.pt")
    return {key: relative_difference(got[key], expected[key]) for key in expected}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=50_257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1_024)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--teacher-hidden", type=int, default=1_024)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the library's")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_size is None:
        from kdistill.losses.lm_chunked import CHUNK_ELEMENTS

        args.chunk_size = CHUNK_ELEMENTS // args.vocab  # what chunk_size=None picks
    if args.variant:
        child(args)
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="kdistill-lm-loss-") as out:
        for variant in args.variants:
            command = [sys.executable, __file__, "--variant", variant, "--out", out]
            for option in SHARED_OPTIONS:
                command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
            print(f"running {variant} ...", file=sys.stderr, flush=True)
            finished = subprocess.run(command, capture_output=True, text=True, check=False)
            if finished.returncode != 0:
                sys.exit(f"{variant} failed:\n{finished.stderr[-3000:]}")
            results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])
        for variant in args.variants:
            method, divergence = variant.split("_")
            reference = f"naive_{divergence}"
            if method != "naive" and reference in results:
                results[variant]["difference_to_naive"] = compare(Path(out), variant, reference)

    print(
        f"\nvocab {args.vocab:,}, {args.batch} × {args.tokens} tokens, student width "
        f"{args.hidden}, teacher width {args.teacher_hidden}, float32, {args.device}, "
        f"chunk_size {args.chunk_size}, median of {args.repeats}\n"
    )
    print(
        "| variant | peak MB | ratio to naive | seconds | max rel. diff to naive (loss, grad h, grad W) |"
    )
    print("|---|---:|---:|---:|---|")
    for variant, result in results.items():
        naive = results.get(f"naive_{variant.split('_')[1]}")
        ratio = result["peak_mb"] / naive["peak_mb"] if naive else float("nan")
        result["ratio_to_naive"] = ratio
        difference = result.get("difference_to_naive")
        shown = (
            ", ".join(f"{difference[k]:.1e}" for k in ("loss", "grad_hidden", "grad_weight"))
            if difference
            else "—"
        )
        print(
            f"| {variant} | {result['peak_mb']:,.0f} | {ratio:.3f} | {result['seconds']:.2f} | {shown} |"
        )
    if args.json:
        record = {
            "config": {key: getattr(args, key) for key in SHARED_OPTIONS if key != "threads"},
            "counted_tokens": int(args.batch * (args.tokens - 64) - 256),
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "machine": platform.platform(),
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
