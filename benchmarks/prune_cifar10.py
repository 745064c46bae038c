"""CIFAR-10: the CNN teacher channel-pruned by half (`cifar10_cnn_pruned_from_cnn`),
trained alone and distilled from the unpruned teacher, against the same shape from
scratch (`cifar10_cnn_small_from_cnn`'s conv 16 → 32 student), trained alone and
distilled from the same teacher at the same budget (6 epochs, 20,000 images, 2 seeds).

The first run trains the teacher; the second loads it (teacher.checkpoint), so both
students learn from one teacher. Pass `--teacher RUN` to reuse a finished teacher.

    python benchmarks/prune_cifar10.py --out results.json [--teacher RUN_DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import kdistill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, help="a run folder whose teacher to reuse")
    parser.add_argument(
        "--keep", type=Path, help="write the run folders here (else a scratch folder)"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        pruned_run = root / "pruned"
        teacher = args.teacher or pruned_run
        plans = {
            "pruned": (
                "cifar10_cnn_pruned_from_cnn",
                []
                if args.teacher is None
                else [f"teacher.checkpoint={args.teacher}", "stages=[prune, baseline, distill]"],
                pruned_run,
            ),
            "scratch": (
                "cifar10_cnn_small_from_cnn",
                [f"teacher.checkpoint={teacher}", "stages=[baseline, distill]"],
                root / "scratch",
            ),
        }
        for name, (recipe, overrides, folder) in plans.items():
            start = time.perf_counter()
            out = kdistill.api.run(recipe, overrides, output_dir=folder, quiet=True)
            results["runs"][name] = {
                "recipe": recipe,
                "overrides": overrides,
                "seconds": round(time.perf_counter() - start, 1),
                "stages": {
                    stage: {
                        "test": info["test"],
                        "seeds": info.get("seeds"),
                        "cost": info["cost"],
                        "train_seconds": info["train_seconds"],
                    }
                    for stage, info in out["stages"].items()
                },
            }
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            for stage, info in out["stages"].items():
                print(
                    f"{name} {stage}: accuracy {info['test']['accuracy']}, "
                    f"params {info['cost']['params']:,}, FLOPs {info['cost'].get('flops')}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
