"""Your own arrays: `npz` and `csv`, a train file and a test file.

The files are train.npz and test.npz (train.csv and test.csv) in the folder
`data.path`, or any two files named by `data.train` and `data.test`. Relative
paths resolve against the current directory, then the data folder. The content
digest covers each file's content under its part (train, test), not its name or
place, so the same files give the same fingerprint either way.

npz: each file holds `x` (N, ...) and `y` (N,) integer labels. 2-D `x` is tabular
(N, F) and read as float32. 3-D or 4-D `x` is images, (N, H, W) -> (N, 1, H, W),
(N, H, W, C) -> (N, C, H, W), held as uint8 pixels 0-255:

- uint8 `x` is taken as it is;
- float `x` follows one rule, decided over the train and test arrays together so
  that both files are read the same way: when every value lies in [0, 1] the
  values are scaled by 255, otherwise they are taken as they are (0-255); either
  way they are rounded to the nearest integer (halves to even). NaN, infinity,
  negative values and values above 255 are refused, naming the file and the
  minimum and maximum found.

Classes are "0" .. "C-1" with C = max label + 1.

csv: a header row, numeric feature columns and the label column (`label_column`).
Integer labels give classes "0" .. "C-1" with C = max label + 1; any other labels
are class names, sorted, and numbered in that order.
"""

from __future__ import annotations

import csv
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from kdistill.data.bundle import LoadedSource, Split
from kdistill.data.paths import digest_files, require_file, resolve_user_file, resolve_user_path
from kdistill.errors import DataError
from kdistill.recipe import DataConfig

NPZ_LAYOUT = "train.npz and test.npz, each with arrays x (N, ...) and y (N,)"
CSV_LAYOUT = "train.csv and test.csv, each with a header row, feature columns and a label column"
NPZ_FILE = "an .npz file with arrays x (N, ...) and y (N,)"
CSV_FILE = "a .csv file with a header row, feature columns and a label column"
SPLITS = ("train", "test")


def _train_test_files(
    cfg: DataConfig, data_root: Path, *, source: str, suffix: str, layout: str, expects: str
) -> list[Path]:
    """[train, test]: the files data.train and data.test, or train<suffix> and
    test<suffix> in the folder data.path (the schema allows one way or the other)."""
    if cfg.train is not None and cfg.test is not None:
        named = {"train": cfg.train, "test": cfg.test}
        return [
            resolve_user_file(
                named[split], data_root, field=f"data.{split}", source=source, expects=expects
            )
            for split in SPLITS
        ]
    folder = resolve_user_path(
        cfg.path,
        data_root,
        source=source,
        layout=layout,
        alternative="; or name the two files with data.train and data.test",
    )
    return [require_file(folder, f"{split}{suffix}", source=source) for split in SPLITS]


def _content_digest(files: list[Path], suffix: str, *options: tuple[str, str]) -> str:
    """The files' content, each under its part's conventional name (train.npz, ...), so
    neither the folder nor the file names change it; plus any reading option."""
    named = [(f"{split}{suffix}", _sha256(path)) for split, path in zip(SPLITS, files, strict=True)]
    return digest_files(named + list(options))


# ----------------------------------------------------------------------------- npz


def load_npz(cfg: DataConfig, data_root: Path) -> LoadedSource:
    files = _train_test_files(
        cfg, data_root, source="npz", suffix=".npz", layout=NPZ_LAYOUT, expects=NPZ_FILE
    )
    (train_x, train_y), (test_x, test_y) = (_read_npz(path) for path in files)
    scale = _float_image_scale([(files[0], train_x), (files[1], test_x)])
    train_x, test_x = _as_inputs(files[0], train_x, scale), _as_inputs(files[1], test_x, scale)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{files[0]}: x has samples of shape {tuple(train_x.shape[1:])}, but x in "
            f"{files[1]} {tuple(test_x.shape[1:])}; both must describe the same inputs"
        )
    num_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    return LoadedSource(
        train=Split(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        test=Split(torch.from_numpy(test_x), torch.from_numpy(test_y)),
        class_names=[str(c) for c in range(num_classes)],
        source_files=files,
        content_digest=_content_digest(files, ".npz"),
        train_origin=files[0],
        test_origin=files[1],
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x as stored (checked against y), and y as (N,) int64."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            found = sorted(arrays.files)
            if "x" not in found or "y" not in found:
                raise DataError(
                    f"{path}: expected arrays named 'x' and 'y', found {found}; save with "
                    "np.savez(path, x=features_or_images, y=labels)"
                )
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read it as an .npz file ({exc})") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: y must be a 1-D array of integer class labels; found {y.dtype} with "
            f"shape {y.shape}"
        )
    if x.ndim == 0 or x.shape[0] != y.shape[0]:
        raise DataError(
            f"{path}: x (shape {x.shape}) must have one sample per label in y ({y.shape[0]})"
        )
    if not (_is_features(x) or _is_float_images(x) or (x.ndim in (3, 4) and x.dtype == np.uint8)):
        raise DataError(
            f"{path}: x is {x.dtype} with shape {x.shape}; expected (N, F) numeric features, "
            "or images (N, H, W), (N, C, H, W) or (N, H, W, C) holding uint8 pixels 0-255 or "
            "floats in [0, 1] or [0, 255]. Integer pixels 0-255: convert with "
            "x.astype(np.uint8); other inputs: flatten to (N, F)"
        )
    return x, y.astype(np.int64)


def _is_features(x: np.ndarray) -> bool:
    return x.ndim == 2 and (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_)


def _is_float_images(x: np.ndarray) -> bool:
    return x.ndim in (3, 4) and np.issubdtype(x.dtype, np.floating)


def _float_image_scale(arrays: list[tuple[Path, np.ndarray]]) -> float:
    """255 when every value of the float images among `arrays` (train, test) lies in
    [0, 1], else 1. A value that is not finite, negative or above 255 is refused."""
    highest = 0.0
    for path, x in arrays:
        if not _is_float_images(x) or x.size == 0:
            continue
        finite = np.isfinite(x)
        if not finite.all():
            lo, hi = (np.nanmin(x), np.nanmax(x)) if not np.isnan(x).all() else (np.nan, np.nan)
            raise DataError(
                f"{path}: x holds float images with {int(x.size - finite.sum())} NaN or "
                f"infinite values (min {lo:g}, max {hi:g}); pixels must be finite numbers in "
                "[0, 1] or [0, 255]"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{path}: x holds float images with values from {lo:g} to {hi:g}; float "
                "pixels must lie in [0, 1] (scaled by 255) or [0, 255] (taken as they are). "
                "Undo any normalisation first: training normalises inputs with the training "
                "set's own mean and std"
            )
        highest = max(highest, hi)
    return 255.0 if highest <= 1 else 1.0


def _as_inputs(path: Path, x: np.ndarray, scale: float) -> np.ndarray:
    """x (of a kind `_read_npz` accepts) as (N, F) float32 features or (N, C, H, W) uint8
    images; float images are multiplied by `scale` (`_float_image_scale`) and rounded."""
    if _is_features(x):
        return x.astype(np.float32)  # (N, F)
    if _is_float_images(x):
        wide = np.promote_types(x.dtype, np.float32)  # a float16 product near 255 is 1/8 apart
        x = np.rint(np.multiply(x, scale, dtype=wide)).astype(np.uint8)
    if x.ndim == 3:
        return x[:, None]  # (N, H, W) -> (N, 1, H, W)
    if x.shape[1] in (1, 3):
        return x
    if x.shape[3] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)
    raise DataError(
        f"{path}: x has shape {x.shape}, which is neither (N, C, H, W) nor (N, H, W, C) "
        "with C = 1 or 3 channels"
    )


# ----------------------------------------------------------------------------- csv


def load_csv(cfg: DataConfig, data_root: Path) -> LoadedSource:
    files = _train_test_files(
        cfg, data_root, source="csv", suffix=".csv", layout=CSV_LAYOUT, expects=CSV_FILE
    )
    (train_x, train_labels, columns), (test_x, test_labels, test_columns) = (
        _read_csv(path, cfg.label_column) for path in files
    )
    if sorted(test_columns) != sorted(columns):
        raise DataError(
            f"{files[0]} and {files[1]} must have the same feature columns; only in the "
            f"train file: {sorted(set(columns) - set(test_columns)) or 'none'}; only in the "
            f"test file: {sorted(set(test_columns) - set(columns)) or 'none'}"
        )
    test_x = test_x[:, [test_columns.index(c) for c in columns]]  # train's column order
    class_names, (train_y, test_y) = _encode_labels([train_labels, test_labels])
    return LoadedSource(
        train=Split(torch.from_numpy(train_x), train_y),
        test=Split(torch.from_numpy(test_x), test_y),
        class_names=class_names,
        source_files=files,
        # the label column decides what is read, so it is part of the content
        content_digest=_content_digest(files, ".csv", ("label_column", cfg.label_column)),
        train_origin=files[0],
        test_origin=files[1],
    )


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Features (N, F) float32, the label strings, and the feature column names."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty; expected a header row, then one row per sample")
        header = [name.strip() for name in header]
        if label_column not in header:
            raise DataError(
                f"{path}: no label column {label_column!r}; the columns are {header}. Set "
                "data.label_column to the column that holds the labels."
            )
        rows = []
        for row in reader:
            if not row:
                continue  # a trailing blank line
            if len(row) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(row)} values, but the header has "
                    f"{len(header)} columns"
                )
            rows.append(row)
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    label_at = header.index(label_column)
    columns = [name for i, name in enumerate(header) if i != label_at]
    if not columns:
        raise DataError(f"{path}: no feature columns besides the label column {label_column!r}")
    labels = [row[label_at].strip() for row in rows]
    cells = [[v for i, v in enumerate(row) if i != label_at] for row in rows]
    try:
        x = np.array(cells, dtype=np.float32).reshape(len(rows), len(columns))
    except ValueError:
        raise DataError(_first_non_numeric(path, cells, columns)) from None
    return x, labels, columns


def _first_non_numeric(path: Path, cells: list[list[str]], columns: list[str]) -> str:
    for r, row in enumerate(cells):
        for c, value in enumerate(row):
            try:
                float(value)
            except ValueError:
                # line 1 is the header; assumes one line per row, which holds unless a value
                # has a quoted line break, and then the row number still names the sample
                return (
                    f"{path}, row {r + 1} (line {r + 2}), column {columns[c]!r}: {value!r} is "
                    "not a number; feature columns must be numeric (encode categories as "
                    "numbers, fill in missing values)"
                )
    raise AssertionError("a value failed to convert but none is non-numeric")


def _encode_labels(parts: list[list[str]]) -> tuple[list[str], list[torch.Tensor]]:
    """Integer labels keep their values; otherwise labels are names, numbered in sorted order."""
    every = [label for part in parts for label in part]
    try:
        numbers = [int(label) for label in every]
    except ValueError:
        names = sorted(set(every))
        index = {name: i for i, name in enumerate(names)}
        return names, [torch.tensor([index[v] for v in part], dtype=torch.int64) for part in parts]
    num_classes = max(numbers) + 1 if numbers else 0
    encoded, start = [], 0
    for part in parts:
        encoded.append(torch.tensor(numbers[start : start + len(part)], dtype=torch.int64))
        start += len(part)
    return [str(c) for c in range(num_classes)], encoded


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
