"""Temperature and weight schedules (kdistill.schedules): values, endpoints, warmup,
bounds and the schema's refusals."""

from __future__ import annotations

import itertools
import math

import pytest
from pydantic import ValidationError

from kdistill.schedules import Schedule, as_schedule, schedule_value


@pytest.mark.parametrize(
    ("schedule", "progress", "expected"),
    [
        (3.0, 0.5, 3.0),
        ({"kind": "linear", "start": 0, "end": 1}, 0.25, 0.25),
        ({"kind": "exponential", "start": 20, "end": 1}, 0.5, 20 * (1 / 20) ** 0.5),
        ({"kind": "cosine", "start": 1, "end": 0}, 0.5, 0.5),
        ({"kind": "step", "start": 1, "gamma": 0.5, "milestones": [0.5, 0.75]}, 0.8, 0.25),
        ({"kind": "constant", "start": 2, "warmup": 0.5}, 0.25, 1.0),
    ],
)
def test_schedule_values(schedule: object, progress: float, expected: float) -> None:
    value = schedule if isinstance(schedule, float) else Schedule.model_validate(schedule)
    assert schedule_value(value, progress) == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_a_schedule_runs_from_start_to_end_and_clamps_outside(kind: str) -> None:
    schedule = Schedule(kind=kind, start=8.0, end=2.0)  # type: ignore[arg-type]
    assert schedule_value(schedule, 0.0) == pytest.approx(8.0)
    assert schedule_value(schedule, 1.0) == pytest.approx(2.0)
    assert schedule_value(schedule, -0.5) == schedule_value(schedule, 0.0)
    assert schedule_value(schedule, 1.5) == schedule_value(schedule, 1.0)
    values = [schedule_value(schedule, p / 10) for p in range(11)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone from 8 down to 2


def test_warmup_ramps_from_zero_to_start_then_runs_the_schedule_over_the_rest() -> None:
    schedule = Schedule(kind="linear", start=4.0, end=0.0, warmup=0.2)
    assert schedule_value(schedule, 0.0) == 0.0
    assert schedule_value(schedule, 0.1) == pytest.approx(2.0)
    assert schedule_value(schedule, 0.2) == pytest.approx(4.0)  # continuous at the warmup's end
    assert schedule_value(schedule, 0.6) == pytest.approx(2.0)  # halfway through the rest
    assert schedule_value(schedule, 1.0) == pytest.approx(0.0)


def test_a_step_schedule_steps_at_each_milestone_reached() -> None:
    schedule = Schedule(kind="step", start=1.0, gamma=0.1, milestones=[0.5, 0.75])
    assert schedule_value(schedule, 0.49) == 1.0
    assert schedule_value(schedule, 0.5) == pytest.approx(0.1)
    assert schedule_value(schedule, 0.75) == pytest.approx(0.01)


def test_bounds_cover_every_value_the_schedule_takes() -> None:
    for schedule in (
        Schedule(kind="cosine", start=1.0, end=5.0),
        Schedule(kind="step", start=2.0, gamma=3.0, milestones=[0.3, 0.6]),
        Schedule(kind="constant", start=3.0, warmup=0.1),
    ):
        low, high = schedule.bounds()
        values = [schedule_value(schedule, p / 100) for p in range(101)]
        assert low <= min(values) + 1e-12 and max(values) <= high + 1e-12
        assert math.isclose(min(values), low) and math.isclose(max(values), high)


def test_a_number_is_a_constant_schedule() -> None:
    assert as_schedule(2.5) == Schedule(kind="constant", start=2.5)
    schedule = Schedule(kind="linear", start=1, end=2)
    assert as_schedule(schedule) is schedule


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "linear", "start": 1}, "needs 'end'"),
        ({"kind": "exponential", "start": 0, "end": 1}, "start > 0 and end > 0"),
        ({"kind": "step", "start": 1, "milestones": [0.5, 1.0]}, "each in \\(0, 1\\)"),
        ({"kind": "constant", "start": 1, "warmup": 1.0}, "less than 1"),
        ({"kind": "constant", "start": 1, "gamma": 0}, "greater than 0"),
        ({"kind": "sine", "start": 1}, "constant"),
        ({"kind": "constant", "start": 1, "ends": 2}, "Extra inputs"),
    ],
)
def test_bad_schedules_are_refused(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Schedule.model_validate(raw)
