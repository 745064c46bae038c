"""`fit`: the training loop, on Hugging Face Accelerate.

One loop serves the teacher, baseline and distill stages: the objective decides
what is computed, the teacher (live or cached) supplies logits when the objective
needs them. Data stays in memory; each optimizer step takes `batch_size` samples
of a per-epoch seeded permutation, each process takes its share, and the share is
split into `grad_accum` micro-batches. Losses are summed and divided by the global
number of samples in the step, so the gradient is the same however the batch is
split (processes × accumulation). Checkpoints hold everything needed to resume
mid-epoch and reach the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
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
    latest_training_state,
    load_training_state,
    save_training_state,
    save_weights,
)
from kdistill.data import DataBundle, TextData
from kdistill.data.augment import jitter, random_crop, random_flip
from kdistill.errors import TrainingError
from kdistill.evaluate import predict, quality
from kdistill.losses.objective import LossInputs, Objective
from kdistill.recipe import LRScheduleConfig, OptimizerConfig, TrainConfig


class TeacherSignal(Protocol):
    """Logits (B, C) for an input batch (a tensor, or token ids and masks by name) and the
    batch's indices into the training split; `models` names the live modules (see
    kdistill.teachers)."""

    models: dict[str, nn.Module]

    def __call__(
        self, x: torch.Tensor | Mapping[str, torch.Tensor], indices: torch.Tensor
    ) -> torch.Tensor: ...


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


@dataclass
class FitResult:
    epochs_run: int
    steps: int
    seconds: float
    best_epoch: int | None
    best_val_accuracy: float | None
    stopped_early: bool


def make_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters, with torch's fused kernel
    where it applies: one pass over each parameter instead of a dozen elementwise ops.
    On CPU that makes an AdamW step over a 15.6 M-parameter text student 7-10× faster
    (BENCHMARKS.md §2); the arithmetic is the same to float rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = uses_fused_kernel(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
            fused=fused,
        )
    optim_cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optim_cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)


FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def uses_fused_kernel(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused optimizer kernels take these parameters: dense floating
    point tensors, all on one CPU or CUDA device. Anything else (sparse, MPS, a mix of
    devices) keeps the per-parameter implementation."""
    if not params:
        return False
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in FUSED_DEVICES
        and all(p.dtype in FUSED_DTYPES and not p.is_sparse for p in params)
    )


def lr_factor(cfg: LRScheduleConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate after `step` optimizer steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    p = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "linear":
        return 1.0 - p
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if cfg.name == "step":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    # onecycle (Smith 2018): up over the first 30%, cosine down to 1e-4 of the peak.
    if p < 0.3:
        return 0.04 + 0.96 * p / 0.3
    q = (p - 0.3) / 0.7
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * q))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRScheduleConfig, total: int, per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    base = optimizer.param_groups[0]["lr"]
    floor = cfg.min_lr / base if base else 0.0

    def factor(step: int) -> float:
        return max(lr_factor(cfg, step, total, per_epoch), floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        console=console,
        transient=True,
    )


def fit(
    model: nn.Module,
    *,
    data: DataBundle | TextData,
    objective: Objective,
    teacher: TeacherSignal | None,
    settings: TrainConfig,
    seed: int,
    out_dir: Path,
    accelerator: Accelerator,
    resume: bool = False,
    label: str = "train",
    quiet: bool = False,
    tensorboard: bool = False,
    console: Console | None = None,
    extras: nn.Module | None = None,
) -> FitResult:
    """Train `model` in place; write metrics.jsonl, checkpoints/, best.safetensors in out_dir.

    `extras` (projectors, loss modules with parameters or buffers) train with the
    model and are saved in its checkpoints, but not in best.safetensors.
    """
    console = console or Console(stderr=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    device = accelerator.device
    n_train, batch = len(data.train), settings.batch_size
    steps_per_epoch = n_train // batch
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{label}: train.batch_size ({batch}) is larger than the training split "
            f"({n_train} samples); lower train.batch_size"
        )
    total_steps = settings.epochs * steps_per_epoch
    if objective.needs_teacher and teacher is None:
        raise TrainingError(f"{label}: the objective needs a teacher, but none was given")
    if not objective.needs_teacher:
        teacher = None  # never run a teacher whose output no term reads

    student = model
    teacher_model = next(iter(getattr(teacher, "models", {}).values()), None)
    if extras is not None and len(list(extras.children())):
        model = Trainee(model, extras)
    optimizer = make_optimizer(model, settings.optimizer)
    scheduler = make_scheduler(optimizer, settings.lr_schedule, total_steps, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(seed * 7919 + rank)  # dropout masks
    augment_rng = torch.Generator().manual_seed(seed * 104729 + rank)

    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    state: dict[str, Any] = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_val": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
        "seconds": 0.0,
        "running": [0.0, 0],  # loss sum, samples, of the current epoch
    }
    latest = latest_training_state(ckpt_dir) if resume else None
    if latest is not None:
        saved = load_training_state(latest, accelerator.unwrap_model(model))
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        torch.set_rng_state(saved.pop("torch_rng"))
        augment_rng.set_state(saved.pop("augment_rng"))
        state.update(saved)
        if is_main:
            truncate_metrics(metrics_path, state["global_step"])
            console.log(f"{label}: resuming from {latest.name} (epoch {state['epoch'] + 1})")
    elif is_main and metrics_path.exists():
        metrics_path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    writer = _tensorboard_writer(out_dir) if tensorboard and is_main else None
    grad_accum = settings.grad_accum
    augment = settings.augment
    if augment.random and not data.is_image:
        raise TrainingError(
            f"{label}: train.augment (jitter, crop, flip) works on images; "
            f"this dataset's samples have shape {tuple(data.input_shape)}. Remove train.augment"
        )
    stopped_early = False
    train_x, train_y = data.train.x, data.train.y
    started = time.perf_counter() - state["seconds"]

    def checkpoint() -> None:
        state["seconds"] = time.perf_counter() - started
        if is_main:
            save_training_state(
                ckpt_dir,
                step=state["global_step"],
                model=accelerator.unwrap_model(model),
                state={
                    **state,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "augment_rng": augment_rng.get_state(),
                },
            )
        accelerator.wait_for_everyone()

    with progress_bar(console, quiet or not is_main) as bar:
        task = bar.add_task(label, total=total_steps, info="") if bar else None
        if bar is not None and task is not None:
            bar.update(task, completed=state["global_step"])
        while state["epoch"] < settings.epochs and not stopped_early:
            epoch = state["epoch"]
            tick = time.perf_counter()
            shuffle = torch.Generator().manual_seed(seed * 1009 + epoch)
            if isinstance(data, TextData):  # batches of similar lengths (bucket_batches)
                order = data.train_order(student, batch, shuffle)
            else:
                order = torch.randperm(n_train, generator=shuffle)
            model.train()
            first = state["step_in_epoch"]
            # throughput of this process: time drawing the order and building batches,
            # samples, text tokens
            data_seconds, samples, tokens, padded = time.perf_counter() - tick, 0, 0, 0
            for step in range(first, steps_per_epoch):
                share = order[step * batch : (step + 1) * batch][rank::world]
                micro_batches = share.chunk(grad_accum)
                progress = state["global_step"] / total_steps
                step_loss = 0.0
                terms: dict[str, torch.Tensor] = {}
                for i, idx in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        built = time.perf_counter()
                        samples += len(idx)
                        x: torch.Tensor | dict[str, torch.Tensor]  # the student's input
                        x_teacher: torch.Tensor | dict[str, torch.Tensor]
                        if isinstance(data, TextData):  # each model reads its own tokenization
                            x = _to(data.batch(student, "train", idx), device)
                            tokens += int(x["attention_mask"].sum())
                            padded += x["attention_mask"].numel()
                            x_teacher = x
                            if teacher_model is not None:
                                x_teacher = _to(data.batch(teacher_model, "train", idx), device)
                        else:
                            xb = train_x[idx]
                            if augment.jitter:
                                xb = jitter(xb, augment.jitter, augment_rng)
                            if augment.crop:
                                xb = random_crop(xb, augment.crop, augment_rng)
                            if augment.flip:
                                xb = random_flip(xb, augment_rng)
                            x = x_teacher = data.to_input(xb).to(device, non_blocking=True)
                        data_seconds += time.perf_counter() - built
                        y = train_y[idx].to(device, non_blocking=True)
                        teacher_logits = teacher(x_teacher, idx) if teacher is not None else None
                        with accelerator.autocast():
                            logits = model(**x) if isinstance(x, Mapping) else model(x)
                        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
                        total, parts = objective(
                            LossInputs(
                                logits.float(), y, teacher_logits, indices=idx, attention_mask=mask
                            ),
                            progress,
                        )
                        # sum over this micro-batch / global samples; DDP averages over processes
                        accelerator.backward(total * (world / batch))
                    step_loss += total.item()
                    for name, value in parts.items():
                        terms[name] = terms.get(name, 0.0) + value
                if not math.isfinite(step_loss):
                    raise_non_finite(label, step_loss, epoch, state["global_step"], ckpt_dir, terms)
                if settings.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["global_step"] += 1
                state["step_in_epoch"] = step + 1
                state["running"][0] += step_loss
                state["running"][1] += len(share)
                if bar is not None and task is not None:
                    rate = (step + 1 - first) * batch / max(time.perf_counter() - tick, 1e-9)
                    shown = "  ".join(f"{k} {float(v) / len(share):.4f}" for k, v in terms.items())
                    bar.update(
                        task,
                        advance=1,
                        info=f"epoch {epoch + 1}/{settings.epochs}  loss {step_loss / len(share):.4f}"
                        f" ({shown})  {rate:,.0f} samples/s",
                    )
                if (
                    settings.checkpoint_every
                    and state["global_step"] % settings.checkpoint_every == 0
                ):
                    checkpoint()

            # end of epoch: validation, metrics, best weights, early stopping, checkpoint
            loss_sum, seen = state["running"]
            epoch_seconds = max(time.perf_counter() - tick, 1e-9)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": state["global_step"],
                "split": "train",
                "loss": loss_sum / max(seen, 1),
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - started, 3),
                # this process, the steps run in this epoch (after a resume: since it)
                "samples_per_second": round(samples / epoch_seconds, 2),
                "data_share": round(data_seconds / epoch_seconds, 5),
            }
            if data.is_text and padded:
                record["tokens_per_second"] = round(tokens / epoch_seconds, 1)
                record["padding_share"] = round(1 - tokens / padded, 4)
            if len(data.val):
                val_x, val_input, val_order = data.eval_feed(student, "val")
                logits = predict(
                    student_of(accelerator.unwrap_model(model)),
                    val_x,
                    to_input=val_input,
                    order=val_order,
                    batch_size=settings.eval_batch_size,
                    device=device,
                )
                val = quality(logits, data.val.y)
                record.update(val_accuracy=val["accuracy"], val_nll=val["nll"])
                if val["accuracy"] > state["best_val"] + (
                    settings.early_stopping.min_delta if settings.early_stopping else 0.0
                ):
                    state.update(best_val=val["accuracy"], best_epoch=epoch + 1, bad_epochs=0)
                    if is_main:
                        save_weights(
                            student_of(accelerator.unwrap_model(model)),
                            out_dir / "best.safetensors",
                        )
                else:
                    state["bad_epochs"] += 1
                if (
                    settings.early_stopping
                    and state["bad_epochs"] >= settings.early_stopping.patience
                ):
                    stopped_early = True
            if is_main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key in ("loss", "lr", "val_accuracy", "val_nll"):
                        if key in record:
                            writer.add_scalar(f"{label}/{key}", record[key], state["global_step"])
                if quiet or bar is None:
                    console.log(_epoch_line(label, settings.epochs, record))
                else:
                    bar.console.log(_epoch_line(label, settings.epochs, record))
            state.update(epoch=epoch + 1, step_in_epoch=0, running=[0.0, 0])
            checkpoint()
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - started
    return FitResult(
        epochs_run=state["epoch"],
        steps=state["global_step"],
        seconds=seconds,
        best_epoch=state["best_epoch"] if state["best_epoch"] > 0 else None,
        best_val_accuracy=state["best_val"] if state["best_epoch"] > 0 else None,
        stopped_early=stopped_early,
    )


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _epoch_line(label: str, epochs: int, record: dict[str, Any]) -> str:
    line = f"{label} epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}"
    if "val_accuracy" in record:
        line += f", val accuracy {100 * record['val_accuracy']:.2f}%"
    rate = f"{record['samples_per_second']:,.0f} samples/s"
    if "tokens_per_second" in record:
        rate += f", {record['tokens_per_second']:,.0f} tokens/s"
    data = f"data {100 * record['data_share']:.1f}% of step time"
    return line + f" ({record['seconds']:.0f}s; {rate}; {data})"


def raise_non_finite(
    label: str, value: float, epoch: int, step: int, ckpt_dir: Path, terms: dict[str, torch.Tensor]
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
