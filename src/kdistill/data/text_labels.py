"""The class names of a text dataset, and its raw labels as class indices.

- Labels are integers or strings. Without `class_names`, the classes come from
  the training split: if every label is an integer, class k is named "k" and there
  are max + 1 classes; otherwise the distinct labels, sorted, are the class names.
  Sorted rather than in order of first appearance, so that shuffling or
  re-exporting a file never renumbers the classes. With `class_names`, a label
  equal to a class name is that class, and an integer label k is class k.
- Validation and test labels must be classes of the training split (or of
  `class_names`): a typo in a test label is an error, not a new class.
- Every problem is a `DataError` naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from kdistill.data.text import UNLABELLED
from kdistill.data.text_readers import SHOWN, Table
from kdistill.errors import DataError

_INTEGER = re.compile(r"[+-]?\d+")


def _as_int(label: Any) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str) and _INTEGER.fullmatch(label.strip()):
        return int(label)
    return None


def _check_label_types(table: Table, column: str) -> None:
    assert table.labels is not None
    missing = [
        i for i, v in enumerate(table.labels) if v is None or (isinstance(v, str) and not v.strip())
    ]
    if missing:
        raise DataError(
            f"{table.path}: {len(missing)} of {len(table.labels)} rows have no label in column "
            f"{column!r} ({table.where(missing)}). Label them, remove them, or read the file as "
            "unlabelled transfer text"
        )
    bad = [
        i for i, v in enumerate(table.labels) if isinstance(v, bool) or not isinstance(v, int | str)
    ]
    if bad:
        value = table.labels[bad[0]]
        raise DataError(
            f"{table.path}: the label column {column!r} holds {value!r} "
            f"({type(value).__name__}) at {table.where(bad)}; labels must be integer class "
            "indices or class names (strings)"
        )


def resolve_classes(train: Table, column: str, class_names: Sequence[str] | None) -> list[str]:
    """The class names: given, else from a ClassLabel feature, else from the train labels."""
    _check_label_types(train, column)
    if class_names is not None:
        names = [str(name) for name in class_names]
        repeated = sorted(name for name, n in Counter(names).items() if n > 1)
        if not names or repeated:
            raise DataError(
                f"class_names must list each class once; got {names}"
                + (f" (repeated: {repeated})" if repeated else "")
            )
        return names
    if train.class_names is not None:
        return train.class_names
    assert train.labels is not None
    maybe_numbers = [_as_int(label) for label in train.labels]
    numbers = [n for n in maybe_numbers if n is not None]
    if len(numbers) == len(maybe_numbers):
        negative = [i for i, n in enumerate(numbers) if n < 0]
        if negative:
            raise DataError(
                f"{train.path}: label {numbers[negative[0]]} in column {column!r} at "
                f"{train.where(negative)} is negative; integer labels are class indices 0, 1, "
                "... (GLUE-style test splits mark a missing label with -1: use a labelled split)"
            )
        return [str(k) for k in range(max(numbers, default=-1) + 1)]
    return sorted({str(label).strip() for label in train.labels})


def encode_labels(table: Table, column: str, class_names: list[str]) -> torch.Tensor:
    """The table's labels as indices into `class_names`, (N,) int64; a label that is not
    one of the classes is a DataError."""
    _check_label_types(table, column)
    assert table.labels is not None
    index = {name: i for i, name in enumerate(class_names)}
    encoded, unknown = [], []
    for i, label in enumerate(table.labels):
        k = index.get(str(label).strip())
        if k is None:
            number = _as_int(label)
            k = number if number is not None and 0 <= number < len(class_names) else None
        if k is None:
            unknown.append(i)
            k = UNLABELLED
        encoded.append(k)
    if unknown:
        values = list(dict.fromkeys(repr(table.labels[i]) for i in unknown))
        hidden = any(_as_int(table.labels[i]) == -1 for i in unknown)
        raise DataError(
            f"{table.path}: {len(unknown)} labels in column {column!r} are not among the "
            f"{len(class_names)} classes {class_names}: {', '.join(values[:SHOWN])} at "
            f"{table.where(unknown)}. Fix those labels, or set class_names to every class in "
            "order (the classes come from the training labels unless given)"
            + (
                ". Label -1 marks a hidden label (GLUE-style test splits): use a labelled "
                "split as the test split"
                if hidden
                else ""
            )
        )
    return torch.tensor(encoded, dtype=torch.int64)
