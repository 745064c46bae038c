"""CTKD's learned temperature: the gradient reversal, the curriculum, the temperature's
parametrisation, the objective that trains it against the student, recipes and a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe

import kdistill
from kdistill.errors import RecipeError
from kdistill.losses.logits import kd_loss
from kdistill.losses.objective import LossInputs, Objective
from kdistill.losses.temperature import (
    LearnableTemperature,
    reversal_strength,
    reverse_gradient,
)
from kdistill.recipe import LossTerm


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward() -> None:
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(5.0, dtype=torch.float64)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(5.0, dtype=torch.float64))


def test_curriculum_rises_from_zero_to_strength_along_a_half_cosine() -> None:
    assert reversal_strength(0.0, curriculum=0.2, strength=2.0) == 0.0
    assert reversal_strength(0.1, curriculum=0.2, strength=2.0) == pytest.approx(1.0)
    assert reversal_strength(0.2, curriculum=0.2, strength=2.0) == 2.0
    assert reversal_strength(0.9, curriculum=0.2, strength=2.0) == 2.0
    assert reversal_strength(0.0, curriculum=0.0, strength=1.5) == 1.5


def test_temperature_starts_where_asked_and_stays_in_its_range() -> None:
    module = LearnableTemperature(low=1.0, high=21.0, start=4.0)
    assert module.value == pytest.approx(4.0)
    assert float(module(1.0).detach()) == pytest.approx(4.0)
    with torch.no_grad():
        module.theta.fill_(50.0)
    assert 20.99 < module.value <= 21.0
    with pytest.raises(ValueError, match="strictly between"):
        LearnableTemperature(low=1.0, high=21.0, start=21.0)


def test_theta_gets_the_reversed_gradient_of_the_loss() -> None:
    """dL/dθ through the layer equals −λ times the plain chain rule, in float64."""
    torch.manual_seed(0)
    student = torch.randn(6, 5, dtype=torch.float64)
    teacher = torch.randn(6, 5, dtype=torch.float64)
    module = LearnableTemperature(low=1.0, high=21.0, start=3.0).double()
    kd_loss(student, teacher, temperature=module(0.7), reduction="sum").backward()
    reversed_grad = module.theta.grad.clone()
    theta = module.theta.detach().clone().requires_grad_(True)
    plain = 1.0 + 20.0 * torch.sigmoid(theta)
    kd_loss(student, teacher, temperature=plain, reduction="sum").backward()
    assert reversed_grad == pytest.approx(-0.7 * float(theta.grad), rel=1e-12)


def _learned_term(**spec: object) -> LossTerm:
    return LossTerm(loss="kd", temperature={"kind": "learned", **spec})


def test_one_step_lowers_the_loss_in_the_student_and_raises_it_in_the_temperature() -> None:
    torch.manual_seed(0)
    objective = Objective([_learned_term(start=4.0, curriculum=0.0)])
    logits = torch.randn(8, 10, requires_grad=True)
    teacher = torch.randn(8, 10)
    (temperature,) = objective.extras.values()
    optimizer = torch.optim.SGD([logits, *temperature.parameters()], lr=0.5)

    def loss_at(student: torch.Tensor, t: float) -> float:
        return float(kd_loss(student.detach(), teacher, temperature=t, reduction="sum"))

    before_t, before_logits = temperature.value, logits.detach().clone()
    total, parts = objective(LossInputs(logits, None, teacher), progress=0.5)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    after_t = temperature.value
    assert after_t != before_t
    # the temperature moved up the loss (ascent), the student down it (descent)
    assert loss_at(before_logits, after_t) > loss_at(before_logits, before_t)
    assert loss_at(logits, before_t) < loss_at(before_logits, before_t)
    assert objective.temperatures() == {"kd": pytest.approx(after_t)}
    assert set(parts) == {"kd"}


def test_no_reversal_at_the_start_of_the_curriculum() -> None:
    objective = Objective([_learned_term(curriculum=0.5)])
    logits = torch.randn(4, 3, requires_grad=True)
    total, _ = objective(LossInputs(logits, None, torch.randn(4, 3)), progress=0.0)
    total.backward()
    (temperature,) = objective.extras.values()
    assert float(temperature.theta.grad) == 0.0


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"low": 5, "high": 2}, "needs low < high"),
        ({"start": 30}, "must lie strictly between low and high"),
        ({"curriculum": 2}, "less than or equal to 1"),
    ],
)
def test_bad_learned_temperatures_are_refused(spec: dict, needle: str) -> None:
    recipe = tiny_recipe()
    recipe["objective"][1]["temperature"] = {"kind": "learned", **spec}
    with pytest.raises(RecipeError, match=needle):
        kdistill.as_recipe(recipe)


def test_a_loss_without_temperature_refuses_a_learned_one() -> None:
    recipe = tiny_recipe()
    recipe["objective"][0]["temperature"] = {"kind": "learned"}  # cross_entropy
    with pytest.raises(RecipeError, match="takes no temperature"):
        kdistill.as_recipe(recipe)


def test_a_run_trains_the_temperature_and_records_it(tiny: dict, tmp_path: Path) -> None:
    recipe = tiny_recipe()
    recipe["objective"][1]["temperature"] = {"kind": "learned", "start": 4.0}
    kdistill.run(recipe, output_dir=tmp_path / "run", quiet=True)
    lines = (tmp_path / "run" / "distill" / "seed0" / "metrics.jsonl").read_text().splitlines()
    values = [json.loads(line)["temperature_kd"] for line in lines]
    assert len(values) == 2 and all(1.0 < v < 21.0 for v in values)
    assert not math.isclose(values[-1], 4.0, abs_tol=1e-4)  # it trained
    baseline = (tmp_path / "run" / "baseline" / "seed0" / "metrics.jsonl").read_text()
    assert "temperature_kd" not in baseline
