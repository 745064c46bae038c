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
    parser.add_argument(
        "--keep", type=Path, help="write the run folders here (else a scratch folder)"
    )
    parser.add_argument("--baselines", action="store_true", help="also train each student alone")
    args = parser.parse_args()
    students = "baseline, distill" if args.baselines else "distill"
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "runs": {},
    }
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
        for name, (recipe, overrides, folder) in plans.items():
            start = time.perf_counter()
            out = kdistill.api.run(recipe, overrides, output_dir=folder, quiet=True)
            results["runs"][name] = {
                "recipe": recipe,
                "overrides": overrides,
                "seconds": round(time.perf_counter() - start, 1),
                "stages": {
                    stage: {
                        "val": info["val"],
                        "seeds": info.get("seeds"),
                        "per_seed": [s["val"]["loss"] for s in info.get("per_seed", [])],
                        "cost": info["cost"],
                        "train_seconds": info["train_seconds"],
                    }
                    for stage, info in out["stages"].items()
                },
            }
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            for stage, info in out["stages"].items():
                print(f"{name} {stage}: val loss {info['val']['loss']}", flush=True)


if __name__ == "__main__":
    main()
