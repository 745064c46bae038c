"""Framework overhead and the cost of a cached teacher, measured side by side.

Times one training epoch on the full MNIST training split (54,000 images after the
10% validation carve-out), teacher 2x1200 and student 2x800 MLPs, batch 128, on
this machine's threads, in alternating order so drift affects all variants alike:

  handwritten_live  benchmarks/handwritten.py's loop: live teacher, CE + T²·KL
  kdistill_live     kdistill.train.fit, distill objective, live teacher
  kdistill_cached   kdistill.train.fit, distill objective, teacher logits from the cache
  kdistill_alone    kdistill.train.fit, baseline objective (student alone)

fit's time includes what a real epoch costs in kdistill (progress bookkeeping,
metrics.jsonl, the end-of-epoch checkpoint); there is no validation split, so
neither side evaluates. Prints medians over --repeats rounds and the two ratios
the foundation issue sets targets for: kdistill_live / handwritten_live (≤ 1.05)
and kdistill_cached / kdistill_alone (≤ 1.15).

    python benchmarks/overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import handwritten
import torch
from accelerate import Accelerator

from kdistill.cache import open_cache, write_cache
from kdistill.checkpoint import file_sha256, save_weights
from kdistill.data import build
from kdistill.losses.objective import Objective
from kdistill.models import build_model
from kdistill.recipe import DataConfig, LossTerm, ModelSpec, TrainConfig
from kdistill.tasks.classification.steps import ClassifierSteps
from kdistill.teachers import CachedTeacher, LiveTeacher
from kdistill.train import fit

TEACHER = ModelSpec(name="mlp", args={"hidden": [1200, 1200]})
STUDENT = ModelSpec(name="mlp", args={"hidden": [800, 800]})
TERMS = [
    LossTerm(loss="cross_entropy", weight=0.1),
    LossTerm(loss="kd", weight=0.9, temperature=20),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, help="also write the raw timings here")
    parser.add_argument(
        "--only", nargs="+", help="time only these variants (more rounds in the same time)"
    )
    args = parser.parse_args()

    data = build(DataConfig(source="mnist", val_fraction=0.1), args.data_dir)
    data.val = data.val.subset(torch.arange(0))  # no validation pass on either side
    shape, classes = data.input_shape, data.num_classes
    torch.manual_seed(0)
    teacher = build_model(TEACHER, input_shape=shape, num_classes=classes).eval()
    accelerator = Accelerator(cpu=True)
    settings = TrainConfig(epochs=1, batch_size=128, optimizer={"name": "sgd", "lr": 0.01})
    work = Path(tempfile.mkdtemp(prefix="kdistill-bench-"))
    weights = work / "teacher.safetensors"
    save_weights(teacher, weights)
    write_cache(work / "cache", teacher, data, teacher_sha256=file_sha256(weights))
    cached = CachedTeacher(
        open_cache(work / "cache", teacher_sha256=file_sha256(weights), bundle=data)
    )
    live = LiveTeacher(teacher)

    def student() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(STUDENT, input_shape=shape, num_classes=classes)

    def run_fit(name: str, objective: Objective, signal: object) -> float:
        model = student()
        start = time.perf_counter()
        steps = ClassifierSteps(model, data=data, objective=objective, teacher=signal,  # type: ignore[arg-type]
                                settings=settings, accelerator=accelerator, seed=0, label=name)  # fmt: skip
        fit(model, steps, settings=settings, seed=0, out_dir=work / name,
            accelerator=accelerator, quiet=True, label=name)  # fmt: skip
        return time.perf_counter() - start

    def run_handwritten() -> float:
        model = student()
        opt = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, fused=True
        )  # as make_optimizer
        steps = len(data.train) // 128
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        start = time.perf_counter()
        handwritten.train_epoch(model, opt, sched, data.train.x, data.train.y, batch_size=128, epoch=0,
                                teacher=teacher, temperature=20.0, alpha=0.9)  # fmt: skip
        return time.perf_counter() - start

    distill, alone = Objective(TERMS), Objective([LossTerm(loss="cross_entropy")])
    variants = {
        "handwritten_live": run_handwritten,
        "kdistill_live": lambda: run_fit("live", distill, live),
        "kdistill_cached": lambda: run_fit("cached", distill, cached),
        "kdistill_alone": lambda: run_fit("alone", alone, None),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up round, not counted
        fn()
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(variants[name]())
        print(
            f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
            flush=True,
        )
    medians = {k: statistics.median(v) for k, v in times.items()}
    pairs = [
        ("kdistill_live", "handwritten_live"),
        ("kdistill_cached", "kdistill_alone"),
        ("kdistill_live", "kdistill_cached"),
    ]
    ratios = {f"{a}/{b}": medians[a] / medians[b] for a, b in pairs if a in times and b in times}
    # per-round ratios too: each pair was measured back to back
    paired = {
        f"{a}/{b}": [x / y for x, y in zip(times[a], times[b])]
        for a, b in pairs[:2]
        if a in times and b in times
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for k, v in medians.items():
        print(f"median {k:18s} {v:7.2f} s/epoch")
    for k, v in ratios.items():
        print(f"ratio  {k:32s} {v:.3f}")
    for name, values in paired.items():
        shown = ", ".join(f"{p:.3f}" for p in values)
        print(f"paired {name} per round: {shown}; median {statistics.median(values):.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"times": times, "medians": medians, "ratios": ratios, "paired": paired}, indent=2
            )
        )


if __name__ == "__main__":
    main()
