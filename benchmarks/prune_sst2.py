"""SST-2: the fine-tuned 6-layer MiniLM teacher with half its feed-forward neurons
pruned (Taylor importance), then distilled from the unpruned teacher, next to the
shipped 2-layer student (teacher layers 2 and 5), each also trained alone (baseline).

A reduced configuration of `sst2_minilm2_from_minilm` (stated in the output): the first
`--train` training sentences, no transfer set, `--teacher-epochs` and `--epochs`
(default 1 each), one seed. It shows what pruning costs and buys at this budget, not the
issue's full-data target. Both students read the same teacher (the second run loads the
first run's teacher with teacher.checkpoint).

    python benchmarks/prune_sst2.py --out results.json [--train 8000] [--teacher-epochs 1] [--epochs 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import kdistill

RECIPE = "sst2_minilm2_from_minilm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    common = [
        f"data.limit_train={args.train}",
        "data.text.transfer=null",
        f"teacher.train.epochs={args.teacher_epochs}",
        "teacher.cache=false",
        f"train.epochs={args.epochs}",
        "seeds=[0]",
    ]
    students = {
        "pruned_ffn_0.5": "{name: hf_student, args: {location: teacher, prune: {ffn: 0.5, samples: 256}}}",
        "layers_2_5": "{name: hf_student, args: {location: teacher, num_layers: 2, layers: [2, 5]}}",
    }
    results: dict[str, Any] = {"date": dt.date.today().isoformat(), "overrides": common, "runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        first = Path(scratch) / "pruned"
        for name, student in students.items():
            run = Path(scratch) / name
            overrides = [*common, f"student.model={student}"]
            if name == "pruned_ffn_0.5":
                overrides.append("stages=[teacher, baseline, distill]")
            else:
                overrides += ["stages=[baseline, distill]", f"teacher.checkpoint={first}"]
            start = time.perf_counter()
            out = kdistill.api.run(
                RECIPE, overrides, output_dir=run if name != "pruned_ffn_0.5" else first, quiet=True
            )
            results["runs"][name] = {
                "seconds": round(time.perf_counter() - start, 1),
                "stages": {
                    stage: {
                        "test": info["test"],
                        "cost": info["cost"],
                        "train_seconds": info["train_seconds"],
                    }
                    for stage, info in out["stages"].items()
                },
                "gap_recovered": out["gap_recovered"],
            }
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            for stage, info in out["stages"].items():
                print(
                    f"{name} {stage}: accuracy {info['test']['accuracy']:.4f}, params "
                    f"{info['cost']['params']:,}, latency {info['cost'].get('latency_ms_single', 0):.2f} ms per sentence",
                    flush=True,
                )


if __name__ == "__main__":
    main()
