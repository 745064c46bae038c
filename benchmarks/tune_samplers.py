"""Grid vs random vs TPE vs CMA-ES on one recipe: best validation score after n trials.

    python benchmarks/tune_samplers.py mnist_quick --trials 24 --studies 3 \\
        --out runs/bench_samplers --json benchmarks/results_tune_samplers.json

Each sampler runs `--studies` studies (sampler seeds 0, 1, ...) of `--trials` trials
over the same discrete space (so the grid can list it: by default the KD temperature
1..8 and the KD weight 0.3, 0.6, 0.9, 24 points), with no pruner and no final re-run:
the trials alone. A study's teacher is trained once and shared by its trials; every
study of every sampler trains the same teacher (same seed, same data). The script
prints, per sampler, the best validation score after n trials (mean ± std over its
studies) and the trials each study needed to reach its best, and draws the curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import optuna

from kdistill.tune import tune

SPACE = {
    "objective.1.temperature": {"low": 1, "high": 8, "step": 1},
    "objective.1.weight": {"low": 0.3, "high": 0.9, "step": 0.3},
}
SAMPLERS = ("grid", "random", "tpe", "cmaes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a shipped classification recipe (or a YAML path)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_samplers"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()

    curves: dict[str, list[list[float]]] = {}
    for sampler in args.samplers:
        for seed in range(args.studies):
            folder = args.out / f"{sampler}-{seed}"
            space = {
                "space": SPACE,
                "sampler": sampler,
                "sampler_seed": seed,
                "trials": args.trials,
            }
            tune(
                args.recipe,
                [*args.overrides, f"tune={json.dumps(space)}"],
                output_dir=folder,
                data_dir=args.data_dir,
                resume=True,
                final=False,
                quiet=True,
            )
            curves.setdefault(sampler, []).append(_best_so_far(folder, args.trials))
            print(f"{sampler} study {seed}: best {curves[sampler][-1][-1]:.4f}", flush=True)

    rows = {sampler: _row(runs) for sampler, runs in curves.items()}
    marks = [n for n in (6, 12, 24) if n <= args.trials] or [args.trials]
    lines = [
        f"{args.recipe}: {args.trials} trials per study, {args.studies} studies per sampler, "
        f"space {json.dumps(SPACE)}",
        "",
        "| sampler | " + " | ".join(f"best after {n}" for n in marks) + " | trials to its best |",
        "|---" * (len(marks) + 2) + "|",
    ]
    for sampler, row in rows.items():
        cells = [f"{row['mean'][n - 1]:.4f} ± {row['std'][n - 1]:.4f}" for n in marks]
        lines.append(f"| {sampler} | " + " | ".join(cells) + f" | {row['trials_to_best']:.1f} |")
    print("\n".join(lines))
    _plot(rows, args.out / "best_after_n.png")
    if args.json:
        args.json.write_text(json.dumps({"space": SPACE, "curves": curves, "rows": rows}, indent=2))


def _best_so_far(folder: Path, trials: int) -> list[float]:
    """The best validation score after each of the study's first `trials` trials
    (failed or pruned trials carry the best before them)."""
    storage = f"sqlite:///{folder / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    higher = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best, out = None, []
    for trial in sorted(study.trials, key=lambda t: t.number)[:trials]:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            value = float(trial.value)
            best = value if best is None else (max(best, value) if higher else min(best, value))
        out.append(float("nan") if best is None else best)
    return out


def _row(runs: list[list[float]]) -> dict[str, Any]:
    columns = list(zip(*runs))
    return {
        "mean": [statistics.mean(c) for c in columns],
        "std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns],
        "trials_to_best": statistics.mean(run.index(run[-1]) + 1 for run in runs),
    }


def _plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, row in rows.items():
        n = range(1, len(row["mean"]) + 1)
        ax.plot(n, row["mean"], label=sampler)
        low = [m - s for m, s in zip(row["mean"], row["std"])]
        high = [m + s for m, s in zip(row["mean"], row["std"])]
        ax.fill_between(n, low, high, alpha=0.15)
    ax.set_xlabel("trials")
    ax.set_ylabel("best validation score so far")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
