"""What every run and every stage of every task does the same way.

The pipelines (`kdistill.pipeline` for classification, `kdistill.lm.pipeline` for
causal language models) decide which stages run and what each measures. Written once
here: the process setup (`make_accelerator`), the run folder (`run_folder`: claimed,
recipe.yaml, run.json's status running / failed / finished), a stage's folder
(<run>/<stage>/seed<k>; one whose eval.json and model.safetensors are both there
finished earlier, and a resumed run reuses it), and training a stage with `fit`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import yaml
from accelerate import Accelerator, DistributedType
from rich.console import Console
from torch import nn

from kdistill import __version__
from kdistill.checkpoint import atomic_write_json, atomic_write_text
from kdistill.errors import CheckpointError, RunDirError, TrainingError
from kdistill.train import FitResult, TrainSteps, fit

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
T = TypeVar("T")


class RunContext(Protocol):
    """What the stages of one run share (each pipeline's Context)."""

    run_dir: Path
    accelerator: Accelerator
    resume: bool
    quiet: bool
    console: Console

    @property
    def recipe(self) -> Any: ...

    @property
    def is_main(self) -> bool: ...


def stage_dir(run_dir: Path, stage: str, seed: int) -> Path:
    return run_dir / stage / f"seed{seed}"


def finished(folder: Path) -> bool:
    """Whether a stage folder holds a finished stage (its weights and its measurements)."""
    return (folder / "eval.json").exists() and (folder / "model.safetensors").exists()


def finished_earlier(ctx: RunContext, stage: str, seed: int, *, teacher: bool = False) -> bool:
    """Whether the stage finished in an earlier attempt of this run; says so when it did
    (a teacher is reused by the stages after it, a student stage is skipped)."""
    folder = stage_dir(ctx.run_dir, stage, seed)
    if not finished(folder):
        return False
    if ctx.is_main:
        done = (
            "already trained in {}, reusing it" if teacher else "finished earlier in {}, skipping"
        )
        ctx.console.log(f"{stage} seed {seed}: " + done.format(folder))
    return True


def train_stage(
    ctx: RunContext,
    stage: str,
    seed: int,
    model: nn.Module,
    steps: TrainSteps,
    *,
    settings: Any,
    extras: nn.Module | None = None,
) -> FitResult:
    """Train one stage's model with `fit` into its folder, with the run's settings."""
    return fit(
        model,
        steps,
        settings=settings,
        seed=seed,
        out_dir=stage_dir(ctx.run_dir, stage, seed),
        accelerator=ctx.accelerator,
        resume=ctx.resume,
        label=label(stage, seed),
        quiet=ctx.quiet,
        tensorboard=ctx.recipe.output.tensorboard,
        console=ctx.console,
        extras=extras,
    )


def label(stage: str, seed: int) -> str:
    """How logs and errors name a stage."""
    return f"{stage} seed {seed}"


# ------------------------------------------------------------------------ the run


@contextmanager
def run_folder(
    recipe: Any,
    run_dir: Path,
    accelerator: Accelerator,
    *,
    resume: bool,
    overwrite: bool,
    setup: Callable[[], T] | None = None,
) -> Iterator[T | None]:
    """Claim the run folder and mark it running (main process); a failure inside the
    block marks it failed, with the error, and goes on up. `setup` (reading the data)
    runs after the claim and before anything is written: when it fails, a folder being
    resumed is left exactly as it was. The block receives what it returns."""
    if accelerator.is_main_process:
        claim_run_dir(run_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    prepared = setup() if setup is not None else None
    if accelerator.is_main_process:
        atomic_write_text(
            run_dir / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
        )
        write_status(run_dir, "running")
    accelerator.wait_for_everyone()
    try:
        yield prepared
    except BaseException as exc:
        if accelerator.is_main_process:
            write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise


def finish_run(
    run_dir: Path, accelerator: Accelerator, write_report: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """Every stage done: the report from the run folder's files, and status finished."""
    accelerator.wait_for_everyone()
    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        results = write_report(run_dir)
        write_status(run_dir, "finished")
    return results


def make_accelerator(precision: str) -> Accelerator:
    """One Accelerator per process. Launched as several processes on a machine without
    a GPU (`accelerate launch --num_processes 2`, torchrun), Accelerate only forms a
    gloo process group when told to use the CPU, so say so."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION[precision],
        cpu=several and not torch.cuda.is_available(),
    )
    refuse_fsdp(accelerator.distributed_type)
    return accelerator


def refuse_fsdp(distributed_type: DistributedType) -> None:
    """Stop before training under FSDP: the loss is FSDP-ready, but weights and
    checkpoints are saved from the unwrapped module, which FSDP leaves as flat shards,
    so a run would end with files that do not load."""
    if distributed_type == DistributedType.FSDP:
        raise TrainingError(
            "this launch uses FSDP (accelerate config distributed_type: FSDP); kdistill "
            "does not save FSDP-sharded weights and checkpoints yet, so the run would write "
            "files that do not load. Launch with DDP instead (accelerate launch --multi_gpu "
            "--num_processes N ...), which keeps a whole copy of the student per device; "
            "README 'Scale' says what is FSDP-ready"
        )


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    status_path = run_dir / "run.json"
    if run_dir.exists() and any(run_dir.iterdir()):
        status = _read_status(status_path)
        if overwrite:
            for child in run_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif status is None:
            raise RunDirError(
                f"output folder {run_dir} is not empty and holds no kdistill run; choose another "
                "--output-dir, or pass --overwrite to clear it"
            )
        elif status.get("status") == "finished" and not resume:
            raise RunDirError(
                f"output folder {run_dir} already holds a finished run "
                f"({status.get('finished', 'earlier')}); pass --overwrite to replace it, "
                "--resume to add missing stages, or choose another --output-dir. "
                f"`kdistill report {run_dir}` rebuilds its report"
            )
        elif status.get("status") != "finished" and not resume:
            raise RunDirError(
                f"output folder {run_dir} holds an unfinished run (status {status.get('status')}); "
                "pass --resume to continue it from its last checkpoint, or --overwrite to start over"
            )
    run_dir.mkdir(parents=True, exist_ok=True)


def _read_status(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {"status": "unknown"}


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    path = run_dir / "run.json"
    record = _read_status(path) or {"started": _now()}
    record.update(status=status, kdistill=__version__, argv=sys.argv)
    record["finished" if status == "finished" else "updated"] = _now()
    # a record describes the latest attempt: no "finished" while failed, no stale error
    if status != "finished":
        record.pop("finished", None)
    record.pop("error", None)
    if error:
        record["error"] = error
    atomic_write_json(path, record)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def resolve_weights(path_text: str | Path) -> Path:
    """A weights file, a stage folder (holding model.safetensors) or a run folder (its teacher)."""
    path = Path(path_text)
    candidates = [
        path,
        path / "model.safetensors",
        path / "teacher" / "seed0" / "model.safetensors",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no weights found at {path}: looked for {', '.join(str(c) for c in candidates)}. "
        "Point to a .safetensors file, a stage folder or a finished run folder"
    )
