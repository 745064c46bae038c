"""How close `kdistill plan`'s estimated peak memory is to the measured one.

For each stage of a recipe (default: shakespeare_gpt_small_from_gpt, the acceptance
target: within 25%), `kdistill.plan.plan(..., measure=True)` reports

  estimate   weights + optimizer state + the largest phase of a step, built from
             parameter counts, the activations saved by one real forward + backward
             (saved-tensor hooks) and the analytic loss figures (kdistill/plan/sequence.py);
  measured   the peak of live tensor bytes over one warm-up and --steps real training
             steps, from the models' construction on: torch.profiler's CPU allocation
             events (torch.cuda.max_memory_allocated on a GPU). It shares nothing with
             the estimate.

With --rss, each stage also runs once more in a fresh process, which reports how far
its resident set grew (VmHWM after the steps minus VmRSS before the models, the
high-water mark reset after the data is built): what the operating system saw,
allocator slack and libraries' first-use buffers included. The estimate does not try
to match that figure; it is here to show the gap.

    python benchmarks/plan_accuracy.py                 # 3 steps per stage
    python benchmarks/plan_accuracy.py --rss --json plan_accuracy.json
    python benchmarks/plan_accuracy.py --recipe mnist_quick --set data.limit_train=5000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TOLERANCE = 0.25  # the target: the estimate within 25% of the measured peak


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """Run one stage's steps and print how far the resident set grew, as JSON."""
    import gc

    import torch

    import kdistill
    from kdistill.recipe.causal_lm import LMRecipe
    from kdistill.tasks.causal_lm.plan import lm_stages
    from kdistill.tasks.classification.plan import classifier_stages

    recipe = kdistill.load_recipe(args.recipe, args.overrides)
    stages = lm_stages if isinstance(recipe, LMRecipe) else classifier_stages
    specs, *_ = stages(recipe, args.data_dir, torch.device("cpu"), args.steps)
    spec = next(s for s in specs if s.name == args.child)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _status("VmRSS:")
    session = spec.build()
    for i in range(args.steps + 1):
        session.step(i)
    print(json.dumps({"stage": spec.name, "rss_growth": _status("VmHWM:") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="shakespeare_gpt_small_from_gpt")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--rss", action="store_true", help="also the RSS growth, per process")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a stage, in the child process
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch
    from rich.console import Console

    import kdistill
    from kdistill.plan import format_plan, plan

    recipe = kdistill.load_recipe(args.recipe, args.overrides)
    result = plan(
        recipe,
        data_dir=args.data_dir,
        steps=args.steps,
        measure=True,
        console=Console(stderr=True),
    )
    print(format_plan(result))
    rss: dict[str, int] = {}
    if args.rss:
        for stage in result.stages:
            command = [sys.executable, __file__, "--child", stage.stage, "--recipe", args.recipe]
            command += ["--steps", str(args.steps)]
            command += [f"--set={item}" for item in args.overrides]
            if args.data_dir:
                command += ["--data-dir", args.data_dir]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{stage.stage} failed:\n{done.stderr[-3000:]}")
            rss[stage.stage] = json.loads(done.stdout.strip().splitlines()[-1])["rss_growth"]

    mib = 2**20
    print(
        f"\n{result.recipe} on {result.device}, torch {torch.__version__}, "
        f"{args.steps} steps after 1 warm-up; measured: {result.measure_method}\n"
    )
    header = "| stage | estimated peak MiB | phase | measured peak MiB | estimate / measured |"
    header += " RSS growth MiB |" if rss else ""
    print(header)
    print("|---|---:|---|---:|---:|" + ("---:|" if rss else ""))
    rows = []
    for stage in result.stages:
        measured = stage.measured_peak_bytes or 0
        ratio = stage.peak_bytes / max(measured, 1)
        line = (
            f"| {stage.stage} | {stage.peak_bytes / mib:,.1f} | {stage.peak_phase} | "
            f"{measured / mib:,.1f} | {ratio:.3f} |"
        )
        if rss:
            line += f" {rss[stage.stage] / mib:,.1f} |"
        print(line)
        rows.append(
            {
                "stage": stage.stage,
                "estimated_peak_bytes": stage.peak_bytes,
                "peak_phase": stage.peak_phase,
                "phases": stage.phases,
                "measured_peak_bytes": measured,
                "ratio": ratio,
                "within_tolerance": abs(ratio - 1) <= TOLERANCE,
                "rss_growth_bytes": rss.get(stage.stage),
            }
        )
    inside = sum(row["within_tolerance"] for row in rows)
    print(f"\n{inside} of {len(rows)} stages within {TOLERANCE:.0%} of the measured peak")
    if args.json:
        record = {
            "recipe": result.recipe,
            "overrides": args.overrides,
            "device": result.device,
            "torch": torch.__version__,
            "steps": args.steps,
            "measure_method": result.measure_method,
            "stages": rows,
            "plan": result.to_json(),
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
