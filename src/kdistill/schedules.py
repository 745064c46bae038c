"""Temperature and weight schedules: a value as a function of training progress.

Progress is the fraction of optimizer steps done, in [0, 1]. `Schedule` is the
recipe's schema of a schedule (validated by pydantic, as every recipe section), and
`schedule_value` evaluates one. This module imports nothing of kdistill, so the recipe
and the losses can both use it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Schedule(BaseModel):
    """A value that changes with training progress p in [0, 1] (or by step/epoch milestones).

    constant: start.  linear: start + (end - start) p.  exponential: start (end/start)^p.
    cosine: end + (start - end)(1 + cos(pi p))/2.  step: start * gamma^(number of
    milestones passed), milestones given as fractions of training in (0, 1).
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    kind: Literal["constant", "linear", "exponential", "cosine", "step"] = "constant"
    start: float
    end: float | None = None
    gamma: float = Field(0.1, gt=0)
    milestones: list[float] = Field(default_factory=list)
    warmup: float = Field(
        0.0, ge=0, lt=1, description="fraction of training spent ramping 0 -> start first"
    )

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if self.kind in ("linear", "exponential", "cosine") and self.end is None:
            raise ValueError(f"a '{self.kind}' schedule needs 'end' as well as 'start'")
        if self.kind == "exponential" and (self.start <= 0 or (self.end or 0) <= 0):
            raise ValueError("an 'exponential' schedule needs start > 0 and end > 0")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError("milestones are fractions of training, each in (0, 1)")
        return self

    def bounds(self) -> tuple[float, float]:
        """Smallest and largest value the schedule takes."""
        values = [self.start] if self.end is None else [self.start, self.end]
        if self.kind == "step":
            values.append(self.start * self.gamma ** len(self.milestones))
        if self.warmup > 0:
            values.append(0.0)
        return min(values), max(values)


class LearnedTemperature(BaseModel):
    """A temperature trained with the student and against it: Curriculum Temperature for
    Knowledge Distillation (CTKD, Li et al., AAAI 2023, arXiv:2211.16231), its global
    variant. T = low + (high − low)·sigmoid(θ), θ one parameter trained by the student's
    optimizer through a gradient reversal of strength λ, so T moves to make the
    distillation term harder for the student; λ rises from 0 to `strength` along a half
    cosine over the first `curriculum` of training (easy to hard), then stays.
    `start` is T at the first step (default CTKD's: θ = 1, T = low + 0.731·(high − low)).
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    kind: Literal["learned"]
    low: float = Field(1.0, gt=0)
    high: float = 21.0
    start: float | None = None
    curriculum: float = Field(0.1, ge=0, le=1, description="fraction of training for λ's ramp")
    strength: float = Field(1.0, ge=0, description="λ after the ramp")

    @model_validator(mode="after")
    def _check(self) -> LearnedTemperature:
        if not self.low < self.high:
            raise ValueError(f"a learned temperature needs low < high; got {self.low}, {self.high}")
        if self.start is not None and not self.low < self.start < self.high:
            raise ValueError(f"start {self.start} must lie strictly between low and high")
        return self

    def initial(self) -> float:
        if self.start is not None:
            return self.start
        return self.low + (self.high - self.low) / (1 + math.exp(-1.0))

    def bounds(self) -> tuple[float, float]:
        return self.low, self.high


ScheduleOrNumber = float | Schedule


def as_schedule(value: ScheduleOrNumber) -> Schedule:
    return value if isinstance(value, Schedule) else Schedule(kind="constant", start=value)


def schedule_value(schedule: ScheduleOrNumber, progress: float) -> float:
    """The schedule's value at `progress` in [0, 1] (clamped).

    constant: start.  linear: start + (end - start)·p.  exponential: start·(end/start)^p.
    cosine: end + (start - end)·(1 + cos(πp))/2.  step: start·gamma^(milestones passed).
    With `warmup` w > 0 the value first ramps linearly from 0 to start over [0, w),
    and the schedule proper then runs over [w, 1].
    """
    s = as_schedule(schedule)
    p = min(max(progress, 0.0), 1.0)
    if s.warmup > 0:
        if p < s.warmup:
            return s.start * p / s.warmup
        p = (p - s.warmup) / (1 - s.warmup)
    end = s.start if s.end is None else s.end
    if s.kind == "constant":
        return s.start
    if s.kind == "linear":
        return s.start + (end - s.start) * p
    if s.kind == "exponential":
        return s.start * (end / s.start) ** p
    if s.kind == "cosine":
        return end + (s.start - end) * (1 + math.cos(math.pi * p)) / 2
    passed = sum(1 for m in s.milestones if p >= m)
    return s.start * s.gamma**passed
