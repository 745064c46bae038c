"""A minimal hand-written PyTorch distillation loop: the reference kdistill is compared with.

No framework: MNIST read with numpy, tensors in memory, a seeded permutation per
epoch, SGD with a cosine schedule, Hinton's KD loss written inline. Used by
`benchmarks/overhead.py` (time per epoch, side by side with kdistill) and runnable
alone to reproduce the 'hand-written loop' numbers of the foundation issue.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def load_mnist(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(root / "mnist" / name, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    xtr = torch.from_numpy(read("train-images-idx3-ubyte.gz", 16).copy()).view(-1, 1, 28, 28)
    ytr = torch.from_numpy(read("train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    xte = torch.from_numpy(read("t10k-images-idx3-ubyte.gz", 16).copy()).view(-1, 1, 28, 28)
    yte = torch.from_numpy(read("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    return xtr, ytr, xte, yte


def mlp(hidden: list[int], dropout: float = 0.0, input_dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    if input_dropout:
        layers.append(nn.Dropout(input_dropout))
    width = 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


MEAN, STD = 0.1307, 0.3081


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - MEAN) / STD


def train_epoch(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    epoch: int,
    teacher: nn.Module | None = None,
    temperature: float = 20.0,
    alpha: float = 0.9,
) -> float:
    student.train()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    total = 0.0
    for step in range(len(x) // batch_size):
        idx = order[step * batch_size : (step + 1) * batch_size]
        xb, yb = normalise(x[idx]), y[idx]
        logits = student(xb)
        loss = F.cross_entropy(logits, yb)
        if teacher is not None:
            with torch.inference_mode():
                t_logits = teacher(xb)
            t_logits = t_logits.clone()
            kd = (
                F.kl_div(
                    F.log_softmax(logits / temperature, -1),
                    F.log_softmax(t_logits / temperature, -1),
                    log_target=True,
                    reduction="batchmean",
                )
                * temperature**2
            )
            loss = (1 - alpha) * loss + alpha * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item()
    return total


def errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    model.eval()
    with torch.inference_mode():
        return int((model(normalise(x)).argmax(-1) != y).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("KDISTILL_DATA", "../shared/data"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    xtr, ytr, xte, yte = load_mnist(Path(args.data_dir))
    results = {}
    teacher = None
    for name, hidden, kd in (
        ("teacher", [1200, 1200], False),
        ("student", [800, 800], False),
        ("distilled", [800, 800], True),
    ):
        torch.manual_seed(0)
        model = mlp(hidden, *((0.5, 0.2) if name == "teacher" else (0.0, 0.0)))
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        steps = args.epochs * (len(xtr) // args.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, steps=steps: 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        start = time.perf_counter()
        for epoch in range(args.epochs):
            train_epoch(
                model,
                opt,
                sched,
                xtr,
                ytr,
                batch_size=args.batch_size,
                epoch=epoch,
                teacher=teacher.eval() if kd and teacher is not None else None,
            )
        results[name] = (errors(model, xte, yte), time.perf_counter() - start)
        print(name, results[name], flush=True)
        if name == "teacher":
            teacher = model
    print(results)


if __name__ == "__main__":
    main()
