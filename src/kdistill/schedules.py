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
