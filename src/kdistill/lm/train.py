"""`fit_lm`: the language-model training loop, on Hugging Face Accelerate.

One loop serves the teacher, baseline and distill stages. Data are packed token
sequences in memory (N, seq_len + 1). Each optimizer step takes `batch_size` sequences
of a per-epoch seeded permutation; each process takes its share, split into
`grad_accum` micro-batches. The step's loss is

    L = (w_ce · Σ CE + w_div · Σ D) / (counted tokens of the whole step, all processes)

where the sums run over this micro-batch's counted tokens (label ≠ -100). Every
process knows the step's global index list, so it computes the denominator itself;
DDP averages gradients over processes, so each process scales by world size. The
gradient is therefore the same however the batch is split over processes and
accumulation steps.

The student's forward returns final hidden states; the divergence and the
cross-entropy are computed by `kdistill.losses.lm.chunked_divergence` from them and the
output layer, a chunk of tokens at a time, so no (B, T, V) float32 logits exist.
Checkpoints (`kdistill.checkpoint`) hold everything needed to resume mid-epoch and
reach the same weights as an uninterrupted run.

Rows need not be packed text: with `train_labels` (N, seq_len) each row brings its own
labels, -100 where a token does not count (the sequence-level KD stage and `data.pairs`
train on prompt/completion rows whose prompt and padding do not count); `val_labels`
does the same for validation, so its loss per token is over the counted tokens only.

On-policy steps (GKD, Agarwal et al. 2024; `on_policy`): at optimizer step k the loop
draws u from a generator seeded by (seed, k) alone; if u < on_policy.probability (λ),
every sequence of the step is replaced by the student's own continuation of its first
`prompt_tokens` tokens (`on_policy_batch`: sampled without gradient, each row from its
own seeded numbers), the live teacher scores that text, and only the written tokens
count. The cross-entropy term, if any, is left out on those steps (it would train the
student on its own samples). λ = 0 is the off-policy loop exactly; the draws and the
text repeat after a resume.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.console import Console
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute

from kdistill.checkpoint import (
    latest_training_state,
    load_training_state,
    save_training_state,
    save_weights,
)
from kdistill.data.lm_text import IGNORE_INDEX
from kdistill.errors import TrainingError
from kdistill.lm.generate import derived_seed, generate, row_uniforms
from kdistill.lm.models import CausalLM
from kdistill.lm.recipe import DIVERGENCES, LMLossTerm, LMTrainConfig, OnPolicyConfig
from kdistill.lm.teachers import LiveLMTeacher, LMTeacherSignal
from kdistill.losses.lm import CHUNK_ELEMENTS, chunked_divergence
from kdistill.recipe import ScheduleOrNumber
from kdistill.schedules import schedule_value
from kdistill.train import (
    make_optimizer,
    make_scheduler,
    progress_bar,
    raise_non_finite,
    truncate_metrics,
)


@dataclass(frozen=True)
class LMObjective:
    """w_ce · cross-entropy + w_div · divergence (either may be absent)."""

    ce_weight: ScheduleOrNumber | None = None
    divergence: LMLossTerm | None = None

    @classmethod
    def of(cls, terms: list[LMLossTerm]) -> LMObjective:
        ce = next((t.weight for t in terms if t.loss == "cross_entropy"), None)
        return cls(ce, next((t for t in terms if t.is_divergence), None))

    @property
    def needs_teacher(self) -> bool:
        return self.divergence is not None

    def without_cross_entropy(self) -> LMObjective:
        return LMObjective(None, self.divergence)

    def at(self, progress: float) -> tuple[float, float, float]:
        """(w_ce, w_div, temperature) at training progress in [0, 1]."""
        w_ce = schedule_value(self.ce_weight, progress) if self.ce_weight is not None else 0.0
        if self.divergence is None:
            return w_ce, 0.0, 1.0
        w_div = schedule_value(self.divergence.weight, progress)
        temperature = schedule_value(self.divergence.temperature or 1.0, progress)
        return w_ce, w_div, temperature


@dataclass
class LMFitResult:
    epochs_run: int
    steps: int
    tokens: int
    seconds: float
    best_epoch: int | None
    best_val_loss: float | None
    stopped_early: bool


# ----------------------------------------------------------------------- losses


def chunked_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Σ over counted tokens of −log softmax(h Wᵀ + b)[label], in float32.

    The logits of `chunk_size` tokens exist at a time; each chunk's are recomputed in
    the backward pass (activation checkpointing) instead of being kept. Shapes: hidden
    (B, T, H), labels (B, T) with -100 where a token does not count. Returns ().
    """
    rows = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1)  # (N,)
    counted = flat_labels != IGNORE_INDEX
    if not counted.all():
        rows, flat_labels = rows[counted], flat_labels[counted]
    if len(flat_labels) == 0:
        return hidden.sum().float() * 0.0  # zero, with zero gradients
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // head_weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(flat_labels), chunk):
        piece = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + recompute(
                _cross_entropy_sum,
                rows[piece],
                head_weight,
                head_bias,
                flat_labels[piece],
                use_reentrant=False,
            )
        else:
            total = total + _cross_entropy_sum(
                rows[piece], head_weight, head_bias, flat_labels[piece]
            )
    return total


def _cross_entropy_sum(rows: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    logits = F.linear(rows.to(weight.dtype), weight, bias).float()  # (c, V)
    return F.cross_entropy(logits, labels, reduction="sum")


def step_losses(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    *,
    objective: LMObjective,
    progress: float,
    teacher: dict[str, Tensor | None] | None,
    vocab_size: int,
    chunk_size: int | None,
) -> tuple[Tensor, dict[str, float]]:
    """The micro-batch's summed objective (differentiable) and its summed terms.

    hidden: the student's final hidden states (B, T, H); weight (V, H), bias (V,): its
    output layer, which turns them into logits a chunk of tokens at a time. The loop
    calls this inside the student's forward (`CausalLM.forward(head_loss=...)`)."""
    w_ce, w_div, temperature = objective.at(progress)
    if objective.divergence is None:
        ce = chunked_cross_entropy(hidden, weight, bias, labels, chunk_size=chunk_size)
        return w_ce * ce, {"ce": float(ce.detach())}
    assert teacher is not None
    term = objective.divergence
    out = chunked_divergence(
        hidden,
        weight,
        bias,
        labels=labels,
        kind=DIVERGENCES[term.loss],  # type: ignore[arg-type]
        beta=term.params.get("beta", 0.5),
        alpha=term.params.get("alpha", 0.1),
        temperature=temperature,
        vocab_size=vocab_size,
        with_cross_entropy=w_ce > 0,
        chunk_size=chunk_size,
        reduction="sum",
        **teacher,  # type: ignore[arg-type]
    )
    total = w_div * out.divergence
    parts: dict[str, float] = {term.loss: float(out.divergence.detach())}
    if out.cross_entropy is not None:
        total = total + w_ce * out.cross_entropy
        parts["ce"] = float(out.cross_entropy.detach())
    return total, parts


# ----------------------------------------------------------------------- on-policy


def is_on_policy_step(probability: float, *, seed: int, step: int) -> bool:
    """Whether optimizer step `step` trains on the student's own text: u < probability,
    with u ~ U[0, 1) from a generator seeded by (seed, step) alone, so every process and
    a resumed run draw the same. probability 0: never; 1: always."""
    if probability <= 0:
        return False
    if probability >= 1:
        return True
    generator = torch.Generator().manual_seed(derived_seed("on-policy step", seed, step))
    return float(torch.rand((), generator=generator, dtype=torch.float64)) < probability


def on_policy_batch(
    student: CausalLM,
    sequences: Tensor,
    rows: Tensor,
    settings: OnPolicyConfig,
    *,
    vocab_size: int,
    seed: int,
    step: int,
) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of an on-policy micro-batch, both (b, P + G - 1).

    sequences: (b, T + 1) training rows, of which the first P = settings.prompt_tokens
    tokens are the prompt; rows: their indices in the training split. The student
    continues each prompt by G = settings.max_new_tokens tokens (no gradient; row r of
    step k sampled from numbers seeded by (seed, k, r), so the text does not depend on
    how the step is split over processes and accumulation steps). With s = prompt +
    written tokens, inputs = s[:, :-1] and labels = s[:, 1:], -100 where the label is a
    prompt token: only the G written tokens count.
    """
    prompt_tokens, new_tokens = settings.prompt_tokens, settings.max_new_tokens
    uniforms = None
    if settings.temperature > 0:
        seeds = [derived_seed("on-policy text", seed, step, int(r)) for r in rows.tolist()]
        uniforms = row_uniforms(seeds, new_tokens, sequences.device)  # (b, G)
    written = generate(
        student,
        sequences[:, :prompt_tokens],
        settings,
        vocab_size=vocab_size,
        uniforms=uniforms,
    ).tokens  # (b, P + G)
    inputs, labels = written[:, :-1], written[:, 1:].clone()
    labels[:, : prompt_tokens - 1] = IGNORE_INDEX  # positions whose next token is the prompt
    return inputs, labels


def evaluate_lm(
    model: CausalLM,
    sequences: Tensor,
    *,
    batch_size: int,
    device: torch.device | str,
    chunk_size: int | None = None,
    labels: Tensor | None = None,
) -> tuple[float, int]:
    """(summed next-token NLL in nats, counted tokens) over rows (N, T + 1) whose inputs
    are row[:-1]; labels: (N, T), -100 where a token does not count (default row[1:])."""
    if labels is not None and labels.shape != sequences[:, 1:].shape:
        raise TrainingError(
            f"labels has shape {tuple(labels.shape)}; the rows {tuple(sequences.shape)} need "
            f"{tuple(sequences[:, 1:].shape)}"
        )
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size].to(device)
                if labels is None:
                    batch_labels = batch[:, 1:]
                else:
                    batch_labels = labels[start : start + batch_size].to(device)
                nll += float(
                    model(
                        batch[:, :-1],
                        head_loss=functools.partial(
                            chunked_cross_entropy, labels=batch_labels, chunk_size=chunk_size
                        ),
                    )
                )
                tokens += int((batch_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return nll, tokens


# ----------------------------------------------------------------------- the loop


def fit_lm(
    model: CausalLM,
    *,
    train: Tensor,
    val: Tensor,
    objective: LMObjective,
    teacher: LMTeacherSignal | None,
    settings: LMTrainConfig,
    vocab_size: int,
    seed: int,
    out_dir: Path,
    accelerator: Accelerator,
    resume: bool = False,
    label: str = "train",
    quiet: bool = False,
    console: Console | None = None,
    train_labels: Tensor | None = None,
    val_labels: Tensor | None = None,
    on_policy: OnPolicyConfig | None = None,
) -> LMFitResult:
    """Train `model` in place; write metrics.jsonl, checkpoints/, best.safetensors in out_dir.

    train, val: packed sequences (N, seq_len + 1). vocab_size: the tokenizer's size, the
    range the divergence compares over. Validation loss per token is measured at each
    epoch end (and every settings.eval_every steps); the best epoch's weights go to
    best.safetensors. train_labels: (N, seq_len) labels of the training rows, -100 where
    a token does not count (default: train[:, 1:]); val_labels: the same for `val`, so
    the validation loss counts only those tokens. on_policy: train a share of the steps
    on the student's own continuations, scored by the (live) teacher (module docstring).
    """
    console = console or Console(stderr=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main, device = accelerator.is_main_process, accelerator.device
    n_train, batch = len(train), settings.batch_size
    steps_per_epoch = n_train // batch
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{label}: train.batch_size ({batch} sequences) is larger than the training split "
            f"({n_train} sequences); lower train.batch_size or data.seq_len, or add text"
        )
    if batch // world < settings.grad_accum:
        raise TrainingError(
            f"{label}: {batch} sequences per step over {world} processes leave fewer than one "
            f"sequence per micro-batch at train.grad_accum = {settings.grad_accum}; lower grad_accum"
        )
    total_steps = settings.epochs * steps_per_epoch
    if objective.needs_teacher and teacher is None:
        raise TrainingError(f"{label}: the objective needs a teacher, but none was given")
    if not objective.needs_teacher:
        teacher = None  # never run a teacher whose output no term reads
    if train_labels is not None and train_labels.shape != train[:, 1:].shape:
        raise TrainingError(
            f"{label}: train_labels has shape {tuple(train_labels.shape)}; the training rows "
            f"{tuple(train.shape)} need ({n_train}, {train.shape[1] - 1})"
        )
    if val_labels is not None and val_labels.shape != val[:, 1:].shape:
        raise TrainingError(
            f"{label}: val_labels has shape {tuple(val_labels.shape)}; the validation rows "
            f"{tuple(val.shape)} need ({len(val)}, {val.shape[1] - 1})"
        )
    if on_policy is not None and on_policy.probability > 0:
        if teacher is None:
            raise TrainingError(
                f"{label}: on_policy needs a teacher to score the student's text, and the "
                "objective has no divergence term"
            )
        if not isinstance(teacher, LiveLMTeacher):
            raise TrainingError(
                f"{label}: on_policy needs a live teacher (teacher.signal: live); a cache "
                "holds the teacher's outputs on the training sequences only and cannot score "
                "the tokens the student writes"
            )
        if on_policy.prompt_tokens + on_policy.max_new_tokens > train.shape[1] - 1:
            raise TrainingError(
                f"{label}: on_policy.prompt_tokens + max_new_tokens = "
                f"{on_policy.prompt_tokens + on_policy.max_new_tokens} is more than the "
                f"{train.shape[1] - 1} tokens of a training row"
            )

    def labels_of(rows: Tensor) -> Tensor:  # (b, seq_len), on the CPU
        return train[rows, 1:] if train_labels is None else train_labels[rows]

    optimizer = make_optimizer(model, settings.optimizer)
    scheduler = make_scheduler(optimizer, settings.lr_schedule, total_steps, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    student: CausalLM = accelerator.unwrap_model(model)
    torch.manual_seed(seed * 7919 + rank)  # dropout masks

    ckpt_dir, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    state: dict[str, Any] = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "tokens": 0,
        "best_val": math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "seconds": 0.0,
        "running": [0.0, 0],  # loss sum, tokens, of the current epoch
        "on_policy_steps": 0,  # of the current epoch
    }
    latest = latest_training_state(ckpt_dir) if resume else None
    if latest is not None:
        saved = load_training_state(latest, student)
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        torch.set_rng_state(saved.pop("torch_rng"))
        state.update(saved)
        if is_main:
            truncate_metrics(metrics_path, state["global_step"])
            console.log(f"{label}: resuming from {latest.name} (epoch {state['epoch'] + 1})")
    elif is_main and metrics_path.exists():
        metrics_path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter() - state["seconds"]
    stopped_early = False

    def log(record: dict[str, Any], line: str) -> None:
        if not is_main:
            return
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        (console if bar is None else bar.console).log(line)

    def validate() -> float:
        nll, tokens = evaluate_lm(
            student,
            val,
            batch_size=settings.eval_batch_size,
            device=device,
            chunk_size=settings.chunk_size,
            labels=val_labels,
        )
        return nll / max(tokens, 1)

    def checkpoint() -> None:
        state["seconds"] = time.perf_counter() - started
        if is_main:
            save_training_state(
                ckpt_dir,
                step=state["global_step"],
                model=student,
                state={
                    **state,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                },
            )
        accelerator.wait_for_everyone()

    with progress_bar(console, quiet or not is_main) as bar:
        task = bar.add_task(label, total=total_steps, info="") if bar else None
        if bar is not None and task is not None:
            bar.update(task, completed=state["global_step"])
        while state["epoch"] < settings.epochs and not stopped_early:
            epoch = state["epoch"]
            order = torch.randperm(
                n_train, generator=torch.Generator().manual_seed(seed * 1009 + epoch)
            )
            model.train()
            tick, first, tokens_since = time.perf_counter(), state["step_in_epoch"], 0
            for step in range(first, steps_per_epoch):
                step_rows = order[step * batch : (step + 1) * batch]  # the global batch
                own_text = on_policy is not None and is_on_policy_step(
                    on_policy.probability, seed=seed, step=state["global_step"]
                )
                if own_text:
                    assert on_policy is not None
                    step_tokens = len(step_rows) * on_policy.max_new_tokens
                    local_tokens = len(step_rows[rank::world]) * on_policy.max_new_tokens
                    step_objective = objective.without_cross_entropy()
                else:
                    step_tokens = int((labels_of(step_rows) != IGNORE_INDEX).sum())
                    # the tokens behind this process's share of the loss, for the logged mean
                    local_tokens = int((labels_of(step_rows[rank::world]) != IGNORE_INDEX).sum())
                    step_objective = objective
                scale = world / max(step_tokens, 1)
                progress = state["global_step"] / total_steps
                step_loss, terms = 0.0, dict[str, float]()
                micro_batches = step_rows[rank::world].chunk(settings.grad_accum)
                for i, rows in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        sequences = train[rows].to(device, non_blocking=True)
                        if own_text:
                            assert on_policy is not None
                            inputs, labels = on_policy_batch(
                                student,
                                sequences,
                                rows,
                                on_policy,
                                vocab_size=vocab_size,
                                seed=seed,
                                step=state["global_step"],
                            )
                        elif train_labels is None:
                            inputs, labels = sequences[:, :-1], sequences[:, 1:]
                        else:
                            inputs = sequences[:, :-1]
                            labels = train_labels[rows].to(device, non_blocking=True)
                        signal = None if teacher is None else teacher(inputs, rows)
                        head_loss = functools.partial(
                            step_losses,
                            labels=labels,
                            objective=step_objective,
                            progress=progress,
                            teacher=signal,
                            vocab_size=vocab_size,
                            chunk_size=settings.chunk_size,
                        )
                        with accelerator.autocast():  # the loss itself runs in float32
                            loss, parts = model(inputs, head_loss=head_loss)
                        accelerator.backward(loss * scale)
                    step_loss += float(loss.detach())
                    for name, value in parts.items():
                        terms[name] = terms.get(name, 0.0) + value
                if not math.isfinite(step_loss):
                    as_tensors = {name: torch.tensor(value) for name, value in terms.items()}
                    raise_non_finite(
                        label, step_loss, epoch, state["global_step"], ckpt_dir, as_tensors
                    )
                if settings.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["global_step"] += 1
                state["on_policy_steps"] += int(own_text)
                state["step_in_epoch"] = step + 1
                state["tokens"] += step_tokens
                state["running"][0] += step_loss
                state["running"][1] += local_tokens
                tokens_since += step_tokens
                if bar is not None and task is not None:
                    rate = tokens_since / max(time.perf_counter() - tick, 1e-9)
                    shown = "  ".join(
                        f"{k} {v / max(local_tokens, 1):.4f}" for k, v in terms.items()
                    )
                    bar.update(
                        task,
                        advance=1,
                        info=f"epoch {epoch + 1}/{settings.epochs}  loss/token "
                        f"{step_loss / max(local_tokens, 1):.4f} ({shown})  {rate:,.0f} tokens/s",
                    )
                if settings.eval_every and state["global_step"] % settings.eval_every == 0:
                    val_loss = validate()
                    log(
                        {
                            "epoch": epoch + 1,
                            "step": state["global_step"],
                            "split": "val",
                            "loss": val_loss,
                            "perplexity": _perplexity(val_loss),
                            "seconds": round(time.perf_counter() - started, 3),
                        },
                        f"{label} step {state['global_step']}: val loss/token {val_loss:.4f}",
                    )
                if (
                    settings.checkpoint_every
                    and state["global_step"] % settings.checkpoint_every == 0
                ):
                    checkpoint()

            # end of epoch: validation, metrics, best weights, early stopping, checkpoint
            loss_sum, seen = state["running"]
            val_loss = validate()
            record = {
                "epoch": epoch + 1,
                "step": state["global_step"],
                "split": "train",
                "loss": loss_sum / max(seen, 1),
                "tokens": state["tokens"],
                "lr": scheduler.get_last_lr()[0],
                "val_loss": val_loss,
                "val_perplexity": _perplexity(val_loss),
                "seconds": round(time.perf_counter() - started, 3),
            }
            if on_policy is not None:
                record["on_policy_steps"] = state["on_policy_steps"]
            min_delta = settings.early_stopping.min_delta if settings.early_stopping else 0.0
            if val_loss < state["best_val"] - min_delta:
                state.update(best_val=val_loss, best_epoch=epoch + 1, bad_epochs=0)
                if is_main:
                    save_weights(student, out_dir / "best.safetensors")
            else:
                state["bad_epochs"] += 1
            if settings.early_stopping and state["bad_epochs"] >= settings.early_stopping.patience:
                stopped_early = True
            log(
                record,
                f"{label} epoch {epoch + 1}/{settings.epochs}: train loss/token "
                f"{record['loss']:.4f}, val loss/token {val_loss:.4f} "
                f"(perplexity {record['val_perplexity']:.2f}) ({record['seconds']:.0f}s)",
            )
            state.update(epoch=epoch + 1, step_in_epoch=0, running=[0.0, 0], on_policy_steps=0)
            checkpoint()
    return LMFitResult(
        epochs_run=state["epoch"],
        steps=state["global_step"],
        tokens=state["tokens"],
        seconds=time.perf_counter() - started,
        best_epoch=state["best_epoch"] if state["best_epoch"] > 0 else None,
        best_val_loss=state["best_val"] if state["best_epoch"] > 0 else None,
        stopped_early=stopped_early,
    )


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows float64 past ~709
