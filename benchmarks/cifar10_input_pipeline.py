"""What share of a resnet8 training step goes to data: indexing, augmentation, normalisation.

    python benchmarks/cifar10_input_pipeline.py [--steps 30] [--batch 128]

CIFAR-10 is decoded once into memory as uint8 (not timed: a one-off cost, reported).
Per step, exactly what `fit` does: take the batch's rows of the uint8 tensor, random
crop (4-pixel zero padding) and horizontal flip with torch ops on the whole batch,
convert to normalised float32 — then the resnet8 forward, cross-entropy, backward
and SGD step. Both parts are timed in the same loop, step by step; the table gives
medians and the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kdistill.data import build
from kdistill.data.augment import random_crop, random_flip
from kdistill.models import build_model
from kdistill.recipe import DataConfig, ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    data = build(DataConfig(source="image_folder", path="cifar10"), args.data_dir)
    decode = time.perf_counter() - start
    model = build_model(ModelSpec(name="resnet8"), input_shape=data.input_shape, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rng = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    data_times, step_times = [], []
    for step in range(args.steps + 3):
        idx = order[step * args.batch : (step + 1) * args.batch]
        t0 = time.perf_counter()
        xb = random_flip(random_crop(data.train.x[idx], 4, rng), rng)
        x = data.to_input(xb)
        y = data.train.y[idx]
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step >= 3:  # warm-up steps are not counted
            data_times.append(t1 - t0)
            step_times.append(t2 - t1)
    data_ms = 1000 * statistics.median(data_times)
    step_ms = 1000 * statistics.median(step_times)
    print(f"CIFAR-10 decode into memory (once): {decode:.1f} s, {len(data.train)} train images")
    print(f"threads: {torch.get_num_threads()}, batch {args.batch}, {args.steps} timed steps")
    print("| part | median ms per step |")
    print("|---|---|")
    print(f"| index + crop + flip + normalise | {data_ms:.2f} |")
    print(f"| resnet8 forward + backward + SGD step | {step_ms:.1f} |")
    print(f"| data share of the whole step | {100 * data_ms / (data_ms + step_ms):.2f}% |")


if __name__ == "__main__":
    main()
