"""The recipe sections of tasks on a text encoder (token classification, question
answering; `kdistill.tasks.encoder` runs them): the teacher, the student, an objective
of logit terms (and feature terms where the task allows them, `FEATURES`), and the
checks they share. A task's recipe narrows `task`, gives its data section and names
its models (`ZOO`) and what its terms compare (`COMPARES`)."""

from __future__ import annotations

from typing import Any, ClassVar

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


class EncoderTeacherConfig(Strict):
    model: ModelSpec
    checkpoint: str | None = Field(
        None, description="load these weights instead of training (safetensors or run folder)"
    )
    train: TrainConfig | None = Field(
        None, description="teacher training settings; keys not given inherit from `train`"
    )
    precision: Precision | None = Field(
        None, description="dtype the frozen teacher runs in when it computes its signal"
    )
    cache: bool = Field(
        True,
        description="run the teacher once over the training rows and keep its signal on disk "
        "(<run>/cache/teacher-seed<k>), read by every seed",
    )


class EncoderStudentConfig(Strict):
    model: ModelSpec


class EncoderRecipe(RecipeBase):
    """What the encoder tasks' recipes share; see the module docstring."""

    ZOO: ClassVar[tuple[str, ...]]
    KIND: ClassVar[str]  # "token-classification", for messages
    COMPARES: ClassVar[str]  # what the objective's terms compare, for messages
    # whether the distill stage may read features of the student's and the teacher's
    # modules (hidden states, attention relations), with the teacher run live beside it
    FEATURES: ClassVar[bool] = False
    STAGES = "teacher, baseline, distill"

    data: Any
    teacher: EncoderTeacherConfig | None = None
    student: EncoderStudentConfig | None = None
    objective: list[LossTerm] = Field(
        default_factory=lambda: [LossTerm(loss="cross_entropy")],
        description="loss terms of the distill stage",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    seeds: Seeds = Field(default_factory=lambda: [0])
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("objective")
    @classmethod
    def _logit_terms(cls, objective: list[LossTerm]) -> list[LossTerm]:
        problems = []
        for i, term in enumerate(objective):
            if term.loss == "crd":
                problems.append(
                    f"objective[{i}]: loss 'crd' contrasts one feature vector per training "
                    f"row; {cls.COMPARES}, rows of different lengths, so it does not apply. "
                    "Use hidden_mse, attention_mse or minilm_relation_kl for features"
                )
            elif not cls.FEATURES and is_feature_loss(term.loss):
                problems.append(
                    f"objective[{i}]: loss {term.loss!r} reads features; {cls.COMPARES}, so use "
                    "logit terms (cross_entropy, kd, kl, jsd, logit_mse, dkd, ...)"
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

    def task_problems(self) -> list[str]:
        """A task's own cross-field checks."""
        return []

    @model_validator(mode="after")
    def _check(self) -> EncoderRecipe:
        problems: list[str] = []
        stages = set(getattr(self, "stages", []))
        if {"teacher", "distill"} & stages and self.teacher is None:
            problems.append("stages 'teacher' and 'distill' need a 'teacher' section")
        if {"baseline", "distill"} & stages and self.student is None:
            problems.append("stages 'baseline' and 'distill' need a 'student' section")
        trained = self.teacher is not None and (
            "teacher" in stages or self.teacher.checkpoint is not None
        )
        if ("distill" in stages or self.student_from_teacher) and not trained:
            problems.append(
                "the distill stage (and a student with location: teacher) needs a trained "
                "teacher: add 'teacher' to stages or set teacher.checkpoint"
            )
        for role in ("teacher", "student"):
            section: Any = getattr(self, role)
            if section is not None and section.model.name not in self.ZOO:
                problems.append(
                    f"{role}.model.name: {section.model.name!r} is not a {self.KIND} model; "
                    f"use one of {', '.join(self.ZOO)}"
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
        raise_all(problems + self.task_problems())
        return self

    def reads_teacher_cache(self) -> bool:
        return self.teacher is not None and self.teacher.cache

    def teacher_train(self) -> TrainConfig:
        assert self.teacher is not None
        return self.teacher.train or self.train
