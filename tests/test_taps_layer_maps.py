"""Layer maps: the uniform map against its definition, explicit pairs and their errors."""

from __future__ import annotations

from fractions import Fraction
from math import floor

import pytest

from kdistill.errors import RecipeError
from kdistill.taps.layer_maps import layer_map


def uniform_reference(n_s: int, n_t: int) -> list[int]:
    return [max(1, floor(Fraction((i + 1) * n_t, n_s) + Fraction(1, 2))) - 1 for i in range(n_s)]


@pytest.mark.parametrize(
    ("n_s", "n_t", "expected"),
    [
        (3, 6, [1, 3, 5]),
        (2, 12, [5, 11]),
        (4, 4, [0, 1, 2, 3]),
        (1, 5, [4]),
        (4, 6, [1, 2, 4, 5]),
        (4, 12, [2, 5, 8, 11]),
        (6, 3, [0, 0, 1, 1, 2, 2]),
    ],
)
def test_uniform_layer_map(n_s: int, n_t: int, expected: list[int]) -> None:
    student = [f"s{i}" for i in range(n_s)]
    teacher = [f"t{j}" for j in range(n_t)]
    pairs = layer_map(student, teacher)
    assert pairs == [(f"s{i}", f"t{j}") for i, j in enumerate(expected)]
    assert uniform_reference(n_s, n_t) == expected


def test_uniform_layer_map_ends_at_last_layer_for_all_small_depths() -> None:
    for n_s in range(1, 13):
        for n_t in range(1, 25):
            teacher_index = [
                int(t[1:])
                for _, t in layer_map([f"s{i}" for i in range(n_s)], [f"t{j}" for j in range(n_t)])
            ]
            assert teacher_index == uniform_reference(n_s, n_t)
            assert teacher_index[-1] == n_t - 1
            assert teacher_index == sorted(teacher_index) and teacher_index[0] >= 0


def test_explicit_pairs_and_out_of_range() -> None:
    student, teacher = ["s0", "s1"], ["t0", "t1", "t2", "t3"]
    assert layer_map(student, teacher, [(0, 1), (1, -1)]) == [("s0", "t1"), ("s1", "t3")]
    with pytest.raises(RecipeError) as info:
        layer_map(student, teacher, [(0, 4), (2, 0), (0, 0)], where="objective[1]")
    message = str(info.value)
    assert "objective[1]: pair (0, 4): teacher index 4 is past its last layer" in message
    assert "pair (2, 0): student index 2" in message
    assert "the student has 2 layers (0..1) and the teacher 4 (0..3)" in message
    with pytest.raises(RecipeError, match="two layer indices"):
        layer_map(student, teacher, [(0, "t1")])  # type: ignore[list-item]
    with pytest.raises(RecipeError, match="'uniform' or a list"):
        layer_map(student, teacher, "every_other")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="got 0 student and 4 teacher layers"):
        layer_map([], teacher)
