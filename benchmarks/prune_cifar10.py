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
import tempfile
from pathlib import Path

from compare_runs import run_plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, help="a run folder whose teacher to reuse")
    parser.add_argument(
        "--keep", type=Path, help="write the run folders here (else a scratch folder)"
    )
    args = parser.parse_args()
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
        run_plans(plans, out=args.out, split="test", metric="accuracy")


if __name__ == "__main__":
    main()
