"""The `tune:` section of a recipe: what `kdistill tune` searches and how.

    tune:
      space:                                   # recipe paths, as --set writes them
        objective.1.temperature: {low: 1, high: 10}
        objective.1.weight: {low: 0.1, high: 0.9}
        train.optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
        train.batch_size: {choices: [64, 128]}
        student.model.args.width: {low: 8, high: 32, step: 8, type: int}
      sampler: tpe                             # grid | random | tpe | cmaes | nsga2
      objectives: [val]                        # plus latency, params, flops, size
      pruner: median                           # none | median | hyperband (one objective)

Every check here needs only the section itself; the paths are checked against the
recipe by `kdistill.tune.check_space` (they need the rest of the recipe).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdistill.recipe.strict import Strict, raise_all

Scalar = bool | int | float | str | None
SAMPLERS = ("grid", "random", "tpe", "cmaes", "nsga2")
COSTS = ("latency", "params", "flops", "size")


class Param(Strict):
    """One searched value: a range (`low`, `high`, optionally `log` or `step`, `type`
    int or float) or a list of `choices` (any YAML values: numbers, names, whole
    sections such as a list of loss terms)."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0, description="range values low, low+step, ... only")
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        problems: list[str] = []
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.step is not None or self.log:
                problems.append("give either choices or a range (low, high), not both")
            if not self.choices:
                problems.append("choices is empty: list at least one value")
            return self._raise(problems)
        if self.low is None or self.high is None:
            return self._raise(["a range needs both low and high (or give choices)"])
        if self.low >= self.high:
            what = "empty" if self.low == self.high else "inverted"
            problems.append(
                f"the range is {what}: low {self.low:g} must be below high {self.high:g}"
                + ("; for one fixed value use --set instead" if what == "empty" else "")
            )
        if self.log and self.low <= 0:
            problems.append(
                f"log scale needs low > 0 (got {self.low:g}); search a positive range or drop log"
            )
        if self.log and self.step is not None:
            problems.append("log and step cannot be combined (Optuna's rule): drop one")
        if self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and not float(value).is_integer():
                    problems.append(f"type int needs a whole {name}; got {value:g}")
        return self._raise(problems)

    def _raise(self, problems: list[str]) -> Param:
        raise_all(problems)
        return self

    @property
    def discrete(self) -> bool:
        """Whether the values can be listed (a grid can search it)."""
        return self.choices is not None or self.step is not None or self.type == "int"

    def grid(self) -> list[Any]:
        """Every value of a discrete parameter, in order."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        step = self.step or 1.0
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        values = [self.low + i * step for i in range(count)]
        return [round(v) for v in values] if self.type == "int" else values

    def holds(self, value: Any) -> bool:
        """Whether the recipe's own value is one this parameter can take."""
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        if self.discrete:
            return any(math.isclose(value, v, rel_tol=1e-9, abs_tol=1e-12) for v in self.grid())
        return True


class PrunerConfig(Strict):
    """Stops trials whose validation score lags the others' at the same epoch."""

    name: Literal["none", "median", "hyperband"] = "none"
    min_epochs: int = Field(
        2,
        ge=1,
        description="no trial is stopped before this many epochs: a distilled student often "
        "starts slower than one trained on labels alone (its soft targets and a high "
        "temperature give small gradients at first) and overtakes it later",
    )
    startup_trials: int = Field(
        5, ge=0, description="median: trials that run to the end before any is stopped"
    )


class TuneConfig(Strict):
    space: dict[str, Param] = Field(min_length=1, description="recipe path -> searched values")
    sampler: Literal["grid", "random", "tpe", "cmaes", "nsga2"] = "tpe"
    sampler_seed: int = 0
    objectives: list[Literal["val", "latency", "params", "flops", "size"]] = Field(
        default=["val"],
        min_length=1,
        description="val (the task's validation score) first, then costs to minimise",
    )
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    trials: int = Field(20, ge=1, description="trials of the study (all workers together)")
    seed: int | None = Field(None, description="the trials' training seed (default seeds[0])")
    baseline: bool = Field(False, description="trials also train the student alone")
    final_seeds: list[int] | None = Field(
        None, description="seeds of the best settings' re-run, measured on test (default seeds)"
    )
    final_limit: int = Field(
        6, ge=1, description="several objectives: re-run at most this many Pareto-optimal trials"
    )

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("space")
    @classmethod
    def _paths(cls, space: dict[str, Param]) -> dict[str, Param]:
        fixed = ("teacher", "data", "seeds", "stages", "output", "tune", "name", "task")
        for path in space:
            head = path.split(".")[0]
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"{path!r} is not a dotted path like train.optimizer.lr")
            if head in fixed:
                raise ValueError(
                    f"{path}: {head} is fixed for a whole study (one teacher and one data "
                    "split serve every trial, so trials stay comparable); search the "
                    "student, the objective and the training settings"
                )
        return space

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        problems: list[str] = []
        if self.objectives[0] != "val" or self.objectives.count("val") > 1:
            problems.append("objectives: list val first, once, then the costs (latency, ...)")
        if len(set(self.objectives)) != len(self.objectives):
            problems.append(f"objectives: each may appear once; got {self.objectives}")
        several = len(self.objectives) > 1
        if several and self.pruner.name != "none":
            problems.append(
                f"pruner {self.pruner.name} stops a trial on one score, but this study has "
                f"{len(self.objectives)} objectives ({', '.join(self.objectives)}) and a "
                "trial that looks worse on one may sit on the Pareto front on another "
                "(Optuna refuses it too); set pruner: none"
            )
        if self.sampler == "cmaes" and several:
            problems.append("sampler cmaes searches one objective; use nsga2 for several")
        if self.sampler == "grid":
            continuous = [path for path, param in self.space.items() if not param.discrete]
            if continuous:
                problems.append(
                    f"sampler grid needs values it can list, but {', '.join(continuous)} "
                    "is a continuous range: give it a step, type int or choices"
                )
        raise_all(problems)
        return self
