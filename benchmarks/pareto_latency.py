"""Re-time the models of a multi-objective `kdistill tune` study side by side.

A study measures each trial's latency when that trial ends, so trials that ran while
the machine was busier read slower. This script loads the final run of every
Pareto-optimal trial (final/trial-NNNN/distill/seed0: the shape is the same on every
seed) and the study's teacher, and measures each with the very measurement the runs
use (`measure.data_cost`: the median of one-sample forward passes), model after model
in rounds whose order turns each round, so all of them see the same machine. It
prints and writes the median over the rounds, with the spread.

    python benchmarks/pareto_latency.py runs/tune_cifar_width --rounds 7 \
        --json benchmarks/results_tune_pareto_latency_DATE.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from kdistill.tasks.classification.measure import data_cost, load_saved_model


def models(study: Path) -> dict[str, Path]:
    found = {
        folder.name: folder / "distill" / "seed0" / "model.safetensors"
        for folder in sorted((study / "final").glob("trial-*"))
    }
    teacher = next(iter(sorted(study.glob("teacher/*/seed0/model.safetensors"))), None)
    if teacher is not None:
        found["teacher"] = teacher
    missing = [str(p) for p in found.values() if not p.is_file()]
    if not found or missing:
        raise SystemExit(f"no final models under {study}/final, or missing: {missing}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets: dict[str, Any] = {}
    loaded = {
        name: load_saved_model(path, datasets=datasets) for name, path in models(args.study).items()
    }
    times: dict[str, list[float]] = {name: [] for name in loaded}
    names = list(loaded)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, bundle = loaded[name]
            times[name].append(data_cost(bundle, model, "cpu")["latency_ms_single"])
    rows = {}
    for name, (model, _) in loaded.items():
        ms = sorted(times[name])
        rows[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "latency_ms_single_median": statistics.median(ms),
            "min": ms[0],
            "max": ms[-1],
            "rounds": ms,
        }
        print(
            f"{name:12s} {rows[name]['params']:>9,} params  "
            f"{rows[name]['latency_ms_single_median']:.4f} ms/image "
            f"(rounds {ms[0]:.4f}-{ms[-1]:.4f})",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": dt.date.today().isoformat(),
                    "machine": f"{platform.processor() or platform.machine()}, "
                    f"{args.threads} torch thread(s)",
                    "study": str(args.study),
                    "rounds": args.rounds,
                    "models": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
