"""What every run and every stage of every task does the same way.

A task's pipeline (`kdistill.tasks.classification.pipeline` for classification, `kdistill.tasks.causal_lm.pipeline` for
causal language models) names its stages in a `StageTable` and says what each trains
and measures. Written once here: the order the stages run in (`run_stages`), the
process setup (`make_accelerator`), the run folder (`run_folder`: claimed,
recipe.yaml, run.json's status running / failed / finished), a stage's folder
(<run>/<stage>/seed<k>; one whose eval.json and model.safetensors are both there
finished earlier, and a resumed run reuses it), and training a stage with `fit`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from accelerate import Accelerator, DistributedType
from rich.console import Console
from torch import nn

from kdistill import __version__
from kdistill.checkpoint import atomic_write_json, atomic_write_text, load_weights, save_weights
from kdistill.errors import CheckpointError, RecipeError, RunDirError, TrainingError
from kdistill.lock import LOCK, hold_folder
from kdistill.steps import TrainSteps
from kdistill.train import FitResult, fit

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class RunOptions:
    """How a run was asked for: `kdistill run`'s options, the same for every task."""

    output_dir: str | Path | None = None
    data_dir: str | Path | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    console: Console | None = None
    # told of every epoch record of every trained stage: (stage, seed, record); may
    # raise to stop the run (`kdistill tune` stops a trial that lags the others)
    on_epoch: Callable[[str, int, dict[str, Any]], None] | None = None


@dataclass
class RunContext:
    """What the stages of one run share; a task's context adds its data to it."""

    recipe: Any
    run_dir: Path
    accelerator: Accelerator
    options: RunOptions
    console: Console
    # (k, n): this stage is the k-th of the run's n (the progress bar shows it)
    position: tuple[int, int] | None = field(default=None, kw_only=True)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def resume(self) -> bool:
        return self.options.resume

    @property
    def quiet(self) -> bool:
        return self.options.quiet

    def shared(self) -> dict[str, Any]:
        """These fields by name, to build a task's context from them."""
        return {f.name: getattr(self, f.name) for f in fields(RunContext)}


Stage = Callable[[Any, str, int, Any], Any]
"""One stage: (the run's context, the stage's name, the seed, its guide: the model
that teaches it, or None) -> the guide it leaves for the next stage of a chain."""


@dataclass(frozen=True)
class StageTable:
    """A task's stages by name, in the order they run.

    `teacher` stages run once per teacher seed, each guided by the one before (the
    teacher, then a teacher assistant): their last result guides that seed's students.
    The teacher stage itself runs whenever a later stage needs a teacher, listed or not
    (unlisted, it loads teacher.checkpoint or a pretrained model and measures it once).
    `student` stages run per seed in order, each guided by the seed's teacher (or the
    first seed's, when there is one teacher); `chained` stages repeat for born-again
    generations, generation g guided by generation g-1 (folders <stage>_gen<g>).
    """

    teacher: dict[str, Stage]
    student: dict[str, Stage]
    chained: frozenset[str] = frozenset()


def run_stages(
    ctx: RunContext, table: StageTable, *, teacher_seeds: list[int], generations: int = 1
) -> None:
    """Run the recipe's stages of `table`: the teacher side for each of `teacher_seeds`
    (none: no stage needs a teacher), then the student side for each of the recipe's
    seeds."""
    listed = set(ctx.recipe.stages)
    teacher_side = [n for n in table.teacher if n == "teacher" or n in listed]
    student_side = [n for n in table.student if n in listed]
    total = len(teacher_seeds) * len(teacher_side) + len(ctx.recipe.seeds) * sum(
        generations if n in table.chained else 1 for n in student_side
    )
    done = 0

    def run(stage: Stage, name: str, seed: int, guide: Any) -> Any:
        nonlocal done
        done += 1
        ctx.position = (done, total)
        return stage(ctx, name, seed, guide)

    guides: dict[int, Any] = {}
    for seed in teacher_seeds:
        guide = None
        for name in teacher_side:
            guide = run(table.teacher[name], name, seed, guide)
        guides[seed] = guide
    for seed in ctx.recipe.seeds:
        guide = guides.get(seed) or next(iter(guides.values()), None)
        for name in student_side:
            stage = table.student[name]
            if name not in table.chained:
                run(stage, name, seed, guide)
                continue
            chain = guide
            for generation in range(1, generations + 1):
                chain = run(
                    stage, name if generation == 1 else f"{name}_gen{generation}", seed, chain
                )


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
    teacher: str | None = None,
) -> FitResult:
    """Train one stage's model with `fit` into its folder, with the run's settings.
    `teacher` says where the stage's teacher signal comes from (the progress bar shows
    it: "live", "cache")."""
    where = [f"stage {ctx.position[0]} of {ctx.position[1]}"] if ctx.position else []
    if teacher:
        where.append(f"teacher {teacher}")
    return fit(
        model,
        steps,
        settings=settings,
        seed=seed,
        out_dir=stage_dir(ctx.run_dir, stage, seed),
        accelerator=ctx.accelerator,
        resume=ctx.resume,
        label=label(stage, seed),
        description=" · ".join([label(stage, seed), *where]) if where else None,
        quiet=ctx.quiet,
        tensorboard=ctx.recipe.output.writes_tensorboard,
        console=ctx.console,
        extras=extras,
        on_epoch=(
            functools.partial(ctx.options.on_epoch, stage, seed) if ctx.options.on_epoch else None
        ),
        stages_after=ctx.position[1] - ctx.position[0] if ctx.position else 0,
    )


def finish_stage(
    ctx: RunContext,
    stage: str,
    seed: int,
    model: M,
    *,
    measure: Callable[[M], dict[str, Any]],
    best_by: tuple[str, bool],
    train_seconds: float,
    record: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    main_only: Callable[[], dict[str, Any]] = dict,
    save: Callable[[Path], None],
    summary: Callable[[dict[str, Any]], str],
) -> None:
    """Measure a trained stage's last weights and, when fit kept them, its best-on-
    validation weights (`best_by`: the metric of metrics.jsonl and whether higher is
    better; the earliest epoch wins a tie), each once; the main process then writes the
    stage folder: model.safetensors, what `save` adds, and eval.json last (a folder with
    eval.json is finished). eval.json holds stage, seed, `record`, the measurements,
    best, epochs, train_seconds, `after` and `main_only()` (costs, samples), in order."""
    folder = stage_dir(ctx.run_dir, stage, seed)
    evaluation: dict[str, Any] = {"stage": stage, "seed": seed, **(record or {})}
    evaluation.update(measure(model))
    evaluation["best"] = None
    metrics = read_metrics(folder / "metrics.jsonl")
    evaluation["epochs"] = max((m["epoch"] for m in metrics), default=0)
    if (folder / "best.safetensors").exists():
        best = copy.deepcopy(model)
        load_weights(best, folder / "best.safetensors")
        evaluation["best"] = {"epoch": best_epoch(metrics, *best_by), **measure(best)}
    evaluation["train_seconds"] = round(train_seconds, 3)
    evaluation.update(after or {})
    if ctx.is_main:
        evaluation.update(main_only())
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(model, folder / "model.safetensors")
        save(folder)
        atomic_write_json(folder / "eval.json", evaluation)
        ctx.console.log(f"{stage} seed {seed}: {summary(evaluation)}, {train_seconds:.0f}s")
    ctx.accelerator.wait_for_everyone()


def best_epoch(metrics: list[dict[str, Any]], key: str, higher_is_better: bool) -> int | None:
    """The epoch of the best validation score among the epoch records (the earliest of
    equal ones), as fit chose the weights it kept in best.safetensors."""
    sign = 1.0 if higher_is_better else -1.0
    scored = [m for m in metrics if key in m]
    if not scored:
        return None
    return int(max(scored, key=lambda m: (sign * m[key], -m["epoch"]))["epoch"])


def label(stage: str, seed: int) -> str:
    """How logs and errors name a stage."""
    return f"{stage} seed {seed}"


# ------------------------------------------------------------------------ the run


def run_dir_of(recipe: Any, output_dir: str | Path | None) -> Path:
    """The run folder: the one asked for, else output.dir, else runs/<recipe name>."""
    return Path(output_dir or recipe.output.dir or Path("runs") / recipe.name)


def log_start(ctx: RunContext, data: str) -> None:
    """The run's first log line: where it writes, its data (`data`), its processes."""
    if ctx.is_main:
        ctx.console.log(
            f"run {ctx.recipe.name} → {ctx.run_dir} | {data} | "
            f"{ctx.accelerator.num_processes} process(es) on {ctx.accelerator.device}"
        )


def require_teacher(recipe: Any) -> Any:
    """The recipe's teacher section, for commands that need one (kdistill cache)."""
    if recipe.teacher is None:
        raise RecipeError(
            f"recipe {recipe.name!r} has no teacher section, so there is no teacher to cache; "
            "add teacher: {model: ...} (and train it with the teacher stage)"
        )
    return recipe.teacher


def trained_teacher(run_dir: Path, seed: int) -> Path:
    """The weights the run folder's teacher stage wrote for `seed`; an error that says
    how to get them when there are none."""
    weights = stage_dir(run_dir, "teacher", seed) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(
            f"no trained teacher at {weights}; run the teacher stage first "
            "(kdistill run RECIPE --set 'stages=[teacher]') or set teacher.checkpoint"
        )
    return weights


@contextmanager
def open_run(
    recipe: Any, options: RunOptions, *, setup: Callable[[], T] | None = None
) -> Iterator[tuple[RunContext, T | None]]:
    """The run's process setup and its folder (`run_folder`), as one context: the block
    receives the run's shared context and what `setup` returned."""
    console = options.console or Console(stderr=True)
    accelerator = make_accelerator(recipe.train.precision)
    run_dir = run_dir_of(recipe, options.output_dir)
    with run_folder(
        recipe,
        run_dir,
        accelerator,
        resume=options.resume,
        overwrite=options.overwrite,
        setup=setup,
        note=console.log,
    ) as prepared:
        yield RunContext(recipe, run_dir, accelerator, options, console), prepared


@contextmanager
def run_folder(
    recipe: Any,
    run_dir: Path,
    accelerator: Accelerator,
    *,
    resume: bool,
    overwrite: bool,
    setup: Callable[[], T] | None = None,
    note: Callable[[str], object] | None = None,
) -> Iterator[T | None]:
    """Hold the run folder's lock (`kdistill.lock`; main process), claim the folder and
    mark it running; a failure inside the block marks it failed, with the error, and
    goes on up. `setup` (reading the data) runs after the claim and before anything is
    written: when it fails, a folder being resumed is left exactly as it was. The block
    receives what it returns. `note` is told of a stale lock taken over."""
    main = accelerator.is_main_process
    with hold_folder(run_dir, note=note) if main else contextlib.nullcontext():
        if main:
            claim_run_dir(run_dir, resume=resume, overwrite=overwrite)
        accelerator.wait_for_everyone()
        prepared = setup() if setup is not None else None
        if main:
            atomic_write_text(
                run_dir / "recipe.yaml",
                yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),
            )
            write_status(run_dir, "running")
        accelerator.wait_for_everyone()
        try:
            yield prepared
        except BaseException as exc:
            if main:
                with contextlib.suppress(OSError):  # a full disk fails this write too
                    write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
            raise


def finish_run(ctx: RunContext, write_report: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Every stage done: the report from the run folder's files, and status finished."""
    ctx.accelerator.wait_for_everyone()
    results: dict[str, Any] = {}
    if ctx.is_main:
        results = write_report(ctx.run_dir)
        write_status(ctx.run_dir, "finished")
        if ctx.recipe.output.plots:
            from kdistill.report_html import write_run_html

            try:
                write_run_html(ctx.run_dir)
            except Exception as exc:  # the page is a view of files already written
                ctx.console.log(f"[yellow]report.html not written: {type(exc).__name__}: {exc}")
        if "mlflow" in ctx.recipe.output.track:
            from kdistill.track import log_to_mlflow

            try:
                where = log_to_mlflow(ctx.run_dir, ctx.recipe)
                ctx.console.log(f"mlflow: run logged to {where}")
            except Exception as exc:  # the run's files are written; the tracker is a copy
                ctx.console.log(f"[yellow]mlflow logging failed: {type(exc).__name__}: {exc}")
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
    held = [child for child in run_dir.iterdir() if child.name != LOCK] if run_dir.exists() else []
    if held:
        status = _read_status(status_path)
        if overwrite:
            for child in held:
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
    record.update(status=status, kdistill=__version__, argv=sys.argv, environment=_environment())
    record["finished" if status == "finished" else "updated"] = _now()
    # a record describes the latest attempt: no "finished" while failed, no stale error
    if status != "finished":
        record.pop("finished", None)
    record.pop("error", None)
    if error:
        record["error"] = error
    atomic_write_json(path, record)


def _environment() -> dict[str, Any]:
    """What the numbers of a run depend on besides the recipe (for the report)."""
    import platform

    import accelerate

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def resolve_measurable(path_text: str | Path) -> Path:
    """What `kdistill eval` measures at a path: a quantize stage's INT8 ONNX file
    (<stage>/export/model.int8.onnx, with model.json beside it), else `resolve_weights`."""
    int8 = Path(path_text) / "export" / "model.int8.onnx"
    if int8.is_file() and int8.with_name("model.json").is_file():
        return int8
    return resolve_weights(path_text)


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
