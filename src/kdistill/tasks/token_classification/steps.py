"""Token classification: the training steps `fit` runs, and the measurements.

A row is one sentence. The student reads it through its own tokenizer; its logits are
taken at each word's first token, so a batch's loss is over its labelled words: the
rows of `LossInputs` are words, (N, C), and every logit term of the objective (cross-
entropy, T²-scaled KL, ...) is a per-word term. The teacher's word logits come from one
pass over the training sentences before the stage (`teacher_words`), read by row. The
loss of a step is divided by the labelled words of the whole step (all processes and
micro-batches), as the language-model task divides by its tokens. Validation: entity
F1 (seqeval, IOB2, strict), higher is better.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from kdistill.errors import RecipeError, TrainingError
from kdistill.losses.objective import LossInputs, Objective
from kdistill.recipe import TrainConfig
from kdistill.steps import Placement, StepCount, Validation, autocast_of
from kdistill.tasks.token_classification.data import IGNORE, TaggedSentences
from kdistill.tasks.token_classification.models import forward_words


class TaggerSteps:
    """`kdistill.steps.TrainSteps` of a token-classification stage."""

    unit = "words"
    higher_is_better = True

    def __init__(
        self,
        student: nn.Module,
        *,
        data: TaggedSentences,
        objective: Objective,
        teacher: list[torch.Tensor] | None,
        settings: TrainConfig,
        accelerator: Placement,
        label: str = "train",
    ) -> None:
        if objective.needs_teacher and teacher is None:
            raise TrainingError(f"{label}: the objective needs a teacher, but none was given")
        self.student, self.data, self.objective, self.settings = student, data, objective, settings
        # the teacher's word logits of each training sentence (W_i, C), NaN where it has none
        self.teacher_words = teacher if objective.needs_teacher else None
        self.device = accelerator.device
        self.autocast = autocast_of(accelerator)
        self.num_rows = len(data.train)
        encoded = data.encode(student, "train")
        # the words of each sentence a loss counts: labelled, with a first token in the
        # student's tokenization and, when a teacher is read, in the teacher's (its word
        # logits are NaN where it has none)
        self.words_kept = [
            (f >= 0) & (y != IGNORE) for f, y in zip(encoded.first, data.labels("train"))
        ]
        if self.teacher_words is not None:
            self.words_kept = [
                kept & ~t[:, 0].isnan() for kept, t in zip(self.words_kept, self.teacher_words)
            ]
        self.counted = torch.tensor([int(k.sum()) for k in self.words_kept], dtype=torch.int64)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.data_seconds, self.sentences, self.words, self.tokens, self.padded = 0.0, 0, 0, 0, 0

    def epoch_order(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        tick = time.perf_counter()
        self._reset_counters()
        order = self.data.order(self.student, batch_size, generator)
        self.data_seconds += time.perf_counter() - tick
        return order

    def count(self, rows: torch.Tensor, share: torch.Tensor, step: int) -> StepCount:
        return StepCount(
            total=max(1, int(self.counted[rows].sum())), local=int(self.counted[share].sum())
        )

    def loss(
        self, model: nn.Module, rows: torch.Tensor, *, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tick = time.perf_counter()
        batch = self.data.batch(self.student, "train", rows)
        labels = self.data.word_labels("train", rows, batch["first"].shape[1])
        keep = torch.zeros(labels.shape, dtype=torch.bool)  # (B, W)
        for i, r in enumerate(rows.tolist()):
            keep[i, : len(self.words_kept[r])] = self.words_kept[r]
        teacher = None
        if self.teacher_words is not None:
            teacher = torch.cat(
                [self.teacher_words[r][self.words_kept[r]] for r in rows.tolist()]
            ).to(self.device)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.sentences += len(rows)
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        self.words += int(keep.sum())
        self.data_seconds += time.perf_counter() - tick
        with self.autocast():
            logits = forward_words(model, batch)  # (B, W, C)
        keep = keep.to(self.device)
        inputs = LossInputs(logits[keep].float(), labels.to(self.device)[keep], teacher)
        return self.objective(inputs, progress)

    def validate(self, student: nn.Module) -> Validation | None:
        if not len(self.data.val):
            return None
        logits = predict_words(
            student, self.data, "val", batch_size=self.settings.eval_batch_size, device=self.device
        )
        scores = entity_scores(self.data, "val", logits)
        return Validation(
            scores["f1"], {"val_f1": scores["f1"], "val_token_accuracy": scores["token_accuracy"]}
        )

    def epoch_fields(self, units: int, seconds: float) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "sentences_per_second": round(self.sentences / seconds, 2),
            "words_per_second": round(self.words / seconds, 1),
            "data_share": round(self.data_seconds / seconds, 5),
        }
        if self.padded:
            fields["padding_share"] = round(1 - self.tokens / self.padded, 4)
        return fields

    def describe(self, label: str, epochs: int, record: dict[str, Any]) -> str:
        if record["split"] == "val":
            return f"{label} step {record['step']}: val entity F1 {100 * record['f1']:.2f}"
        line = f"{label} epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}"
        if "val_f1" in record:
            line += f", val entity F1 {100 * record['val_f1']:.2f}"
        rate = f"{record['words_per_second']:,.0f} words/s"
        share = f"data {100 * record['data_share']:.1f}% of step time"
        return line + f" ({record['seconds']:.0f}s; {rate}; {share})"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@torch.no_grad()
def predict_words(
    model: nn.Module,
    data: TaggedSentences,
    split: str,
    *,
    batch_size: int,
    device: torch.device | str,
    rows: torch.Tensor | None = None,
    missing: str = "O",
) -> list[torch.Tensor]:
    """Each sentence's word logits (W_i, C), float32 on the CPU; a word without a first
    token gets logits that predict label 0 (`O`), or NaN with `missing="nan"` (a
    teacher's signal: such words are left out of the loss). Batches go shortest
    sentence first."""
    was_training = model.training
    model.eval()
    encoded = data.encode(model, split)
    rows = torch.arange(len(encoded.ids)) if rows is None else rows
    order = rows[torch.sort(encoded.lengths[rows], stable=True).indices]
    out: dict[int, torch.Tensor] = {}
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = data.batch(model, split, chunk)
            first = batch["first"]
            logits = forward_words(model, {k: v.to(device) for k, v in batch.items()})
            logits = logits.float().cpu()
            for i, r in enumerate(chunk.tolist()):
                n = len(encoded.first[r])
                out[r] = without_token(logits[i, :n].clone(), first[i, :n] < 0, missing)
    finally:
        model.train(was_training)
    return [out[int(r)] for r in rows]


def without_token(words: torch.Tensor, absent: torch.Tensor, missing: str = "O") -> torch.Tensor:
    """`words` (W, C) with the rows of words that have no first token set (in place):
    to logits that predict label 0 (`O`), or to NaN with `missing="nan"`."""
    if absent.any():
        words[absent] = float("nan") if missing == "nan" else 0.0
        if missing != "nan":
            words[absent, 0] = 1.0
    return words


SEQEVAL_MISSING = (
    "task token_classification measures entity F1 with seqeval, which is not installed; "
    "pip install 'kdistill[ner]'"
)


def require_seqeval() -> None:
    """Stop with what to install when seqeval is missing (before anything trains)."""
    import importlib.util

    if importlib.util.find_spec("seqeval") is None:
        raise RecipeError(SEQEVAL_MISSING)


def entity_scores(
    data: TaggedSentences,
    split: str,
    logits: list[torch.Tensor],
    teacher: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (seqeval, IOB2 scheme, strict mode: an
    entity counts only when its type and every boundary match; a predicted I- without
    its B- starts nothing), per entity type; the same F1 in conlleval's lenient mode
    (the CoNLL-2003 shared task's script, in which a stray I- starts an entity), word
    accuracy, and agreement of the predicted labels with the teacher's when given."""
    require_seqeval()
    from seqeval.metrics import classification_report, f1_score
    from seqeval.scheme import IOB2

    names = data.label_names
    truth = data.split(split).tags
    predicted = [[names[i] for i in words.argmax(-1).tolist()] for words in logits]
    report = classification_report(
        truth, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0
    )
    correct = sum(int((w.argmax(-1) == y).sum()) for w, y in zip(logits, data.labels(split)))
    total = sum(len(y) for y in data.labels(split))
    scores: dict[str, Any] = {
        "f1": float(report["micro avg"]["f1-score"]),
        "precision": float(report["micro avg"]["precision"]),
        "recall": float(report["micro avg"]["recall"]),
        "f1_conlleval": float(f1_score(truth, predicted)),
        "token_accuracy": correct / max(total, 1),
        "entities": int(report["micro avg"]["support"]),
        "per_type": {
            kind: {
                "f1": float(report[kind]["f1-score"]),
                "precision": float(report[kind]["precision"]),
                "recall": float(report[kind]["recall"]),
                "support": int(report[kind]["support"]),
            }
            for kind in data.entity_types
            if kind in report
        },
    }
    if teacher is not None:
        same = sum(int((s.argmax(-1) == t.argmax(-1)).sum()) for s, t in zip(logits, teacher))
        scores["agreement"] = same / max(total, 1)
    return scores
