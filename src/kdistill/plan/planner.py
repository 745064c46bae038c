"""`plan()`: every trained stage of a recipe, planned on this machine's device.

Dispatches on the recipe's task to its stage builder (the `plan` entry of its row in
`kdistill.tasks.TASKS`: `kdistill.tasks.<task>.plan`), plans each stage (`kdistill.plan.stage`) against the memory
available (`available_memory`), and optionally measures each stage's true peak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from kdistill.errors import RecipeError
from kdistill.plan.results import MEASURE_METHOD, Plan
from kdistill.plan.stage import measure_peak, plan_stage


def plan(
    recipe: Any,
    *,
    data_dir: str | Path | None = None,
    steps: int = 3,
    measure: bool = False,
    stages: list[str] | None = None,
    device: str | torch.device | None = None,
    console: Console | None = None,
) -> Plan:
    """Plan every training stage of `recipe` (a Recipe or an LMRecipe): memory and time.

    steps: timed optimizer steps per stage, after one warm-up step. measure: also run
    the steps once more under an independent peak-memory measurement. stages: only
    these of the recipe's stages (default: all).
    """
    from kdistill.tasks import task_of_recipe

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RecipeError(f"--steps must be a positive integer (timed steps); got {steps!r}")
    console = console or Console(stderr=True, quiet=True)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    process = _resident_bytes() if target.type == "cpu" else 0
    available, source = available_memory(target)
    of_task = task_of_recipe(recipe)
    stages_of = of_task.function("plan")
    specs, data_bytes, data_text, notes = stages_of(recipe, data_dir, target, steps)
    task = "classifier" if of_task.name == "classification" else of_task.name
    if stages:
        unknown = [s for s in stages if s not in {spec.name for spec in specs}]
        if unknown:
            raise RecipeError(
                f"--stage {', '.join(unknown)}: not a stage this plan covers; the recipe's "
                f"trained stages are {', '.join(spec.name for spec in specs) or 'none'}"
            )
        specs = [spec for spec in specs if spec.name in stages]
    extra = data_bytes + process if target.type == "cpu" else 0
    planned = []
    for spec in specs:
        console.log(f"plan: {spec.name}: building the models, {steps} + 1 steps")
        stage = plan_stage(spec, steps, target, available, extra)
        if measure:
            console.log(f"plan: {spec.name}: measuring the peak of the same steps")
            stage.measured_peak_bytes = measure_peak(spec.build, steps, target)
        planned.append(stage)
    return Plan(
        recipe=recipe.name,
        task=task,
        device=str(target),
        available_bytes=available,
        available_source=source,
        process_bytes=process,
        data_bytes=data_bytes,
        data=data_text,
        steps=steps,
        measure_method=MEASURE_METHOD[target.type] if measure else None,
        stages=planned,
        notes=notes,
    )


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for a run, where the figure comes from) on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "torch.cuda.mem_get_info (free)"
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available), "psutil (available RAM)"
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    raise RuntimeError("no MemAvailable in /proc/meminfo and psutil is not installed")


def _resident_bytes() -> int:
    """This process's resident memory (VmRSS), 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
