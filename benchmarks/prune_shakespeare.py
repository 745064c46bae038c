"""TinyShakespeare, the Minitron claim on a CPU: the 4x256 GPT-2 teacher pruned in
width and depth to the 2x128 student's size (`shakespeare_gpt_pruned_from_gpt`) and
distilled from the unpruned teacher, against the 2x128 student distilled from random
initialisation (`shakespeare_gpt_small_from_gpt`) from the same teacher at the same
budget (1 epoch, same optimizer), 3 seeds, validation loss per token.

The first run trains the teacher; the second loads it (teacher.checkpoint). Baselines
(students trained alone) are left out unless --baselines, to fit the CPU budget.

    python benchmarks/prune_shakespeare.py --out results.json [--keep DIR] [--baselines]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from compare_runs import run_plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--keep", type=Path, help="write the run folders here (else a scratch folder)"
    )
    parser.add_argument("--baselines", action="store_true", help="also train each student alone")
    args = parser.parse_args()
    students = "baseline, distill" if args.baselines else "distill"
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        plans = {
            "pruned": (
                "shakespeare_gpt_pruned_from_gpt",
                [f"stages=[teacher, prune, {students}]"],
                root / "pruned",
            ),
            "scratch": (
                "shakespeare_gpt_small_from_gpt",
                [
                    f"teacher.checkpoint={root / 'pruned' / 'teacher' / 'seed0'}",
                    f"stages=[{students}]",
                ],
                root / "scratch",
            ),
        }
        run_plans(plans, out=args.out, split="val", metric="loss")


if __name__ == "__main__":
    main()
