"""The extractive question-answering recipe (`task: question_answering`): SQuAD-format
questions over paragraphs, answered by a span of the paragraph.

Long paragraphs are read in windows of `max_length` tokens that overlap by
`doc_stride`; the model scores every token as the answer's start and as its end. The
teacher and the student must share a tokenizer (their windows, and so their scores,
line up token by token); a student built from the teacher's layers does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdistill.losses.table import is_feature_loss
from kdistill.recipe.classification import LossTerm, ModelSpec
from kdistill.recipe.common import (
    OutputConfig,
    Precision,
    RecipeBase,
    Seeds,
    Strict,
    TrainConfig,
    raise_all,
)

QAStage = Literal["teacher", "baseline", "distill"]
QA_ZOO = ("hf", "hf_student")


class ArticleRange(Strict):
    """Articles `start` to `end` of the file, both included, counted from 0."""

    start: int = Field(ge=0)
    end: int = Field(ge=0)

    @model_validator(mode="after")
    def _order(self) -> ArticleRange:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        return self


class QADataConfig(Strict):
    source: Literal["squad"] = "squad"
    path: str = Field(
        "squad/dev-v1.1.json",
        description="a SQuAD-format JSON file (absolute, or under the data folder)",
    )
    train: ArticleRange = Field(default_factory=lambda: ArticleRange(start=0, end=35))
    val: ArticleRange | None = Field(default_factory=lambda: ArticleRange(start=36, end=39))
    test: ArticleRange = Field(default_factory=lambda: ArticleRange(start=40, end=47))
    max_length: int = Field(256, ge=32, le=4096, description="tokens per window")
    doc_stride: int = Field(
        96, ge=1, description="tokens two windows of one paragraph share (must be < window)"
    )
    max_question_length: int = Field(64, ge=4)
    max_answer_length: int = Field(30, ge=1, description="tokens, in decoding")
    n_best: int = Field(20, ge=1, description="start and end candidates per window, decoding")
    limit_train: int | None = Field(None, ge=1, description="the first N training questions")
    limit_val: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> QADataConfig:
        problems = []
        ranges = {"train": self.train, "val": self.val, "test": self.test}
        named = [(k, r) for k, r in ranges.items() if r is not None]
        for i, (a, ra) in enumerate(named):
            for b, rb in named[i + 1 :]:
                if ra.start <= rb.end and rb.start <= ra.end:
                    problems.append(
                        f"{a} articles {ra.start}-{ra.end} and {b} articles {rb.start}-{rb.end} "
                        "overlap; a question's article must be on one side only"
                    )
        if self.max_question_length >= self.max_length - 8:
            problems.append(
                f"max_question_length ({self.max_question_length}) leaves no room for the "
                f"paragraph in a window of {self.max_length} tokens"
            )
        raise_all(problems)
        return self


class QATeacherConfig(Strict):
    model: ModelSpec
    checkpoint: str | None = Field(
        None, description="load these weights instead of training (safetensors or run folder)"
    )
    train: TrainConfig | None = Field(
        None, description="teacher training settings; keys not given inherit from `train`"
    )
    precision: Precision | None = None
    cache: bool = Field(
        True, description="keep the teacher's start/end scores of the training windows on disk"
    )


class QAStudentConfig(Strict):
    model: ModelSpec


class QARecipe(RecipeBase):
    task: Literal["question_answering"] = Field(
        description="the task (kdistill.tasks.TASKS); this schema's is question_answering"
    )
    data: QADataConfig = Field(default_factory=QADataConfig)
    teacher: QATeacherConfig | None = None
    student: QAStudentConfig | None = None
    objective: list[LossTerm] = Field(
        default_factory=lambda: [LossTerm(loss="cross_entropy")],
        description="loss terms of the distill stage, over the start and end distributions",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[QAStage] = Field(default=["teacher", "baseline", "distill"])
    seeds: Seeds = Field(default_factory=lambda: [0])
    output: OutputConfig = Field(default_factory=OutputConfig)

    STAGES = "teacher, baseline, distill"

    @field_validator("objective")
    @classmethod
    def _span_terms(cls, objective: list[LossTerm]) -> list[LossTerm]:
        problems = []
        for i, term in enumerate(objective):
            if is_feature_loss(term.loss) or term.loss == "crd" or term.student is not None:
                problems.append(
                    f"objective[{i}]: loss {term.loss!r} reads features; question answering "
                    "compares the start and end distributions, so use logit terms "
                    "(cross_entropy, kd, kl, jsd, ...)"
                )
        raise_all(problems)
        return objective

    @property
    def student_from_teacher(self) -> bool:
        if self.student is None:
            return False
        model = self.student.model
        return model.name == "hf_student" and model.args.get("location") == "teacher"

    @model_validator(mode="after")
    def _check(self) -> QARecipe:
        problems: list[str] = []
        if {"teacher", "distill"} & set(self.stages) and self.teacher is None:
            problems.append("stages 'teacher' and 'distill' need a 'teacher' section")
        if {"baseline", "distill"} & set(self.stages) and self.student is None:
            problems.append("stages 'baseline' and 'distill' need a 'student' section")
        trained = self.teacher is not None and (
            "teacher" in self.stages or self.teacher.checkpoint is not None
        )
        if ("distill" in self.stages or self.student_from_teacher) and not trained:
            problems.append(
                "the distill stage (and a student with location: teacher) needs a trained "
                "teacher: add 'teacher' to stages or set teacher.checkpoint"
            )
        for role in ("teacher", "student"):
            section: Any = getattr(self, role)
            if section is not None and section.model.name not in QA_ZOO:
                problems.append(
                    f"{role}.model.name: {section.model.name!r} is not a question-answering "
                    f"model; use one of {', '.join(QA_ZOO)} (a Hugging Face encoder with a "
                    "span head)"
                )
        if self.data.doc_stride >= self.data.max_length:
            problems.append(
                f"data.doc_stride ({self.data.doc_stride}) must be smaller than data.max_length "
                f"({self.data.max_length}): windows overlap by the stride, so a stride of a "
                "whole window never moves forward"
            )
        raise_all(problems)
        return self

    def teacher_train(self) -> TrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train
