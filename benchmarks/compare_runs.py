"""Shared by the prune-then-distill benchmarks: run several recipes one after the other
and record each run's stages (the split's quality, seeds, cost, train time) in one JSON
file, rewritten after every run so a stopped benchmark keeps what finished."""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

import kdistill


def run_plans(
    plans: dict[str, tuple[str, list[str], Path]], *, out: Path, split: str, metric: str
) -> dict[str, Any]:
    """plans: name -> (recipe, overrides, run folder). `split` ("test" or "val") and its
    `metric` are recorded per stage, and per seed for the metric."""
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "runs": {},
    }
    for name, (recipe, overrides, folder) in plans.items():
        start = time.perf_counter()
        ran = kdistill.api.run(recipe, overrides, output_dir=folder, quiet=True)
        results["runs"][name] = {
            "recipe": recipe,
            "overrides": overrides,
            "seconds": round(time.perf_counter() - start, 1),
            "stages": {
                stage: {
                    split: info[split],
                    "seeds": info.get("seeds"),
                    "per_seed": [s[split][metric] for s in info.get("per_seed", [])],
                    "cost": info["cost"],
                    "train_seconds": info["train_seconds"],
                }
                for stage, info in ran["stages"].items()
            },
        }
        out.write_text(json.dumps(results, indent=2) + "\n")
        for stage, info in ran["stages"].items():
            print(f"{name} {stage}: {split} {metric} {info[split][metric]}", flush=True)
    return results
