"""`fit`: the one training loop of every stage of every task, on Hugging Face Accelerate.

The loop knows nothing of a task. The task hands it a `TrainSteps` object: the order
of the training rows in an epoch, what a step's loss is divided by, the loss of a
micro-batch of rows, and the validation score. `fit` owns the rest, once for every
task: resume, micro-batch accumulation with `no_sync`, the non-finite check,
clipping, the optimizer and learning-rate steps, checkpoints, best weights, early
stopping and metrics.jsonl.

Each optimizer step takes `batch_size` rows of a per-epoch seeded order; each process
takes its share, split into `grad_accum` micro-batches. A micro-batch's loss is a sum
(over samples, or over counted tokens) and is divided by the step's global count,
which every process knows, so the gradient is the same however the step is split
(processes × accumulation); DDP averages over processes, so each scales by the world
size. Checkpoints hold everything needed to resume mid-epoch and reach the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from kdistill.checkpoint import (
    Restored,
    latest_training_state,
    restore_training_state,
    save_training_state,
    save_weights,
)
from kdistill.errors import TrainingError
from kdistill.optim import make_optimizer, make_scheduler
from kdistill.recipe import TrainConfig
from kdistill.steps import (
    StepCount,
    Terms,
    TrainSteps,
    Validation,
    dropout_seed,
    order_seed,
    sum_terms,
)


class Trainee(nn.Module):
    """The student plus what trains with it and is dropped on export (projectors, CRD
    heads and memory). Checkpoints hold both; exported weights hold the student only."""

    def __init__(self, student: nn.Module, extras: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.extras = extras

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)


def student_of(model: nn.Module) -> nn.Module:
    return model.student if isinstance(model, Trainee) else model


def progress_bar(console: Console, quiet: bool) -> Progress | contextlib.nullcontext[None]:
    if quiet:
        return contextlib.nullcontext()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[run]}"),
        console=console,
        transient=True,
    )


def run_time_left(task: Any, stages_after: int) -> str:
    """The whole run's time left, at this stage's pace: what is left of this stage plus
    `stages_after` stages as long as this one (an estimate: a student stage after the
    teacher's is usually shorter)."""
    left = task.time_remaining
    if left is None or task.elapsed is None:
        return ""
    seconds = left + stages_after * (task.elapsed + left)
    hours, rest = divmod(int(seconds), 3600)
    return f"run ≈{hours}:{rest // 60:02d}:{rest % 60:02d} left ({stages_after} more stages)"


@dataclass
class FitResult:
    epochs_run: int
    steps: int
    units: int  # samples or counted tokens trained on, all processes
    seconds: float
    best_epoch: int | None
    best_score: float | None  # the validation score of the best epoch
    stopped_early: bool


@dataclass
class FitState:
    """The loop's counters; saved in every checkpoint with the task's own state."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    units: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    seconds: float = 0.0
    running_loss: float = 0.0  # of the current epoch, this process
    running_count: int = 0
    running_terms: dict[str, float] = dataclasses.field(default_factory=dict)  # unweighted

    def improved(self, score: float, higher_is_better: bool, min_delta: float) -> bool:
        if higher_is_better:
            return score > self.best_score + min_delta
        return score < self.best_score - min_delta


def fit(
    model: nn.Module,
    steps: TrainSteps,
    *,
    settings: TrainConfig,
    seed: int,
    out_dir: Path,
    accelerator: Accelerator,
    resume: bool = False,
    label: str = "train",
    description: str | None = None,
    quiet: bool = False,
    tensorboard: bool = False,
    console: Console | None = None,
    extras: nn.Module | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    stages_after: int = 0,
) -> FitResult:
    """Train `model` in place; write metrics.jsonl, checkpoints/, best.safetensors in out_dir.

    `extras` (projectors, loss modules with parameters or buffers) train with the
    model and are saved in its checkpoints, but not in best.safetensors. `on_epoch` is
    given each epoch's record (as metrics.jsonl has it) on the main process, after the
    epoch's checkpoint is written. `stages_after`: the run's stages still to come after
    this one; the progress bar then adds an estimate of the whole run's time left, at
    this stage's pace.
    """
    console = console or Console(stderr=True)
    steps_per_epoch, total_steps = _schedule(steps, settings, accelerator, label)
    trainee = Trainee(model, extras) if extras is not None and any(extras.children()) else model
    optimizer = make_optimizer(trainee, settings.optimizer)
    scheduler = make_scheduler(optimizer, settings.lr_schedule, total_steps, steps_per_epoch)
    prepared, optimizer = accelerator.prepare(trainee, optimizer)
    optimizer, backward = _unwrapped_optimizer(optimizer, accelerator), _backward_of(accelerator)
    torch.manual_seed(dropout_seed(seed, accelerator.process_index))
    state = FitState(best_score=-math.inf if steps.higher_is_better else math.inf)
    log = _MetricsLog(out_dir, label, settings.epochs, steps, accelerator, console, tensorboard)
    checkpoints = _Checkpoints(out_dir / "checkpoints", trainee, optimizer, scheduler, steps, state)
    latest = checkpoints.restore() if resume else None
    if latest is not None:
        log.resumed(state, latest)
    log.start(resumed=state.global_step > 0)
    started = time.perf_counter() - state.seconds

    def elapsed() -> float:
        return time.perf_counter() - started

    stopped_early = False
    with progress_bar(console, quiet or not accelerator.is_main_process) as bar:
        log.bar = bar
        task = (
            bar.add_task(description or label, total=total_steps, info="", run="") if bar else None
        )
        if bar is not None and task is not None:
            bar.update(task, completed=state.global_step)
        while state.epoch < settings.epochs and not stopped_early:
            epoch, tick = state.epoch, time.perf_counter()
            generator = torch.Generator().manual_seed(order_seed(seed, epoch))
            order = steps.epoch_order(generator, settings.batch_size)
            prepared.train()
            first, units_since = state.step_in_epoch, 0
            for step in range(first, steps_per_epoch):
                rows = order[step * settings.batch_size : (step + 1) * settings.batch_size]
                count, step_loss, parts = _optimizer_step(
                    prepared, rows, steps, state, settings, accelerator, optimizer, scheduler,
                    progress=state.global_step / total_steps, label=label,
                    checkpoint_folder=checkpoints.folder, backward=backward,
                )  # fmt: skip
                state.step_in_epoch = step + 1
                units_since += count.total
                log.step(state, count, step_loss, sum_terms(parts), optimizer.param_groups[0]["lr"])
                if bar is not None and task is not None:
                    rate = units_since / max(time.perf_counter() - tick, 1e-9)
                    info = log.step_info(epoch, count, step_loss, sum_terms(parts), rate)
                    bar.update(task, advance=1, info=info)
                    if stages_after:
                        bar.update(task, run=run_time_left(bar.tasks[task], stages_after))
                if settings.eval_every and state.global_step % settings.eval_every == 0:
                    log.validation(state, steps.validate(student_of(trainee)), elapsed())
                if settings.checkpoint_every and state.global_step % settings.checkpoint_every == 0:
                    log.flush_steps()
                    checkpoints.save(accelerator, elapsed())
            stopped_early = _end_epoch(
                state, steps, settings, log, trainee, scheduler, out_dir, accelerator,
                seconds=elapsed(), epoch_seconds=max(time.perf_counter() - tick, 1e-9),
            )  # fmt: skip
            log.flush_steps()
            checkpoints.save(accelerator, elapsed())
            if on_epoch is not None and accelerator.is_main_process and log.last is not None:
                on_epoch(log.last)
    log.close()
    return FitResult(
        epochs_run=state.epoch,
        steps=state.global_step,
        units=state.units,
        seconds=elapsed(),
        best_epoch=state.best_epoch if state.best_epoch > 0 else None,
        best_score=state.best_score if state.best_epoch > 0 else None,
        stopped_early=stopped_early,
    )


def _unwrapped_optimizer(
    optimizer: torch.optim.Optimizer, accelerator: Accelerator
) -> torch.optim.Optimizer:
    """The optimizer inside Accelerate's wrapper when the wrapper has nothing to do (no
    gradient scaler, no XLA): its step looks for an optional package and its zero_grad
    reads a signature on every call, about 0.3 ms a step on a CPU (BENCHMARKS.md §2)."""
    if accelerator.scaler is not None or accelerator.distributed_type == DistributedType.XLA:
        return optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _schedule(
    steps: TrainSteps, settings: TrainConfig, accelerator: Accelerator, label: str
) -> tuple[int, int]:
    """(optimizer steps per epoch, in all); refuses a batch the data or processes cannot fill."""
    batch, world = settings.batch_size, accelerator.num_processes
    steps_per_epoch = steps.num_rows // batch
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{label}: train.batch_size ({batch} {steps.unit[:-1]} rows) is larger than the "
            f"training split ({steps.num_rows} rows); lower train.batch_size or add data"
        )
    if batch // world < settings.grad_accum:
        raise TrainingError(
            f"{label}: {batch} rows per step over {world} processes leave fewer than one row "
            f"per micro-batch at train.grad_accum = {settings.grad_accum}; lower grad_accum"
        )
    return steps_per_epoch, settings.epochs * steps_per_epoch


def _optimizer_step(
    model: nn.Module,
    rows: torch.Tensor,
    steps: TrainSteps,
    state: FitState,
    settings: TrainConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    *,
    progress: float,
    label: str,
    checkpoint_folder: Path,
    backward: Callable[[torch.Tensor], None],
) -> tuple[StepCount, float, list[Terms]]:
    """One optimizer step over the global `rows`: this process's share in micro-batches.
    Returns the step's count, its summed loss and each micro-batch's terms (summed only
    where they are shown: `sum_terms`)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    share = rows if world == 1 else rows[rank::world]
    count = steps.count(rows, share, state.global_step)
    scale = world / max(count.total, 1)
    step_loss, parts = 0.0, list[Terms]()
    micro_batches = (share,) if settings.grad_accum == 1 else share.chunk(settings.grad_accum)
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss, terms = steps.loss(model, micro, progress=progress)
            backward(loss * scale)
        step_loss += float(loss.detach())
        parts.append(terms)
    if not math.isfinite(step_loss):
        raise_non_finite(
            label, step_loss, state.epoch, state.global_step, checkpoint_folder, sum_terms(parts)
        )
    if settings.grad_clip is not None:
        accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.units += count.total
    state.running_loss += step_loss
    state.running_count += count.local
    for name, value in sum_terms(parts).items():
        state.running_terms[name] = state.running_terms.get(name, 0.0) + value
    return count, step_loss, parts


def _backward_of(accelerator: Accelerator) -> Callable[[torch.Tensor], None]:
    """Accelerate's backward where it does more than `loss.backward()` (a gradient scaler,
    DeepSpeed, Megatron, its own accumulation); `loss.backward()` itself otherwise, which is
    what Accelerate would call, without dividing the loss by 1 first."""
    plain = (
        accelerator.scaler is None
        and accelerator.gradient_accumulation_steps == 1
        and accelerator.distributed_type
        not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    )
    return torch.Tensor.backward if plain else accelerator.backward


def _end_epoch(
    state: FitState,
    steps: TrainSteps,
    settings: TrainConfig,
    log: _MetricsLog,
    trainee: nn.Module,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    out_dir: Path,
    accelerator: Accelerator,
    *,
    seconds: float,
    epoch_seconds: float,
) -> bool:
    """Validation, the epoch record, best weights, early stopping; True to stop early."""
    epoch = state.epoch
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": state.global_step,
        "split": "train",
        "loss": state.running_loss / max(state.running_count, 1),
        # each term unweighted, so a baseline's and a distilled student's compare
        **{
            f"loss_{name}": total / max(state.running_count, 1)
            for name, total in state.running_terms.items()
        },
        "lr": scheduler.get_last_lr()[0],
        "seconds": round(seconds, 3),
        **steps.epoch_fields(state.units, epoch_seconds),
    }
    stop = False
    validation = steps.validate(student_of(trainee))
    if validation is not None:
        record.update(validation.fields)
        stopping = settings.early_stopping
        min_delta = stopping.min_delta if stopping else 0.0
        if state.improved(validation.score, steps.higher_is_better, min_delta):
            state.best_score, state.best_epoch, state.bad_epochs = (
                validation.score,
                epoch + 1,
                0,
            )
            if accelerator.is_main_process:
                save_weights(student_of(trainee), out_dir / "best.safetensors")
        else:
            state.bad_epochs += 1
        stop = stopping is not None and state.bad_epochs >= stopping.patience
    log.write(record, state.global_step)
    state.epoch, state.step_in_epoch = epoch + 1, 0
    state.running_loss, state.running_count, state.running_terms = 0.0, 0, {}
    return stop


class _Checkpoints:
    """checkpoints/step-<N>/: the trainee's weights, the optimizer, the schedule, the RNG,
    the loop's counters and the task's state."""

    def __init__(
        self,
        folder: Path,
        trainee: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        steps: TrainSteps,
        state: FitState,
    ) -> None:
        self.folder, self.trainee, self.optimizer, self.scheduler = (
            folder,
            trainee,
            optimizer,
            scheduler,
        )
        self.steps, self.state = steps, state

    def save(self, accelerator: Accelerator, seconds: float) -> None:
        self.state.seconds = seconds
        if accelerator.is_main_process:
            save_training_state(
                self.folder,
                step=self.state.global_step,
                model=self.trainee,
                state={
                    "loop": dataclasses.asdict(self.state),
                    "task": self.steps.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                },
            )
        accelerator.wait_for_everyone()

    def restore(self) -> Restored | None:
        """Load the newest intact checkpoint, if any (damaged newer ones are skipped)."""
        restored = restore_training_state(self.folder, self.trainee)
        if restored is None:
            return None
        saved = restored.state
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        self.steps.load_state_dict(saved["task"])
        for name, value in saved["loop"].items():
            setattr(self.state, name, value)
        return restored


class _MetricsLog:
    """metrics.jsonl, the log lines, TensorBoard (main process only)."""

    def __init__(
        self,
        out_dir: Path,
        label: str,
        epochs: int,
        steps: TrainSteps,
        accelerator: Accelerator,
        console: Console,
        tensorboard: bool,
    ) -> None:
        self.path, self.label, self.epochs, self.steps = (
            out_dir / "metrics.jsonl",
            label,
            epochs,
            steps,
        )
        self.is_main, self.console, self.out_dir = accelerator.is_main_process, console, out_dir
        self.tensorboard = tensorboard
        self.writer: Any = None
        self.bar: Progress | None = None
        self.last: dict[str, Any] | None = None  # the latest epoch record
        self.steps_path = out_dir / "steps.jsonl"
        self.pending: list[dict[str, Any]] = []  # step records not yet in steps.jsonl

    def resumed(self, state: FitState, restored: Restored) -> None:
        if self.is_main:
            truncate_metrics(self.path, state.global_step)
            truncate_metrics(self.steps_path, state.global_step)
            for skipped in restored.skipped:
                self.console.log(f"[yellow]{self.label}: skipped damaged checkpoint {skipped}")
            self.console.log(
                f"{self.label}: resuming from {restored.path.name} (epoch {state.epoch + 1})"
            )

    def start(self, *, resumed: bool) -> None:
        if self.is_main and not resumed:
            self.path.unlink(missing_ok=True)
            self.steps_path.unlink(missing_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.tensorboard and self.is_main:
            self.writer = _tensorboard_writer(self.out_dir)

    def write(self, record: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        if record.get("split") == "train":
            self.last = record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key in ("loss", "lr") or key.startswith(("val_", "loss_", "temperature_")):
                    self.writer.add_scalar(f"{self.label}/{key}", value, step)
        line = self.steps.describe(self.label, self.epochs, record)
        (self.console if self.bar is None else self.bar.console).log(line)

    def validation(self, state: FitState, validation: Validation | None, seconds: float) -> None:
        """A mid-epoch validation record (train.eval_every)."""
        if validation is None:
            return
        fields = {k.removeprefix("val_"): v for k, v in validation.fields.items()}
        record = {"epoch": state.epoch + 1, "step": state.global_step, "split": "val", **fields}
        self.write({**record, "seconds": round(seconds, 3)}, state.global_step)

    def step(
        self, state: FitState, count: StepCount, loss: float, terms: dict[str, float], lr: float
    ) -> None:
        """One optimizer step's record for steps.jsonl (written with the next checkpoint
        or epoch end): the main process's loss per sample or token, its terms, the lr."""
        if not self.is_main:
            return
        per = max(count.local, 1)
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch + 1}
        record["loss"] = loss / per
        record.update({f"loss_{name}": value / per for name, value in terms.items()})
        record["lr"] = lr
        self.pending.append(record)

    def flush_steps(self) -> None:
        """Append the step records to steps.jsonl (and TensorBoard's step/ scalars)."""
        if not self.is_main or not self.pending:
            return
        with open(self.steps_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.pending))
        if self.writer is not None:
            for record in self.pending:
                for key, value in record.items():
                    if key not in ("step", "epoch"):
                        self.writer.add_scalar(f"{self.label}/step/{key}", value, record["step"])
        self.pending = []

    def step_info(
        self, epoch: int, count: StepCount, loss: float, terms: dict[str, float], rate: float
    ) -> str:
        """The progress bar's text: the step's loss per sample or token, and its terms."""
        per = max(count.local, 1)
        shown = "  ".join(f"{name} {value / per:.4f}" for name, value in terms.items())
        return (
            f"epoch {epoch + 1}/{self.epochs}  loss/{self.steps.unit[:-1]} {loss / per:.4f} "
            f"({shown})  {rate:,.0f} {self.steps.unit}/s"
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def raise_non_finite(
    label: str, value: float, epoch: int, step: int, ckpt_dir: Path, terms: dict[str, float]
) -> None:
    last = latest_training_state(ckpt_dir)
    where = f"the last checkpoint before it is {last}" if last else "no checkpoint was written yet"
    parts = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    # Resuming from a checkpoint restores its optimizer, learning rate included, so a
    # lower lr only takes effect when the stage starts afresh.
    raise TrainingError(
        f"{label}: the loss became {value} at epoch {epoch + 1}, step {step + 1} ({parts}); "
        f"training stopped and {where}. Lower train.optimizer.lr or set train.grad_clip, "
        f"delete {ckpt_dir.parent} (its checkpoints keep the old learning rate), then run "
        "again with --resume to keep the stages that finished"
    )


def truncate_metrics(path: Path, global_step: int) -> None:
    """Drop lines a killed run wrote after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= global_step
    ]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _tensorboard_writer(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError(
            "output.tensorboard is true but the tensorboard package is not installed; "
            "pip install 'kdistill[tensorboard]' or set output.tensorboard: false"
        ) from None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))
