"""Temperature and weight schedules: a value as a function of training progress.

Progress is the fraction of optimizer steps done, in [0, 1]. The schedule's
parameters are validated by `kdistill.recipe.Schedule`; this module only
evaluates them.
"""

from __future__ import annotations

import math

from kdistill.recipe import ScheduleOrNumber, as_schedule


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
