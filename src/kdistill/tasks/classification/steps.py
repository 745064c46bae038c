"""Classification (images, tables, text): the training steps `fit` runs.

A row is one sample. Images and features are tensors in memory, augmented per batch
(jitter, crop, flip) with a generator seeded per process; texts are tokenized once per
model, so the student and a live teacher each read their own tokenization, and an
epoch's order groups texts of similar length. The loss of a micro-batch is the
objective's sum over its samples, divided by `fit` by the step's batch size.
Validation: accuracy (higher is better) and NLL on the validation split.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdistill.data import DataBundle, TextData
from kdistill.data.augment import jitter, random_crop, random_flip
from kdistill.errors import TrainingError
from kdistill.evaluate import predict, quality
from kdistill.losses.objective import LossInputs, Objective
from kdistill.recipe import TrainConfig
from kdistill.steps import Placement, StepCount, Validation, augment_seed, autocast_of
from kdistill.teachers import TeacherSignal


class ClassifierSteps:
    """`kdistill.steps.TrainSteps` of a classifier stage."""

    unit = "samples"
    higher_is_better = True

    def __init__(
        self,
        student: nn.Module,
        *,
        data: DataBundle | TextData,
        objective: Objective,
        teacher: TeacherSignal[torch.Tensor] | None,
        settings: TrainConfig,
        accelerator: Placement,
        seed: int,
        label: str = "train",
    ) -> None:
        if objective.needs_teacher and teacher is None:
            raise TrainingError(f"{label}: the objective needs a teacher, but none was given")
        if settings.augment.random and not data.is_image:
            raise TrainingError(
                f"{label}: train.augment (jitter, crop, flip) works on images; "
                f"this dataset's samples have shape {tuple(data.input_shape)}. Remove train.augment"
            )
        self.student, self.data, self.objective, self.settings = student, data, objective, settings
        self.teacher = teacher if objective.needs_teacher else None  # never run an unread teacher
        self.teacher_model = next(iter(getattr(self.teacher, "models", {}).values()), None)
        self.device = accelerator.device
        self.autocast = autocast_of(accelerator)
        self.num_rows = len(data.train)
        self.augment_rng = torch.Generator().manual_seed(
            augment_seed(seed, accelerator.process_index)
        )
        self._reset_counters()

    def _reset_counters(self) -> None:
        # this process, the steps run in this epoch (after a resume: since it)
        self.data_seconds, self.samples, self.tokens, self.padded = 0.0, 0, 0, 0

    def epoch_order(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        tick = time.perf_counter()
        self._reset_counters()
        if isinstance(self.data, TextData):  # batches of similar lengths (bucket_batches)
            order = self.data.train_order(self.student, batch_size, generator)
        else:
            order = torch.randperm(self.num_rows, generator=generator)
        self.data_seconds += time.perf_counter() - tick
        return order

    def count(self, rows: torch.Tensor, share: torch.Tensor, step: int) -> StepCount:
        return StepCount(total=self.settings.batch_size, local=len(share))

    def loss(
        self, model: nn.Module, rows: torch.Tensor, *, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        built = time.perf_counter()
        self.samples += len(rows)
        x, x_teacher = self._inputs(rows)
        self.data_seconds += time.perf_counter() - built
        y = self.data.train.y[rows].to(self.device, non_blocking=True)
        teacher_logits = self.teacher(x_teacher, rows) if self.teacher is not None else None
        with self.autocast():
            logits = model(**x) if isinstance(x, Mapping) else model(x)
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        inputs = LossInputs(logits.float(), y, teacher_logits, indices=rows, attention_mask=mask)
        return self.objective(inputs, progress)

    def _inputs(
        self, rows: torch.Tensor
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor | dict[str, torch.Tensor]]:
        """(the student's input, the teacher's) of training rows, on the device."""
        if isinstance(self.data, TextData):  # each model reads its own tokenization
            texts = _to(self.data.batch(self.student, "train", rows), self.device)
            self.tokens += int(texts["attention_mask"].sum())
            self.padded += texts["attention_mask"].numel()
            if self.teacher_model is None:
                return texts, texts
            return texts, _to(self.data.batch(self.teacher_model, "train", rows), self.device)
        xb = self.data.train.x[rows]
        augment = self.settings.augment
        if augment.jitter:
            xb = jitter(xb, augment.jitter, self.augment_rng)
        if augment.crop:
            xb = random_crop(xb, augment.crop, self.augment_rng)
        if augment.flip:
            xb = random_flip(xb, self.augment_rng)
        images = self.data.to_input(xb).to(self.device, non_blocking=True)
        return images, images

    def validate(self, student: nn.Module) -> Validation | None:
        if not len(self.data.val):
            return None
        val_x, val_input, val_order = self.data.eval_feed(student, "val")
        logits = predict(
            student,
            val_x,
            to_input=val_input,
            order=val_order,
            batch_size=self.settings.eval_batch_size,
            device=self.device,
        )
        val = quality(logits, self.data.val.y)
        return Validation(val["accuracy"], {"val_accuracy": val["accuracy"], "val_nll": val["nll"]})

    def epoch_fields(self, units: int, seconds: float) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "samples_per_second": round(self.samples / seconds, 2),
            "data_share": round(self.data_seconds / seconds, 5),
        }
        if self.data.is_text and self.padded:
            fields["tokens_per_second"] = round(self.tokens / seconds, 1)
            fields["padding_share"] = round(1 - self.tokens / self.padded, 4)
        for name, value in self.objective.temperatures().items():  # learned (CTKD)
            fields[f"temperature_{name}"] = round(value, 4)
        return fields

    def describe(self, label: str, epochs: int, record: dict[str, Any]) -> str:
        if record["split"] == "val":
            return f"{label} step {record['step']}: val accuracy {100 * record['accuracy']:.2f}%"
        line = f"{label} epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}"
        if "val_accuracy" in record:
            line += f", val accuracy {100 * record['val_accuracy']:.2f}%"
        rate = f"{record['samples_per_second']:,.0f} samples/s"
        if "tokens_per_second" in record:
            rate += f", {record['tokens_per_second']:,.0f} tokens/s"
        share = f"data {100 * record['data_share']:.1f}% of step time"
        return line + f" ({record['seconds']:.0f}s; {rate}; {share})"

    def state_dict(self) -> dict[str, Any]:
        return {"augment_rng": self.augment_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.augment_rng.set_state(state["augment_rng"])


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
