"""One text file, or one split of a saved Hugging Face dataset, read into a `Table`:
the texts, the raw labels and where each row is (for error messages).

The format comes from the suffix (a folder is a saved dataset) unless given:
CSV, TSV, JSON Lines, plain text (one example per line, no labels) or hf_disk.
Reading rules, the same for every format:

- Texts are stripped of surrounding whitespace. Empty texts are refused (the
  error names how many and where) unless `drop_empty=True`, which skips them and
  records how many were skipped in `TextBundle.settings["dropped_empty"]`.
- CSV follows RFC 4180 (quotes allowed). TSV has no quoting: one line is one row,
  fields split at each TAB, as in GLUE (its texts contain `"` and `'` freely).
- Every problem is a `DataError` naming the file, the line (files) or row (saved
  datasets, 0-based) and the fix.

`text_labels` turns the raw labels into class indices.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdistill.errors import DataError

TextFormat = Literal["csv", "tsv", "jsonl", "txt", "hf_disk"]
_SUFFIXES: dict[str, TextFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # read as JSON Lines; a JSON array gets an error that says how to convert
    ".txt": "txt",
}
_FORMATS = ("csv", "tsv", "jsonl", "txt", "hf_disk")
SHOWN = 5  # rows named in an error message before "and N more"


@dataclass
class Table:
    """Columns read from one file: texts (stripped), raw labels, and where each row is."""

    path: Path
    texts: list[str]
    labels: list[Any] | None
    places: list[int]  # line number (files, 1-based) or row index (saved datasets, 0-based)
    unit: str  # "line" or "row"
    class_names: list[str] | None = None  # from a datasets ClassLabel feature
    dropped: int = 0

    def where(self, indices: Sequence[int]) -> str:
        shown = ", ".join(str(self.places[i]) for i in indices[:SHOWN])
        more = f" and {len(indices) - SHOWN} more" if len(indices) > SHOWN else ""
        return f"{self.unit}{'s' if len(indices) > 1 else ''} {shown}{more}"


def read_table(
    path: Path, *, format: TextFormat | None, columns: list[str], split: str | None = None
) -> Table:
    """The `columns` (text, then label if given) of the file at `path`, or of `split` of a
    saved dataset; the format from the suffix unless given."""
    path = path.expanduser()
    fmt = format or _infer_format(path)
    if fmt not in _FORMATS:
        raise DataError(f"{path}: format {fmt!r} is not one of {list(_FORMATS)}")
    if fmt == "hf_disk":
        return _read_hf_disk(path, split, columns)
    if split is not None:
        raise DataError(f"{path}: split {split!r} applies to saved datasets only (format hf_disk)")
    if path.is_dir():
        raise DataError(
            f"{path} is a folder; give a CSV, TSV, JSON Lines or text file, or, for a folder "
            "written by datasets' save_to_disk, use the hf_disk format"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if fmt == "txt":
            if len(columns) > 1:
                raise DataError(
                    f"{path}: a plain text file has no label column ({columns[1]!r}); use it "
                    "as unlabelled transfer text, or give labelled data as CSV, TSV or JSON Lines"
                )
            return _read_txt(path)
        if fmt == "jsonl":
            return _read_jsonl(path, columns)
        return _read_delimited(path, fmt, columns)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: byte {exc.start} is not UTF-8 text ({exc.reason}); is it a {fmt} file? "
            "Save it as UTF-8"
        ) from None


def _infer_format(path: Path) -> TextFormat:
    if path.is_dir():
        return "hf_disk"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; name the file "
            f"{', '.join(sorted(_SUFFIXES))}, or set the format to one of csv, tsv, jsonl, txt"
        )
    return fmt


def _read_txt(path: Path) -> Table:
    texts, places = [], []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                texts.append(line.strip())
                places.append(line_no)
    return Table(path, texts, None, places, "line")


def _read_delimited(path: Path, fmt: str, columns: list[str]) -> Table:
    with path.open(newline="", encoding="utf-8-sig") as f:
        if fmt == "tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; expected a header row naming the columns")
            header = [name.strip() for name in header]
            _require_columns(path, fmt, header, columns, place="the header")
            at = [header.index(name) for name in columns]
            values: list[list[str]] = [[] for _ in columns]
            places = []
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(row)} fields, but the header has "
                        f"{len(header)} ({header})" + _delimiter_hint(fmt)
                    )
                for column, i in zip(values, at):
                    column.append(row[i])
                places.append(reader.line_num)
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: not valid {fmt} ({exc})") from None
    labels = [value.strip() for value in values[1]] if len(columns) > 1 else None
    return Table(path, [text.strip() for text in values[0]], labels, places, "line")


def _delimiter_hint(fmt: str) -> str:
    if fmt == "tsv":
        return "; in a TSV file a TAB inside a text splits it (TSV has no quoting): use CSV"
    return "; quote texts that contain commas"


def _require_columns(
    path: Path, fmt: str, found: list[str], wanted: list[str], *, place: str
) -> None:
    missing = [name for name in wanted if name not in found]
    if not missing:
        return
    roles = dict(zip(wanted, ["text", "label"]))
    what = " and ".join(f"{roles[name]} column {name!r}" for name in missing)
    hint = ""
    if len(found) == 1 and fmt in ("csv", "tsv"):
        other = "\t" if fmt == "csv" else ","
        if other in found[0]:
            hint = f" The header has one column holding {other!r}: is it a {'TSV' if fmt == 'csv' else 'CSV'} file? Set the format or rename the file."
        elif found[0].lstrip().startswith(("{", "[")):
            hint = " It looks like JSON: set the format to jsonl or name the file .jsonl."
    raise DataError(
        f"{path}: no {what}; {place} has the columns {found}. Set the "
        f"{' and '.join(roles[name] + '_column' for name in missing)} to one of them.{hint}"
    )


def _read_jsonl(path: Path, columns: list[str]) -> Table:
    values: list[list[Any]] = [[] for _ in columns]
    places = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = ""
                if line_no == 1 and line.lstrip().startswith("["):
                    hint = (
                        " The file looks like one JSON array; JSON Lines holds one object per "
                        "line. Convert it with: jq -c '.[]' in.json > out.jsonl"
                    )
                elif line_no == 1:
                    hint = " Is it a CSV or TSV file? Set the format or rename the file."
                raise DataError(
                    f"{path}, line {line_no}: not valid JSON ({exc.msg} at column {exc.colno})."
                    + hint
                ) from None
            if not isinstance(record, dict):
                hint = ""
                if isinstance(record, list) and record and isinstance(record[0], dict):
                    hint = ". The file looks like one JSON array: convert it with jq -c '.[]' in.json > out.jsonl"
                raise DataError(
                    f"{path}, line {line_no}: a JSON {type(record).__name__}, but JSON Lines "
                    f'data must hold one object per line, e.g. {{"text": "...", "label": 1}}' + hint
                )
            _require_columns(path, "jsonl", list(record), columns, place=f"line {line_no}")
            for column, name in zip(values, columns):
                column.append(record[name])
            places.append(line_no)
    table = Table(path, [], values[1] if len(columns) > 1 else None, places, "line")
    table.texts = _as_texts(table, values[0], columns[0])
    return table


def _read_hf_disk(path: Path, split: str | None, columns: list[str]) -> Table:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading a dataset saved with save_to_disk needs the Hugging Face "
            "`datasets` package: pip install datasets"
        ) from None
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (a dataset saved with save_to_disk)")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"{path}: datasets.load_from_disk cannot read it ({exc}); the folder must be "
            "written by Dataset.save_to_disk or DatasetDict.save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise DataError(
                f"{path} holds a DatasetDict with the splits {sorted(loaded)}; choose one "
                "(split: name)"
            )
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r}; the saved DatasetDict has the splits "
                f"{sorted(loaded)}. Set the split names (train, validation, test) to match"
            )
        dataset = loaded[split]
        place = f"split {split!r}"
    else:
        if split not in (None, "train"):
            raise DataError(
                f"{path} holds a single Dataset, not a DatasetDict with splits, so split "
                f"{split!r} does not exist; save a DatasetDict, or one folder per split"
            )
        dataset = loaded
        place = "the dataset"
    _require_columns(path, "hf_disk", list(dataset.column_names), columns, place=place)
    data = dataset.select_columns(columns).to_dict()
    table = Table(path, [], None, list(range(len(dataset))), "row")
    table.texts = _as_texts(table, data[columns[0]], columns[0])
    if len(columns) > 1:
        table.labels = data[columns[1]]
        feature = dataset.features[columns[1]]
        if isinstance(feature, datasets.ClassLabel):
            table.class_names = list(feature.names)
    return table


def _as_texts(table: Table, values: list[Any], column: str) -> list[str]:
    """Stripped strings; None counts as an empty text, anything else that is not a string
    is an error."""
    bad = [i for i, v in enumerate(values) if v is not None and not isinstance(v, str)]
    if bad:
        raise DataError(
            f"{table.path}: the text column {column!r} holds {type(values[bad[0]]).__name__} "
            f"values ({values[bad[0]]!r} at {table.where(bad)}); texts must be strings"
        )
    return [(v or "").strip() for v in values]


def check_empty(table: Table, column: str, drop_empty: bool) -> Table:
    """`table` without its empty texts when `drop_empty` (counted in `dropped`); else a
    DataError naming them, if there are any."""
    empty = [i for i, text in enumerate(table.texts) if not text]
    if not empty:
        return table
    if not drop_empty:
        raise DataError(
            f"{table.path}: {len(empty)} of {len(table.texts)} texts in column {column!r} are "
            f"empty or only whitespace ({table.where(empty)}). Remove those rows, or set "
            "drop_empty: true to skip them"
        )
    keep = [i for i, text in enumerate(table.texts) if text]
    return Table(
        table.path,
        [table.texts[i] for i in keep],
        None if table.labels is None else [table.labels[i] for i in keep],
        [table.places[i] for i in keep],
        table.unit,
        table.class_names,
        dropped=len(empty),
    )
