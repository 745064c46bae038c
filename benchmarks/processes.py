"""One process versus two (Accelerate, gloo on CPU): same recipe, same test accuracy?

Runs a recipe twice into fresh folders — once as one process, once under
`accelerate launch --multi_gpu --num_processes 2` (Accelerate's torchrun
launcher; kdistill forms a CPU process group when there is no GPU) — and prints
each stage's mean test accuracy side by side with the difference in points.

    python benchmarks/processes.py recipes/mnist_quick.yaml
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdistill-processes-"))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    sets = [x for o in args.overrides for x in ("--set", o)]
    commands = {
        "1 process": [sys.executable, "-m", "kdistill.cli", "run", args.recipe, "--output-dir", str(work / "one"), "--quiet", *sets],
        "2 processes": [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdistill.cli", "run", args.recipe,
                        "--output-dir", str(work / "two"), "--quiet", *sets],
    }  # fmt: skip
    seconds = {}
    for name, command in commands.items():
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds[name] = time.perf_counter() - start
    one = json.loads((work / "one" / "results.json").read_text())["stages"]
    two = json.loads((work / "two" / "results.json").read_text())["stages"]
    print(f"{'stage':10s} {'1 process':>12s} {'2 processes':>12s} {'diff (points)':>14s}")
    for stage in one:
        a, b = one[stage]["test"]["accuracy"], two[stage]["test"]["accuracy"]
        print(f"{stage:10s} {100 * a:11.2f}% {100 * b:11.2f}% {100 * (b - a):+14.2f}")
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
