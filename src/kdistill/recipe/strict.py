"""The base of every recipe section, and how cross-field checks report problems."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


def raise_all(problems: list[str]) -> None:
    """Cross-field checks collect every problem and raise once: one ValueError whose lines
    are the problems, each listed on its own by `recipe.load.validate_recipe`."""
    if problems:
        raise ValueError("\n".join(problems))


class Strict(BaseModel):
    # a number that is not finite (.inf, .nan) is refused in every section: a learning
    # rate of .inf would otherwise be found as a NaN loss after the first step
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
