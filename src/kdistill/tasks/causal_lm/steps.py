"""Causal language modelling: the training steps `fit` runs.

A row is a sequence of seq_len + 1 tokens, its inputs row[:-1]; labels are row[1:], or
a row's own labels (-100 where a token does not count: the prompt and padding of
prompt/completion rows, the sequence-level KD stage). The loss of a micro-batch is

    w_ce · Σ CE + w_div · Σ D

summed over its counted tokens, and `fit` divides it by the counted tokens of the
whole step (all processes), so the gradient does not depend on how the step is split.
The student's forward returns final hidden states; the cross-entropy and the
divergence are computed from them and the output layer a chunk of tokens at a time
(`kdistill.losses.lm_cross_entropy`, `kdistill.losses.lm_chunked`), so no (B, T, V) float32 logits exist. Validation: loss per
counted token (lower is better) and perplexity.

On-policy steps (GKD, Agarwal et al. 2024; `on_policy`): at optimizer step k the steps
draw u from a generator seeded by (seed, k) alone; if u < on_policy.probability (λ),
every sequence of the step is replaced by the student's own continuation of its first
`prompt_tokens` tokens (`on_policy_batch`: sampled without gradient, each row from its
own seeded numbers), the live teacher scores that text, and only the written tokens
count. The cross-entropy term, if any, is left out on those steps (it would train the
student on its own samples). λ = 0 is the off-policy loop exactly; the draws and the
text repeat after a resume.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from kdistill.data.lm_text import IGNORE_INDEX
from kdistill.errors import TrainingError
from kdistill.losses.lm_cross_entropy import chunked_cross_entropy
from kdistill.losses.lm_objective import LMObjective, step_losses
from kdistill.recipe.causal_lm import LMTrainConfig, OnPolicyConfig
from kdistill.steps import Placement, StepCount, Validation, autocast_of
from kdistill.tasks.causal_lm.generate import derived_seed, generate, row_uniforms
from kdistill.tasks.causal_lm.models import CausalLM
from kdistill.teachers import LiveLMTeacher, LMTeacherOutput, TeacherSignal


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


class LMSteps:
    """`kdistill.steps.TrainSteps` of a language-model stage.

    train, val: rows (N, seq_len + 1). vocab_size: the tokenizer's size, the range the
    divergence compares over. train_labels: (N, seq_len) labels of the training rows, -100
    where a token does not count (default: train[:, 1:]); val_labels: the same for `val`,
    so the validation loss counts only those tokens. on_policy: train a share of the
    steps on the student's own continuations, scored by the (live) teacher.
    """

    unit = "tokens"
    higher_is_better = False

    def __init__(
        self,
        student: CausalLM,
        *,
        train: Tensor,
        val: Tensor,
        objective: LMObjective,
        teacher: TeacherSignal[LMTeacherOutput] | None,
        settings: LMTrainConfig,
        vocab_size: int,
        accelerator: Placement,
        seed: int,
        label: str = "train",
        train_labels: Tensor | None = None,
        val_labels: Tensor | None = None,
        on_policy: OnPolicyConfig | None = None,
    ) -> None:
        _check_rows(label, train, train_labels, "train_labels", "training")
        _check_rows(label, val, val_labels, "val_labels", "validation")
        if objective.needs_teacher and teacher is None:
            raise TrainingError(f"{label}: the objective needs a teacher, but none was given")
        teacher = teacher if objective.needs_teacher else None  # never run an unread teacher
        if on_policy is not None and on_policy.probability > 0:
            _check_on_policy(label, on_policy, teacher, train)
        self.student, self.objective, self.teacher = student, objective, teacher
        self.train, self.val, self.train_labels, self.val_labels = (
            train,
            val,
            train_labels,
            val_labels,
        )
        self.settings, self.vocab_size, self.seed = settings, vocab_size, seed
        self.on_policy = on_policy
        self.device, self.autocast = accelerator.device, autocast_of(accelerator)
        self.num_rows = len(train)
        self.on_policy_steps = 0  # of the current epoch
        self._step = 0
        self._own_text = False

    def epoch_order(self, generator: torch.Generator, batch_size: int) -> Tensor:
        return torch.randperm(self.num_rows, generator=generator)

    def _labels_of(self, rows: Tensor) -> Tensor:  # (b, seq_len), on the CPU
        return self.train[rows, 1:] if self.train_labels is None else self.train_labels[rows]

    def count(self, rows: Tensor, share: Tensor, step: int) -> StepCount:
        self._step = step
        self._own_text = self.on_policy is not None and is_on_policy_step(
            self.on_policy.probability, seed=self.seed, step=step
        )
        self.on_policy_steps += int(self._own_text)
        if self._own_text:
            assert self.on_policy is not None
            written = self.on_policy.max_new_tokens
            return StepCount(total=len(rows) * written, local=len(share) * written)
        return StepCount(
            total=int((self._labels_of(rows) != IGNORE_INDEX).sum()),
            # the tokens behind this process's share of the loss, for the logged mean
            local=int((self._labels_of(share) != IGNORE_INDEX).sum()),
        )

    def loss(
        self, model: torch.nn.Module, rows: Tensor, *, progress: float
    ) -> tuple[Tensor, dict[str, float]]:
        sequences = self.train[rows].to(self.device, non_blocking=True)
        objective = self.objective
        if self._own_text:
            assert self.on_policy is not None
            inputs, labels = on_policy_batch(
                self.student,
                sequences,
                rows,
                self.on_policy,
                vocab_size=self.vocab_size,
                seed=self.seed,
                step=self._step,
            )
            objective = objective.without_cross_entropy()
        elif self.train_labels is None:
            inputs, labels = sequences[:, :-1], sequences[:, 1:]
        else:
            inputs = sequences[:, :-1]
            labels = self.train_labels[rows].to(self.device, non_blocking=True)
        signal = None if self.teacher is None else self.teacher(inputs, rows)
        head_loss = functools.partial(
            step_losses,
            labels=labels,
            objective=objective,
            progress=progress,
            teacher=signal,
            vocab_size=self.vocab_size,
            chunk_size=self.settings.chunk_size,
        )
        with self.autocast():  # the loss itself runs in float32
            loss, parts = model(inputs, head_loss=head_loss)
        return loss, parts

    def validate(self, student: torch.nn.Module) -> Validation:
        assert isinstance(student, CausalLM)
        nll, tokens = evaluate_lm(
            student,
            self.val,
            batch_size=self.settings.eval_batch_size,
            device=self.device,
            chunk_size=self.settings.chunk_size,
            labels=self.val_labels,
        )
        loss = nll / max(tokens, 1)
        return Validation(loss, {"val_loss": loss, "val_perplexity": perplexity(loss)})

    def epoch_fields(self, units: int, seconds: float) -> dict[str, Any]:
        fields: dict[str, Any] = {"tokens": units}
        if self.on_policy is not None:
            fields["on_policy_steps"] = self.on_policy_steps
        self.on_policy_steps = 0
        return fields

    def describe(self, label: str, epochs: int, record: dict[str, Any]) -> str:
        if record["split"] == "val":
            return f"{label} step {record['step']}: val loss/token {record['loss']:.4f}"
        return (
            f"{label} epoch {record['epoch']}/{epochs}: train loss/token {record['loss']:.4f}, "
            f"val loss/token {record['val_loss']:.4f} (perplexity "
            f"{record['val_perplexity']:.2f}) ({record['seconds']:.0f}s)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"on_policy_steps": self.on_policy_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.on_policy_steps = state["on_policy_steps"]


def _check_rows(label: str, rows: Tensor, labels: Tensor | None, name: str, what: str) -> None:
    if labels is not None and labels.shape != rows[:, 1:].shape:
        raise TrainingError(
            f"{label}: {name} has shape {tuple(labels.shape)}; the {what} rows "
            f"{tuple(rows.shape)} need ({len(rows)}, {rows.shape[1] - 1})"
        )


def _check_on_policy(
    label: str,
    on_policy: OnPolicyConfig,
    teacher: TeacherSignal[LMTeacherOutput] | None,
    train: Tensor,
) -> None:
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


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows float64 past ~709
