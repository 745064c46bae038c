"""Question answering: the training steps `fit` runs, span decoding and SQuAD scores.

A row is one window. The model scores each token as the answer's start and as its
end, (B, T, 2); padding is masked out. The rows of `LossInputs` are the start and the
end distribution of each window, (2B, T), so `cross_entropy` is the span loss of
BERT's SQuAD recipe and `kd` the T²-scaled KL of DistilBERT's
`run_squad_w_distillation` on each, and the step's loss is divided by two per window
(their mean). The teacher's scores of the training windows come from one pass before
the stage, read by row. Feature terms (hidden_mse, minilm_relation_kl, ...) compare
modules of the student and of the teacher, which then runs live on each batch (the
windows are the same tokens for both), over each window's real tokens; they are one
value per window, so after the division by two a feature term's weight w counts as
w/2 per window. Validation: F1 (SQuAD v1.1's), higher is better.
"""

from __future__ import annotations

import collections
import re
import string
import time
from typing import Any

import torch
from torch import nn

from kdistill.errors import TrainingError
from kdistill.losses.objective import LossInputs, Objective
from kdistill.recipe import TrainConfig
from kdistill.steps import Placement, StepCount, Validation, autocast_of
from kdistill.tasks.question_answering.data import QAData, Windows

MASKED = -1e4  # the score of a padding position


def span_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, 2) start and end scores, padding positions at MASKED."""
    scores = model(**batch).float()
    return scores.masked_fill(batch["attention_mask"].unsqueeze(-1) == 0, MASKED)


def as_rows(scores: torch.Tensor) -> torch.Tensor:
    """(B, T, 2) -> (2B, T): each window's start distribution, then its end one."""
    return scores.permute(0, 2, 1).reshape(-1, scores.shape[1])


class SpanSteps:
    """`kdistill.steps.TrainSteps` of a question-answering stage."""

    unit = "spans"
    higher_is_better = True

    def __init__(
        self,
        student: nn.Module,
        *,
        data: QAData,
        objective: Objective,
        teacher: list[torch.Tensor] | None,
        settings: TrainConfig,
        accelerator: Placement,
        label: str = "train",
        live_teacher: nn.Module | None = None,
    ) -> None:
        if objective.needs_teacher and teacher is None:
            raise TrainingError(f"{label}: the objective needs a teacher, but none was given")
        if objective.feature_terms and live_teacher is None:
            raise TrainingError(
                f"{label}: the objective reads the teacher's features, but no live teacher "
                "was given"
            )
        self.student, self.data, self.objective, self.settings = student, data, objective, settings
        # the teacher's (T_i, 2) start/end scores of each training window
        self.teacher_scores = teacher if objective.needs_teacher else None
        # the teacher the feature terms hooked: it runs on each batch to fill its taps
        self.live_teacher = live_teacher if objective.feature_terms else None
        self.device = accelerator.device
        self.autocast = autocast_of(accelerator)
        self.windows: Windows = data.windows(student, "train")
        self.num_rows = len(self.windows.ids)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.data_seconds, self.rows, self.tokens, self.padded = 0.0, 0, 0, 0

    def epoch_order(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        self._reset_counters()
        return self.data.order(self.student, batch_size, generator)

    def count(self, rows: torch.Tensor, share: torch.Tensor, step: int) -> StepCount:
        return StepCount(total=2 * len(rows), local=2 * len(share))

    def loss(
        self, model: nn.Module, rows: torch.Tensor, *, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tick = time.perf_counter()
        batch = {k: v.to(self.device) for k, v in self.windows.batch(rows).items()}
        width = batch["input_ids"].shape[1]
        labels = torch.stack((self.windows.start[rows], self.windows.end[rows]), 1).reshape(-1)
        teacher = None
        if self.teacher_scores is not None:
            padded = torch.full((len(rows), width, 2), MASKED)
            for i, r in enumerate(rows.tolist()):
                scores = self.teacher_scores[r]
                padded[i, : len(scores)] = scores
            teacher = as_rows(padded).to(self.device)
        self.rows += len(rows)
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        self.data_seconds += time.perf_counter() - tick
        with self.autocast():
            if self.live_teacher is not None:
                with torch.no_grad():
                    self.live_teacher(**batch)
            scores = span_logits(model, batch)
        inputs = LossInputs(
            as_rows(scores), labels.to(self.device), teacher, attention_mask=batch["attention_mask"]
        )
        return self.objective(inputs, progress)

    def validate(self, student: nn.Module) -> Validation | None:
        if not self.data.val:
            return None
        scores = squad_scores(
            self.data, "val", predict_spans(student, self.data, "val", settings=self.settings)
        )
        return Validation(scores["f1"], {"val_f1": scores["f1"], "val_exact": scores["exact"]})

    def epoch_fields(self, units: int, seconds: float) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "windows_per_second": round(self.rows / seconds, 2),
            "data_share": round(self.data_seconds / seconds, 5),
        }
        if self.padded:
            fields["padding_share"] = round(1 - self.tokens / self.padded, 4)
        return fields

    def describe(self, label: str, epochs: int, record: dict[str, Any]) -> str:
        if record["split"] == "val":
            return f"{label} step {record['step']}: val F1 {100 * record['f1']:.2f}"
        line = f"{label} epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}"
        if "val_f1" in record:
            line += f", val EM {100 * record['val_exact']:.2f} F1 {100 * record['val_f1']:.2f}"
        return line + f" ({record['seconds']:.0f}s; {record['windows_per_second']:,.1f} windows/s)"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@torch.no_grad()
def window_scores(
    model: nn.Module, data: QAData, split: str, *, batch_size: int, device: Any
) -> list[torch.Tensor]:
    """Each window's (T_i, 2) start/end scores, float32 on the CPU, shortest first."""
    was_training = model.training
    model.eval()
    windows = data.windows(model, split)
    order = torch.sort(windows.lengths, stable=True).indices
    out: dict[int, torch.Tensor] = {}
    try:
        for chunk in order.split(batch_size):
            batch = {k: v.to(device) for k, v in windows.batch(chunk).items()}
            scores = span_logits(model, batch).cpu()
            for i, r in enumerate(chunk.tolist()):
                out[r] = scores[i, : len(windows.ids[r])].clone()
    finally:
        model.train(was_training)
    return [out[r] for r in range(len(windows.ids))]


def predict_spans(
    model: nn.Module,
    data: QAData,
    split: str,
    *,
    settings: TrainConfig,
    device: Any = None,
    scores: list[torch.Tensor] | None = None,
) -> dict[str, str]:
    """Each question's answer text: over its windows, the n-best starts and ends inside
    the paragraph, end not before start, at most max_answer_length tokens; the highest
    start + end score wins (an empty answer when no window has a valid span)."""
    device = device if device is not None else next(model.parameters()).device
    if scores is None:
        scores = window_scores(
            model, data, split, batch_size=settings.eval_batch_size, device=device
        )
    windows = data.windows(model, split)
    return decode(data, split, windows, scores)


def decode(
    data: QAData, split: str, windows: Windows, scores: list[torch.Tensor]
) -> dict[str, str]:
    section = data.section
    questions = data.split(split)
    best: dict[int, tuple[float, str]] = {}
    for w, window_score in enumerate(scores):
        q = int(windows.question[w])
        spans = windows.offsets[w]
        inside = torch.tensor([s is not None for s in spans])
        start = window_score[:, 0].masked_fill(~inside, float("-inf"))
        end = window_score[:, 1].masked_fill(~inside, float("-inf"))
        k = min(section.n_best, int(inside.sum()))
        if k == 0:
            continue
        starts = start.topk(k).indices.tolist()
        ends = end.topk(k).indices.tolist()
        for s in starts:
            for e in ends:
                if e < s or e - s + 1 > section.max_answer_length:
                    continue
                value = float(start[s] + end[e])
                if q not in best or value > best[q][0]:
                    first, last = spans[s], spans[e]
                    assert first is not None and last is not None
                    best[q] = (value, questions[q].context[first[0] : last[1]])
    # a question no window has a valid span for gets no answer (scored 0, as the
    # official script scores a missing prediction)
    return {question.id: best[i][1] for i, question in enumerate(questions) if i in best}


# ------------------------------------------------------- the official SQuAD v1.1 metric


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles (a, an,
    the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, truth: str) -> float:
    predicted, true = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(predicted) & collections.Counter(true)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_scores(
    data: QAData, split: str, answers: dict[str, str], teacher: dict[str, str] | None = None
) -> dict[str, Any]:
    """Exact match and F1 (each the maximum over a question's reference answers, averaged
    over questions), as SQuAD v1.1's evaluation script computes them; with a teacher's
    answers, how often the student's answer is the teacher's (exactly, normalised)."""
    questions = data.split(split)
    exact = f1 = 0.0
    for q in questions:
        if q.id not in answers:
            continue
        predicted = answers[q.id]
        exact += max(float(normalize_answer(predicted) == normalize_answer(a)) for a in q.answers)
        f1 += max(answer_f1(predicted, a) for a in q.answers)
    n = max(len(questions), 1)
    scores: dict[str, Any] = {"exact": exact / n, "f1": f1 / n, "questions": len(questions)}
    if teacher is not None:
        same = sum(
            normalize_answer(answers.get(q.id, "")) == normalize_answer(teacher.get(q.id, ""))
            for q in questions
        )
        scores["agreement"] = same / n
    return scores
