"""The parts every task's recipe shares: the strict base model, the training, output
and seed sections, and the checks that do not depend on the task.

A task's recipe (`recipe/classification.py`, `recipe/causal_lm.py`) lists its fields in
the order users write them and takes these sections as they are; `RecipeBase` adds the
checks of the stage list and the seeds.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from kdistill.recipe.strict import Strict, raise_all  # noqa: F401  (re-exported)
from kdistill.recipe.tune import TuneConfig

Precision = Literal["fp32", "bf16", "fp16"]
Seeds = Annotated[list[int], Field(min_length=1)]


class AugmentConfig(Strict):
    """Random input augmentation, applied per batch during training only."""

    jitter: int = Field(0, ge=0, le=8, description="max shift in pixels (Hinton's ±2)")
    crop: int = Field(
        0, ge=0, le=16, description="random crop after zero padding by this many pixels (CIFAR: 4)"
    )
    flip: bool = Field(False, description="random horizontal flip with probability 0.5")

    @property
    def random(self) -> bool:
        """Whether the inputs change from epoch to epoch."""
        return bool(self.jitter or self.crop or self.flip)


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class LRScheduleConfig(Strict):
    name: Literal["constant", "cosine", "step", "onecycle", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    milestones: list[int] = Field(default_factory=list, description="step: epochs")
    gamma: float = Field(0.1, gt=0)
    min_lr: float = Field(0.0, ge=0)


class EarlyStoppingConfig(Strict):
    patience: int = Field(5, ge=1, description="epochs without validation improvement")
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, description="samples per optimizer step, all processes")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm")
    precision: Precision = "fp32"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint every N optimizer steps (end of epoch always)"
    )
    eval_batch_size: int = Field(1000, ge=1)
    eval_every: int | None = Field(
        None, ge=1, description="also measure the validation split every N optimizer steps"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum}): each optimizer step sees batch_size samples"
            )
        return self


class OutputConfig(Strict):
    dir: str | None = Field(None, description="run folder; default runs/<recipe name>")
    tensorboard: bool = False
    plots: bool = Field(
        True,
        description="pictures: report.html and, for classifiers, plots/*.png (curves, "
        "reliability, quality against cost); false writes the tables alone (results.md, "
        "results.json), as `kdistill tune`'s trials do",
    )
    track: list[Literal["mlflow", "tensorboard"]] = Field(
        default_factory=list,
        description="experiment trackers: mlflow (the resolved recipe as parameters, every "
        "stage's and seed's metrics, the results, report and student weights as artifacts) "
        "and tensorboard (event files per stage and seed; the same as tensorboard: true)",
    )
    track_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default sqlite:///<the run's parent folder>/mlflow.db)",
    )

    @property
    def writes_tensorboard(self) -> bool:
        return self.tensorboard or "tensorboard" in self.track


class RecipeBase(Strict):
    """What every task's recipe starts with, and the checks each makes. A subclass
    narrows `task` to its name and declares its sections after these, `stages` (a list
    of its stage names) among them; `STAGES` names the stages to suggest when the list
    is empty."""

    STAGES: ClassVar[str]

    task: str = Field(description="the task (kdistill.tasks.TASKS)")
    name: str
    description: str = ""
    tune: TuneConfig | None = Field(
        None, description="what `kdistill tune` searches (kdistill.recipe.tune); run ignores it"
    )

    def reads_teacher_cache(self) -> bool:
        """Whether the distill stage reads the teacher's outputs from a cache written once
        (`kdistill cache`) rather than running the teacher each step."""
        return False

    def teacher_cache_settings(self) -> dict[str, Any]:
        """The recipe values, beyond the teacher and the data, that the teacher's cache
        depends on (a cache written under others is refused as stale)."""
        return {}

    @field_validator("seeds", check_fields=False)
    @classmethod
    def _seeds_unique(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            raise ValueError(
                f"seed {', '.join(map(str, repeated))} is listed more than once; each seed "
                "is one run of each stage, so list each once"
            )
        return seeds

    @field_validator("objective", check_fields=False)
    @classmethod
    def _objective_not_empty(cls, objective: list[Any]) -> list[Any]:
        if not objective:
            raise ValueError(
                "the objective is empty; give at least one loss term, for example "
                "[{loss: cross_entropy}]"
            )
        return objective

    @field_validator("stages", check_fields=False)
    @classmethod
    def _stages_unique(cls, stages: list[str]) -> list[str]:
        if not stages:
            raise ValueError(f"name at least one stage: {cls.STAGES}")
        if len(set(stages)) != len(stages):
            raise ValueError(f"each stage may appear once; got {stages}")
        return stages
