"""Decoding speed of translation models side by side: each stage folder's model translates
the same test sources (greedy and beam search, the run's evaluation settings), the
models taking turns, `--repeats` times; the median time for the sentences, tokens
written per second, and each model's speed-up over the first one (its time for the
same sentences over this model's: models that write longer translations are not
credited for it). Measured in one process, so every model sees the same machine load (the
tokens/s in a run's eval.json are measured when each stage ends, under whatever else
ran then).

    OMP_NUM_THREADS=2 python benchmarks/seq2seq_decode_speed.py \\
        runs/multi30k/teacher/seed0 runs/multi30k/baseline/seed0 \\
        [--sentences 500] [--repeats 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kdistill.recipe.seq2seq import DecodeConfig
from kdistill.tasks.seq2seq.measure import load_stage, recipe_of
from kdistill.tasks.seq2seq.steps import translate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="+", type=Path, help="stage folders (model.safetensors)")
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models: list[tuple[str, Any, Any]] = []
    for folder in args.stages:
        model, data = load_stage(folder / "model.safetensors", args.data_dir)
        models.append((str(folder), model, data))
    recipe = recipe_of(args.stages[0] / "model.safetensors")
    beam = recipe.evaluation.beam
    settings = {
        "greedy": DecodeConfig(
            num_beams=1,
            max_new_tokens=recipe.evaluation.greedy_max_new_tokens,
            batch_size=beam.batch_size,
        ),
        "beam": beam,
    }
    seconds_of: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in settings} for n, _, _ in models
    }
    runs: dict[str, dict[str, list[float]]] = {
        name: {k: [] for k in settings} for name, _, _ in models
    }
    for _ in range(args.repeats):
        for name, model, data in models:
            sources = data.test.sources[: args.sentences]
            for kind, decode in settings.items():
                start = time.perf_counter()
                made = translate(model, sources, decode, device="cpu")
                seconds = time.perf_counter() - start
                runs[name][kind].append(made.tokens / seconds)
                seconds_of[name][kind].append(seconds)
    first = models[0][0]
    rows = []
    for name, _, _ in models:
        model = next(m for n, m, _ in models if n == name)
        row: dict[str, Any] = {"stage": name, "params": sum(p.numel() for p in model.parameters())}
        for kind in settings:
            median = statistics.median(seconds_of[name][kind])
            row[f"{kind}_seconds"] = round(median, 3)
            row[f"{kind}_tokens_per_second"] = round(statistics.median(runs[name][kind]), 1)
            row[f"{kind}_speedup"] = round(statistics.median(seconds_of[first][kind]) / median, 3)
        rows.append(row)
        print(
            f"{name}: {row['params']:,} params; greedy {row['greedy_seconds']:.2f}s "
            f"({row['greedy_tokens_per_second']:.0f} tokens/s, {row['greedy_speedup']:.2f}x), "
            f"beam {beam.num_beams} {row['beam_seconds']:.2f}s "
            f"({row['beam_tokens_per_second']:.0f} tokens/s, {row['beam_speedup']:.2f}x)"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": platform.processor() or platform.machine(),
                    "threads": args.threads,
                    "sentences": args.sentences,
                    "repeats": args.repeats,
                    "rows": rows,
                    "raw_tokens_per_second": runs,
                    "raw_seconds": seconds_of,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
