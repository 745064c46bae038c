"""The token-classification recipe (`task: token_classification`): a label per word,
named-entity recognition on CoNLL-format files being the common case.

The data are sentences of words with one IOB2 tag each. The teacher and the student
each tokenize the words their own way; a word's label, and the teacher's signal for
it, sit on the word's first subword, so the losses compare one distribution per word
and two models with different tokenizers still line up word by word.
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

TaggingStage = Literal["teacher", "baseline", "distill"]
TAGGER_ZOO = ("hf", "hf_student", "bilstm")


class TaggingFiles(Strict):
    train: str = "train.txt"
    val: str | None = Field("valid.txt", description="null: no validation split")
    test: str = "test.txt"


class TaggingDataConfig(Strict):
    source: Literal["conll2003", "conll"] = Field(
        "conll2003",
        description="conll2003: the English CoNLL-2003 files under the data folder "
        "(conll2003/train.txt, valid.txt, test.txt); conll: your own CoNLL-format folder",
    )
    path: str | None = Field(
        None, description="the folder of the files (conll: required; conll2003: optional)"
    )
    files: TaggingFiles = Field(default_factory=TaggingFiles)
    tag_column: int = Field(-1, description="the column of the tag (-1: the last)")
    max_length: int = Field(
        256, ge=8, le=4096, description="subword tokens per sentence, special tokens included"
    )
    limit_train: int | None = Field(None, ge=1, description="the first N training sentences")
    limit_val: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TaggingDataConfig:
        if self.source == "conll" and self.path is None:
            raise ValueError(
                "data.source conll reads your own CoNLL-format folder: set data.path to it"
            )
        return self


class TaggerTeacherConfig(Strict):
    model: ModelSpec
    checkpoint: str | None = Field(
        None, description="load these weights instead of training (safetensors or run folder)"
    )
    train: TrainConfig | None = Field(
        None, description="teacher training settings; keys not given inherit from `train`"
    )
    precision: Precision | None = Field(
        None, description="dtype the frozen teacher runs in during distillation"
    )
    cache: bool = Field(
        True,
        description="run the teacher once over the training sentences and keep its word "
        "logits on disk (<run>/cache/teacher-seed<k>), read by every seed",
    )


class TaggerStudentConfig(Strict):
    model: ModelSpec


class TaggingRecipe(RecipeBase):
    task: Literal["token_classification"] = Field(
        description="the task (kdistill.tasks.TASKS); this schema's is token_classification"
    )
    data: TaggingDataConfig = Field(default_factory=TaggingDataConfig)
    teacher: TaggerTeacherConfig | None = None
    student: TaggerStudentConfig | None = None
    objective: list[LossTerm] = Field(
        default_factory=lambda: [LossTerm(loss="cross_entropy")],
        description="loss terms of the distill stage, over the labelled words",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[TaggingStage] = Field(default=["teacher", "baseline", "distill"])
    seeds: Seeds = Field(default_factory=lambda: [0])
    output: OutputConfig = Field(default_factory=OutputConfig)

    STAGES = "teacher, baseline, distill"

    @field_validator("objective")
    @classmethod
    def _word_terms(cls, objective: list[LossTerm]) -> list[LossTerm]:
        problems = []
        for i, term in enumerate(objective):
            if is_feature_loss(term.loss) or term.loss == "crd" or term.student is not None:
                problems.append(
                    f"objective[{i}]: loss {term.loss!r} reads features; token classification "
                    "compares one label distribution per word, so use logit terms "
                    "(cross_entropy, kd, kl, jsd, logit_mse, dkd, ...)"
                )
        raise_all(problems)
        return objective

    @property
    def student_from_teacher(self) -> bool:
        """Whether the student copies the recipe's trained teacher (location: teacher)."""
        if self.student is None:
            return False
        model = self.student.model
        return model.name == "hf_student" and model.args.get("location") == "teacher"

    @model_validator(mode="after")
    def _check(self) -> TaggingRecipe:
        problems: list[str] = []
        if {"teacher", "distill"} & set(self.stages) and self.teacher is None:
            problems.append("stages 'teacher' and 'distill' need a 'teacher' section")
        if {"baseline", "distill"} & set(self.stages) and self.student is None:
            problems.append("stages 'baseline' and 'distill' need a 'student' section")
        teacher_trained = self.teacher is not None and (
            "teacher" in self.stages or self.teacher.checkpoint is not None
        )
        if "distill" in self.stages and not teacher_trained:
            problems.append(
                "the distill stage needs a trained teacher: add 'teacher' to stages "
                "or set teacher.checkpoint"
            )
        if self.student_from_teacher and not teacher_trained:
            problems.append(
                "student.model copies the recipe's trained teacher (location: teacher): add "
                "the 'teacher' stage or set teacher.checkpoint"
            )
        for role in ("teacher", "student"):
            section: Any = getattr(self, role)
            if section is not None and section.model.name not in TAGGER_ZOO:
                problems.append(
                    f"{role}.model.name: {section.model.name!r} is not a token-classification "
                    f"model; use one of {', '.join(TAGGER_ZOO)}"
                )
        if (
            self.teacher is not None
            and self.teacher.train is not None
            and self.teacher.train.precision != self.train.precision
        ):
            problems.append(
                f"teacher.train.precision ({self.teacher.train.precision}) differs from "
                f"train.precision ({self.train.precision}); one run trains in one precision"
            )
        raise_all(problems)
        return self

    def teacher_train(self) -> TrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train
