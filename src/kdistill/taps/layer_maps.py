"""Layer maps: which student layer learns from which teacher layer.

Uniform layer maps pair student layer i (0-based) with teacher layer
round_half_up((i + 1) · L_t / L_s) − 1, so the last student layer reads the last
teacher layer: L_s=3, L_t=6 gives 0↔1, 1↔3, 2↔5 ("every other layer, ending at the
last", the DistilBERT/TinyBERT convention); L_s=4, L_t=12 gives 0↔2, 1↔5, 2↔8, 3↔11.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from kdistill.errors import RecipeError


def layer_map(
    student_layers: Sequence[str],
    teacher_layers: Sequence[str],
    mode: Literal["uniform"] | Sequence[tuple[int, int]] = "uniform",
    *,
    where: str = "layer map",
) -> list[tuple[str, str]]:
    """Pairs (student layer, teacher layer) to distill.

    mode="uniform": one pair per student layer, student layer i (0-based) with teacher
    layer round_half_up((i + 1) · L_t / L_s) − 1 (at least 0), so the last student layer
    reads the last teacher layer. L_s=3, L_t=6 -> (0,1), (1,3), (2,5); L_s=2, L_t=12 ->
    (0,5), (1,11); L_s=1, L_t=5 -> (0,4); equal depths pair layer i with layer i.

    mode=[(i, j), ...]: explicit pairs of 0-based indices into the two lists (negative
    indices count from the end, -1 is the last layer). Raises RecipeError for an index
    past the last layer of either model, naming how many layers each has.
    """
    n_s, n_t = len(student_layers), len(teacher_layers)
    if n_s == 0 or n_t == 0:
        raise RecipeError(
            f"{where}: a layer map needs layers on both sides; got {n_s} student and {n_t} "
            "teacher layers. Check the layer lists or patterns (e.g. 'encoder.layer.*')."
        )
    if isinstance(mode, str):
        if mode != "uniform":
            raise RecipeError(
                f"{where}: the 'mode' must be 'uniform' or a list of (student, teacher) index "
                f"pairs. Got {mode!r} instead."
            )
        # round_half_up(x) = floor(x + 1/2), in integers to avoid float ties.
        teacher_index = [max(1, ((i + 1) * 2 * n_t + n_s) // (2 * n_s)) - 1 for i in range(n_s)]
        return [(student_layers[i], teacher_layers[j]) for i, j in enumerate(teacher_index)]

    pairs, errors = [], []
    for pair in mode:
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in pair)
        ):
            errors.append(
                f"{where}: the pair {pair!r} must be two layer indices (student, teacher)."
            )
            continue
        i, j = pair
        bad = [
            f"{side} index {n} is past its last layer"
            for side, n, count in (("student", i, n_s), ("teacher", j, n_t))
            if not -count <= n < count
        ]
        if bad:
            errors.append(
                f"{where}: pair ({i}, {j}): {' and '.join(bad)}; the student has {n_s} layers "
                f"(0..{n_s - 1}) and the teacher {n_t} (0..{n_t - 1})."
            )
            continue
        pairs.append((student_layers[i], teacher_layers[j]))
    if not pairs and not errors:
        errors.append(f"{where}: the list of layer pairs is empty; give at least one pair.")
    if errors:
        raise RecipeError("\n".join(errors))
    return pairs
