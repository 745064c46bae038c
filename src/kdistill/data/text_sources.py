"""Text classification datasets as `TextBundle`s, and unlabelled text for a transfer set.

Sources, each returning a `TextBundle` (train, val, test, class names):

- `load_sst2(folder)`: GLUE SST-2 (`train.tsv`, `dev.tsv`). GLUE hides the test
  labels, so `dev.tsv` is the test split; validation is carved from train, by
  rows (`split_validation`) or by whole sentences (`split_validation_by_sentence`:
  train.tsv is mostly phrases of its own sentences).
- `load_text_files(train=..., test=...)`: your own CSV, TSV or JSON Lines files
  with a text column and a label column.
- `load_hf_disk(path)`: a Hugging Face dataset saved with `save_to_disk`.

One labelled file: `read_labelled(path)`. Unlabelled text for a transfer set:
`read_unlabelled(path)` reads a plain text file (one example per line), or CSV /
TSV / JSON Lines / a saved dataset with a text column. Its labels are
`UNLABELLED` (-1).

Every source reads its files by the same rules: texts, formats and errors in
`text_readers`, labels and classes in `text_labels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from kdistill.data.text import (
    TextBundle,
    TextSplit,
    split_validation,
    split_validation_by_sentence,
)
from kdistill.data.text_labels import encode_labels, resolve_classes
from kdistill.data.text_readers import TextFormat, check_empty, read_table
from kdistill.errors import DataError

SST2_CLASSES = ["negative", "positive"]


def load_sst2(
    folder: str | Path,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    val_unit: Literal["rows", "sentences"] = "sentences",
) -> TextBundle:
    """GLUE SST-2 from `folder` (holding train.tsv and dev.tsv, e.g. shared/data/sst2).

    train.tsv (67,349 phrases and sentences) gives train and validation; dev.tsv
    (872 sentences) is the test split, since GLUE keeps its test labels hidden.
    Classes: 0 negative, 1 positive. Texts lose GLUE's trailing space.

    val_unit "sentences" (the default) holds out whole sentences, like dev.tsv, and
    drops their own phrases from train (`split_validation_by_sentence`). "rows" takes
    a random val_fraction of the rows, most of which are phrases of training sentences
    (about 88% of them occur verbatim inside a training text), so validation scores
    run high.
    """
    folder = Path(folder).expanduser()
    paths = [folder / "train.tsv", folder / "dev.tsv"]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
        raise DataError(
            f"{folder}: SST-2 needs the GLUE files train.tsv and dev.tsv; missing "
            f"{missing}, found {found if found is not None else 'no such folder'}. Point the "
            "path at the folder of GLUE's SST-2.zip (header 'sentence<TAB>label')"
        )
    full, classes = read_labelled(
        paths[0], text_column="sentence", class_names=SST2_CLASSES, format="tsv"
    )
    test, _ = read_labelled(paths[1], text_column="sentence", class_names=classes, format="tsv")
    settings: dict[str, Any] = {
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "val_unit": val_unit,
        "test_from": "dev.tsv",
    }
    if val_unit == "rows":
        train, val = split_validation(full, val_fraction, split_seed)
    elif val_unit == "sentences":
        train, val, settings["dropped_val_phrases"] = split_validation_by_sentence(
            full, val_fraction, split_seed
        )
    else:
        raise ValueError(f"val_unit must be 'rows' or 'sentences'; got {val_unit!r}")
    return TextBundle(
        train=train,
        val=val,
        test=test,
        class_names=classes,
        source="sst2",
        source_files=paths,
        settings=settings,
    )


def load_text_files(
    *,
    train: str | Path,
    test: str | Path,
    val: str | Path | None = None,
    format: TextFormat | None = None,
    text_column: str = "text",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    drop_empty: bool = False,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> TextBundle:
    """Your own labelled files: CSV, TSV or JSON Lines (format from the suffix unless given).

    Without a `val` file, validation is carved from train (`val_fraction`, seeded by
    `split_seed`); with one, nothing is carved and `val_fraction` is not used.
    """
    paths = {"train": Path(train), "test": Path(test)} | ({"val": Path(val)} if val else {})
    return _labelled_bundle(
        "files",
        {name: {"path": path, "format": format} for name, path in paths.items()},
        text_column=text_column,
        label_column=label_column,
        class_names=class_names,
        drop_empty=drop_empty,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )


def load_hf_disk(
    path: str | Path,
    *,
    train_split: str = "train",
    test_split: str = "test",
    val_split: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    drop_empty: bool = False,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> TextBundle:
    """A `datasets.DatasetDict` saved with `save_to_disk` (needs `pip install datasets`).

    A `ClassLabel` label column gives the class names, unless `class_names` is set.
    GLUE-style test splits whose labels are all -1 cannot be the test split: use the
    labelled validation split (`test_split="validation"`).
    """
    splits = {"train": train_split, "test": test_split} | ({"val": val_split} if val_split else {})
    return _labelled_bundle(
        "hf_disk",
        {name: {"path": Path(path), "format": "hf_disk", "split": s} for name, s in splits.items()},
        text_column=text_column,
        label_column=label_column,
        class_names=class_names,
        drop_empty=drop_empty,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )


def _labelled_bundle(
    source: str,
    where: dict[str, dict[str, Any]],
    *,
    text_column: str,
    label_column: str,
    class_names: Sequence[str] | None,
    drop_empty: bool,
    val_fraction: float,
    split_seed: int,
) -> TextBundle:
    columns = {"text_column": text_column, "label_column": label_column}
    tables = {
        name: read_table(**spec, columns=[text_column, label_column])
        for name, spec in where.items()
    }
    tables = {name: check_empty(table, text_column, drop_empty) for name, table in tables.items()}
    classes = resolve_classes(tables["train"], label_column, class_names)
    parts = {
        name: TextSplit(table.texts, encode_labels(table, label_column, classes))
        for name, table in tables.items()
    }
    if "val" in parts:
        train, val = parts["train"], parts["val"]
    else:
        train, val = split_validation(parts["train"], val_fraction, split_seed)
    files = list(dict.fromkeys(table.path for table in tables.values()))
    settings: dict[str, Any] = {
        **columns,
        "val_fraction": None if "val" in parts else val_fraction,
        "split_seed": None if "val" in parts else split_seed,
        "class_names_given": class_names is not None,
        "dropped_empty": {name: table.dropped for name, table in tables.items()},
    }
    if source == "hf_disk":
        settings["hf_splits"] = {name: spec["split"] for name, spec in where.items()}
    return TextBundle(
        train=train,
        val=val,
        test=parts["test"],
        class_names=classes,
        source=source,
        source_files=files,
        settings=settings,
    )


def read_labelled(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    format: TextFormat | None = None,
    split: str | None = None,
    drop_empty: bool = False,
) -> tuple[TextSplit, list[str]]:
    """One labelled file (or saved dataset split) and its class names (read by the rules of
    `text_readers` and `text_labels`)."""
    table = read_table(Path(path), format=format, split=split, columns=[text_column, label_column])
    table = check_empty(table, text_column, drop_empty)
    classes = resolve_classes(table, label_column, class_names)
    return TextSplit(table.texts, encode_labels(table, label_column, classes)), classes


def read_unlabelled(
    path: str | Path,
    *,
    text_column: str = "text",
    format: TextFormat | None = None,
    split: str | None = None,
    drop_empty: bool = False,
) -> TextSplit:
    """Transfer text without labels: a .txt file holds one example per line (blank lines
    are skipped); CSV / TSV / JSON Lines / saved datasets need `text_column` and may
    have other columns, which are ignored."""
    table = read_table(Path(path), format=format, split=split, columns=[text_column])
    return TextSplit.unlabelled(check_empty(table, text_column, drop_empty).texts)
